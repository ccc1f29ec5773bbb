"""
The local spool: charges that could not reach the store, kept on disk until they can.

When the store cannot be reached, the money of ``record_spend`` and
``commit`` was already spent; forgetting it would make the next day's budget a
lie. So the charge is appended to a spool file, and the caller's receipt says
"spooled"; it is later replayed through the very same idempotent ledger
operation (the spend's operation id, the reservation's id), which makes a
replay of something that did reach the store, or a second replay, charge
nothing. A charge is spooled only once it is on disk: when the file cannot be
written, nothing is kept (not even in memory), and the caller raises
BudgetUnavailableError instead, which means that nothing will be charged later.

Files: ``<dir>/<store-id>-<pid>.spool``, one per process and store, JSON lines,
append-only and fsynced per entry (a charge is reported as spooled only once
it is on disk). The first line names the store (URL without password, key
prefix); then one line per charge; replayed entries are confirmed by appending
``{"done": [seq, ...]}``, and a file whose entries are all confirmed is
deleted. A torn last line (a crash mid-write) is skipped.

Quarantine: a line that is no entry (corrupt, out of range, nested or long
beyond any entry), and an entry the store refuses for good (a settlement of
another day's reservation, an idempotency key already used for another
charge), can never be replayed, and must not stop the entries after it. It is
appended, with the reason, to ``<store-id>-<pid>.quarantine`` beside the
spool (JSON lines, fsynced; never read back by the library), logged at ERROR
and counted in the ReplaySummary; only then is it marked in the spool (an
entry by ``done``, a line by ``{"skip": [line number, ...]}``), so a later
replay neither replays nor quarantines it again. Line numbers stay valid:
the file is append-only, and a torn last line is ended (and marked skipped)
before anything is appended after it.

Locks: the owning process holds an exclusive ``flock`` on its file while it is
open, so another replayer (a new process, the CLI) takes only files of dead
processes, and two replayers never take the same file.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._config import BudgetConfig
from ._ledger import MAX_AT, MAX_SCOPES, describe
from ._money import MAX_AMOUNT_NANO, check_id
from ._store import default_embedded_path, flock
from .exceptions import BudgetUnavailableError, IdempotencyConflictError

log = logging.getLogger("coreason_budget")

VERSION = 2
SUFFIX = ".spool"
QUARANTINE_SUFFIX = ".quarantine"
OFF = "off"
#: Confirm replayed entries on disk at least this often, so a crash mid-replay
#: repeats little (repeating is harmless, only slower).
_CONFIRM_EVERY = 64
#: At most this many numbers in one "done" or "skip" line.
_MARK_EVERY = 1024
#: A longer line is no spool line, and is not even parsed: an entry with every id
#: at its maximum, each character \u-escaped, is under 16 KiB.
MAX_LINE_BYTES = 64 * 1024
#: Sequence numbers are positive and below 2**63.
MAX_SEQ = 2**63 - 1
#: A file of a dead namesake numbered beyond this is not adopted (our next
#: numbers must stay in range): it is replayed as another process's file.
_ADOPT_BELOW = 2**62

Kind = Literal["spend", "settle"]
#: What replaying an entry did; "rejected": the store refused it (quarantined).
Outcome = Literal["recorded", "duplicate", "expired", "rejected"]
#: What an Apply returns; it raises Rejected for an entry the store refuses.
Replayed = Literal["recorded", "duplicate", "expired"]


@attrs.frozen
class Entry:
    """
    One spooled charge: everything its ledger operation needs, and nothing from config.

    spend:  ``op`` is the operation id (the idempotency key), ``at`` when it
            was made (ms since the epoch, the client's clock), ``amount`` the cost.
    settle: ``op`` is the reservation id, ``at`` when the hold was taken (None:
            settled by its record alone, an undone reserve's release),
            ``amount`` the actual cost, ``state`` "committed" or "released".
    """

    seq: int
    kind: Kind
    op: str
    at: int | None
    fields: tuple[str, ...]
    amount: int
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "seq": self.seq,
            "kind": self.kind,
            "op": self.op,
            "at": self.at,
            "fields": list(self.fields),
            "amount": self.amount,
        }
        if self.state is not None:
            doc["state"] = self.state
        return doc

    @classmethod
    def from_json(cls, doc: object) -> Entry:
        """
        The entry *doc* describes; ValueError for anything else.

        Every value is held to what the library itself writes, so that an
        entry that passes can be sent to the store as it is: an instant from
        1970 to 9999 (or none, for a release by record), an amount no larger
        than any single charge, an id and counter fields as the manager
        validates them.
        """
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in ("seq", "kind", "op", "at", "fields", "amount") if k not in doc]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
        seq = _whole(doc["seq"], "seq", 1, MAX_SEQ)
        at = None if doc["at"] is None else _whole(doc["at"], "at", 0, MAX_AT)
        amount = _whole(doc["amount"], "amount", 0, MAX_AMOUNT_NANO)
        kind, state = doc["kind"], doc.get("state")
        if not (
            (kind == "spend" and state is None)
            or (kind == "settle" and state in ("committed", "released"))
        ):
            raise ValueError(f"bad kind/state {_show(kind)}/{_show(state)}")
        if at is None and state != "released":
            raise ValueError("only a release may leave out when its hold was taken")
        op = check_id(doc["op"], "op")  # InvalidInputError: a ValueError
        fields = doc["fields"]
        if not (isinstance(fields, list) and 0 < len(fields) <= MAX_SCOPES):
            raise ValueError(f"fields must be a list of 1 to {MAX_SCOPES} counter fields")
        for field in fields:
            if not isinstance(field, str):
                raise ValueError(f"counter field {_show(field)} is not a string")
            _, entity = describe(field)  # ValueError for anything but a counter field
            if entity is not None:
                check_id(entity, f"the id in counter field {_show(field)}")
        if len(set(fields)) != len(fields):
            raise ValueError("a counter field appears twice")
        return cls(seq, kind, op, at, tuple(fields), amount, state)


def _whole(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number, got {_show(value)}")
    if not low <= value <= high:
        raise ValueError(f"{name} {_show(value)} is out of range ({low} to {high})")
    return value


def _show(value: object) -> str:
    """A value for a message, cut short: it comes from a corrupt line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class Rejected(Exception):
    """Raised by an Apply for an entry the store refuses for good; the message says why."""


@attrs.define
class ReplaySummary:
    """What a replay did; ``error`` says why it stopped early (the store went away)."""

    recorded: int = 0  # charged (or settled) now
    duplicates: int = 0  # already in the store: its reply, not the charge, had been lost
    expired: int = 0  # its periods are past retention: the store keeps nothing to charge
    rejected: int = 0  # refused by the store for good: quarantined (see below)
    remaining: int = 0  # still spooled: not reached, or not quarantined (its file unwritable)
    files: int = 0  # other processes' spool files taken
    busy_files: int = 0  # held by a live process or another replayer: left alone
    torn_lines: int = 0  # a last line cut short by a crash (never confirmed): skipped
    other_stores: list[str] = attrs.field(factory=list)  # files for other stores: left alone
    error: str | None = None
    #: Lines and entries moved to a quarantine file by this replay: the rejected
    #: entries, and lines that are no entry (corrupt, out of range). Kept, never replayed.
    quarantined: int = 0
    quarantine_files: list[str] = attrs.field(factory=list)  # where this replay put them

    @property
    def replayed(self) -> int:
        return self.recorded + self.duplicates + self.expired + self.rejected

    def count(self, outcome: Outcome) -> None:
        if outcome == "recorded":
            self.recorded += 1
        elif outcome == "duplicate":
            self.duplicates += 1
        elif outcome == "expired":
            self.expired += 1
        else:
            self.rejected += 1

    def merge(self, other: ReplaySummary) -> None:
        for name in (
            "recorded",
            "duplicates",
            "expired",
            "rejected",
            "remaining",
            "files",
            "busy_files",
            "torn_lines",
            "quarantined",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.other_stores += other.other_stores
        self.quarantine_files += [
            f for f in other.quarantine_files if f not in self.quarantine_files
        ]
        self.error = self.error or other.error

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "replayed": self.replayed}


#: Replays one entry through the ledger. Raises BudgetUnavailableError to stop the
#: replay (the store is away: the rest stays spooled), Rejected for an entry the
#: store refuses for good (it is quarantined, and the replay goes on).
Apply = Callable[[Entry], Replayed]


# -- where, and for which store ----------------------------------------------------------------


def spool_directory(config: BudgetConfig) -> Path | None:
    """The configured spool directory; None when spooling is off."""
    value = config.spool_dir
    if value is None:
        # Beside the embedded store's default file: the per-user data directory.
        return default_embedded_path().parent / "spool"
    if value.strip().lower() == OFF:
        return None
    return Path(value).expanduser()


def store_identity(config: BudgetConfig) -> tuple[str, str] | None:
    """
    (label, id) of the store and key prefix a charge belongs to; None for memory://.

    A spooled charge must only ever be replayed into the ledger it was meant
    for, so files are named by this id. The label is the URL without its
    password (it is written into the file); a memory:// store lives and dies
    with its manager, so nothing could ever replay into it.
    """
    url = config.redis_url
    if url is None:
        url = f"embedded://{default_embedded_path()}"
    if url.startswith("memory://"):
        return None
    if url.startswith("embedded://"):
        path = Path(url.removeprefix("embedded://")).expanduser().resolve()
        label = f"embedded://{path}"
    else:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{parts.username}@{host}" if parts.username else host
        label = urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    label = f"{label} prefix={config.key_prefix}"
    return label, hashlib.sha256(label.encode()).hexdigest()[:16]


# -- reading and writing files ---------------------------------------------------------------


@attrs.define
class _Bad:
    """A line that is no entry, not yet quarantined."""

    line: int  # its number in the file, from 1 (the header)
    raw: bytes
    reason: str


@attrs.define
class _Contents:
    header: dict[str, Any] | None = None
    entries: dict[int, Entry] = attrs.field(factory=dict)  # not yet confirmed
    bad: list[_Bad] = attrs.field(factory=list)  # not yet quarantined
    torn: int = 0  # the number of an unmarked torn last line, or 0
    max_seq: int = 0


#: What parsing a line may raise, all of it turned into a reason to quarantine the line.
_UNREADABLE = (ValueError, TypeError, KeyError, OverflowError, RecursionError)


def _parse(data: bytes, path: Path) -> _Contents:
    """Read a spool file; never raises for its contents, whatever they are."""
    out = _Contents()
    done: set[int] = set()
    marked: set[int] = set()
    found: list[tuple[int, bytes, Entry]] = []
    bad: list[_Bad] = []
    torn = 0
    lines = data.split(b"\n")
    ends_torn = lines[-1] != b""  # the last write was cut short before its newline
    if not ends_torn:
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            doc = _load(line)
        except _UNREADABLE as e:
            if ends_torn and number == len(lines) and len(line) <= MAX_LINE_BYTES:
                torn = number  # a write cut short: never a whole JSON document
            else:
                bad.append(_Bad(number, line, _reason(e)))
            continue
        try:
            if isinstance(doc, dict) and doc.get("spool") == "coreason-budget":
                out.header = out.header or doc
            elif isinstance(doc, dict) and "done" in doc:
                done.update(_numbers(doc["done"], "done"))
            elif isinstance(doc, dict) and "skip" in doc:
                marked.update(_numbers(doc["skip"], "skip"))
            else:
                found.append((number, line, Entry.from_json(doc)))
        except _UNREADABLE as e:
            bad.append(_Bad(number, line, _reason(e)))
    seen: dict[int, Entry] = {}
    for number, line, entry in found:
        out.max_seq = max(out.max_seq, entry.seq)  # marked or not: never numbered again
        if number in marked:
            continue
        prior = seen.setdefault(entry.seq, entry)
        if prior != entry:
            bad.append(_Bad(number, line, f"seq {entry.seq} is another entry's"))
    for seq in done:
        seen.pop(seq, None)
    out.entries = seen
    out.bad = sorted((b for b in bad if b.line not in marked), key=lambda b: b.line)
    if torn and torn not in marked:
        out.torn = torn
        log.warning(
            "Skipping the torn last line %d of spool file %s (a write cut short)", torn, path
        )
    return out


def _load(line: bytes) -> Any:
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"{len(line):,} bytes long; a spool line has at most {MAX_LINE_BYTES:,}")
    return json.loads(line)  # RecursionError (deep nesting): the callers' _UNREADABLE


def _numbers(value: object, name: str) -> list[int]:
    if not isinstance(value, list):
        raise ValueError(f"{name} must be a list of numbers")
    return [_whole(v, name, 1, MAX_SEQ) for v in value]


def _reason(e: BaseException) -> str:
    if isinstance(e, RecursionError):
        return "nested too deeply to be a spool line"
    text = str(e) if not isinstance(e, KeyError) else f"no {e}"
    return text[:500] or type(e).__name__


def _chunks(numbers: list[int]) -> list[list[int]]:
    return [numbers[i : i + _MARK_EVERY] for i in range(0, len(numbers), _MARK_EVERY)]


@attrs.define
class _Quarantine:
    """
    Where the lines of one spool file that can never be replayed are kept: beside
    it, in its name with ``.quarantine`` for ``.spool``, JSON lines, fsynced, for a
    person to read.
    """

    path: Path
    spool: Path | None  # the spool file they come from (None: this process has none open)
    store: str
    used: bool = False

    def lines(self, bad: list[_Bad]) -> bool:
        """Keep unreadable lines (raw, byte for byte); False if the file could not be written."""
        records = []
        for b in bad:
            record: dict[str, Any] = {**self._record(b.reason), "line": b.line}
            try:
                record["raw"] = b.raw.decode()
            except UnicodeDecodeError:
                record["raw_base64"] = base64.b64encode(b.raw).decode()
            records.append(record)
        if not self._keep(records):
            return False
        for b in bad:
            log.error(
                "Quarantined line %d of spool file %s, which is no entry (%s): kept in %s",
                b.line,
                self.spool,
                b.reason,
                self.path,
            )
        return True

    def entry(self, entry: Entry, reason: str) -> bool:
        """Keep an entry the store refused; False if the file could not be written."""
        if not self._keep([{**self._record(reason), "entry": entry.to_json()}]):
            return False
        log.error(
            "Quarantined a spooled %s the store refuses (%s): %r, kept in %s",
            entry.kind,
            reason,
            entry,
            self.path,
        )
        return True

    def _record(self, reason: str) -> dict[str, Any]:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        spool = None if self.spool is None else str(self.spool)
        return {"quarantined": now, "store": self.store, "spool": spool, "reason": reason}

    def _keep(self, records: list[dict[str, Any]]) -> bool:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                new = os.fstat(fd).st_size == 0
                # A write of ours cut short: the next line must not continue it.
                _write_lines(fd, *records, newline_first=_ends_torn(fd))
            finally:
                os.close(fd)
            if new:
                _fsync_dir(self.path.parent)
        except OSError as e:
            log.error(
                "Could not write the quarantine file %s (%s): %d line(s) it should keep stay in "
                "the spool %s",
                self.path,
                e,
                len(records),
                self.spool,
            )
            return False
        self.used = True
        return True


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_lines(fd: int, *docs: dict[str, Any], newline_first: bool = False) -> None:
    """Append a line per document and fsync: only then does the caller count them as kept."""
    data = b"\n" if newline_first else b""
    data += b"".join(json.dumps(doc, separators=(",", ":")).encode() + b"\n" for doc in docs)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _try_lock(fd: int) -> None:
    """Take *fd*'s exclusive ``flock`` without waiting: BlockingIOError if another holds it."""
    import fcntl  # POSIX only: spool_for refuses the spool where it is missing

    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _lock(path: Path) -> int | None:
    """
    Open *path* and take its exclusive lock without waiting; None if another holds it.

    The path is checked again once locked: a holder may have deleted the file
    (everything confirmed) between our open and our lock.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        return None
    try:
        _try_lock(fd)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError as e:
        os.close(fd)
        if isinstance(e, FileNotFoundError) or e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _replay_entries(
    entries: list[Entry],
    apply: Apply,
    confirm: Callable[[list[int]], None],
    quarantine: Callable[[Entry, str], bool],
) -> ReplaySummary:
    """
    Apply entries in order, confirming them in batches; stop at the first unavailability.

    An entry the store refuses is quarantined and confirmed at once, and the
    replay goes on: one bad entry never holds up the ones after it.
    """
    summary = ReplaySummary()
    done: list[int] = []
    try:
        for i, entry in enumerate(entries):
            try:
                outcome: Outcome = apply(entry)
            except BudgetUnavailableError as e:
                summary.error = str(e)
                summary.remaining += len(entries) - i
                break
            except Rejected as e:
                if not quarantine(entry, str(e)):
                    summary.remaining += 1  # still in the spool, never lost: tried again later
                    continue
                summary.quarantined += 1
                outcome = "rejected"
            summary.count(outcome)
            done.append(entry.seq)
            if len(done) >= _CONFIRM_EVERY or outcome == "rejected":
                confirm(done)
                done = []
    finally:
        if done:
            confirm(done)
    return summary


# -- this process's spool ----------------------------------------------------------------------


class Spool:
    """
    This process's spool for one store: a lazily created, locked, append-only file.

    Shared by every manager of the process on the same store and directory
    (see :func:`spool_for`). ``due`` is the only thing the hot path reads:
    True when something may be waiting to be replayed.
    """

    def __init__(self, directory: Path, label: str, store_id: str) -> None:
        self.directory = directory
        self.label = label
        self.store_id = store_id
        #: Something may wait for a replay: checked after each successful call.
        self.due = False
        #: No automatic replay before this (monotonic) time: one attempt a second at most.
        self.not_before = 0.0
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._replay_lock = threading.Lock()
        self._fd: int | None = None
        self.path: Path | None = None
        self._pending: dict[int, Entry] = {}
        #: A spend's idempotency key -> its entry's seq (stale once replayed: look up in _pending).
        self._spends: dict[str, int] = {}
        self._next_seq = 1
        self._torn_tail = False
        self._replaying = False
        #: Lines of an adopted file that are no entry: quarantined by the next replay.
        self._unreadable: list[_Bad] = []
        self._torn_lines = 0  # its torn last line, reported by the next replay
        #: The file quarantined lines go to: beside the spool file, named after it.

    def after_fork(self) -> None:
        """A forked child starts with an empty spool of its own; the parent keeps its file."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # the child's copy; the parent's lock stays
        self._reset()
        self.due = False

    # -- writing ---

    def append(
        self,
        kind: Kind,
        op: str,
        at: int | None,
        fields: tuple[str, ...],
        amount: int,
        state: str | None = None,
    ) -> None:
        """
        Keep a charge on disk (written and fsynced) before the caller reports it spooled.

        Raises OSError if the file cannot be written: then nothing is kept,
        neither in memory nor on disk, and nothing of it will ever be replayed.
        A spend whose idempotency key this spool already holds for another
        payment raises IdempotencyConflictError, keeping nothing: its replay
        would be refused, and "spooled" would promise a charge never made.
        """
        with self._lock:
            prior = self._pending.get(self._spends.get(op, 0)) if kind == "spend" else None
            if prior is not None:
                if (prior.fields, prior.amount) != (fields, amount):
                    raise IdempotencyConflictError(
                        f"idempotency_key {op!r} was already used for a different charge "
                        "(another user, scopes or amount), spooled while the store was away; "
                        "nothing was written"
                    )
                return  # this very spend waits already: replayed once
            fd = self._open()
            entry = Entry(self._next_seq, kind, op, at, fields, amount, state)
            self._next_seq += 1  # never numbered again, even if it is not kept
            self._write_entry(fd, entry)
            self._pending[entry.seq] = entry
            if kind == "spend":
                self._spends[op] = entry.seq
            self.due = True

    def _write_entry(self, fd: int, entry: Entry) -> None:
        """
        Append *entry*; if that fails, undo it: its caller reports that nothing
        was kept, so no replay (ours, or another's after we are gone) may find it.
        """
        size, torn_tail = os.fstat(fd).st_size, self._torn_tail
        try:
            self._write(fd, entry.to_json())
        except OSError:
            try:
                # All of it, or part: written, perhaps, yet not known to be on disk.
                os.ftruncate(fd, size)
                os.fsync(fd)
                self._torn_tail = torn_tail
            except OSError:
                try:
                    self._write(fd, {"done": [entry.seq]})
                except OSError as e:
                    log.error(
                        "Could not undo a failed write to the spool %s (%s): a replay may "
                        "still record %s %s",
                        self.path,
                        e,
                        entry.kind,
                        entry.op,
                    )
            raise

    def _write(self, fd: int, doc: dict[str, Any]) -> None:
        try:
            _write_lines(fd, doc, newline_first=self._torn_tail)
            self._torn_tail = False
        except OSError:
            self._torn_tail = True  # the next line must not continue a half-written one
            raise

    def _open(self) -> int:
        """The file, created and locked on first use (under self._lock)."""
        if self._fd is not None:
            return self._fd
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for n in range(100):
            suffix = f"-{n}" if n else ""
            path = self.directory / f"{self.store_id}-{os.getpid()}{suffix}{SUFFIX}"
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                _try_lock(fd)
            except BlockingIOError:
                os.close(fd)  # a replayer holds a dead namesake's file (the pid was reused)
                continue
            if os.fstat(fd).st_ino != _inode(path):
                os.close(fd)  # deleted by a replayer as we opened it: try again
                continue
            # A file left by a dead process with our pid (pids are reused): its
            # entries are ours to replay now (unless numbered so high that ours
            # could not follow: then it is replayed as another process's file).
            old = _parse(_read_all(fd), path)
            if old.max_seq >= _ADOPT_BELOW:
                os.close(fd)
                continue
            break
        else:
            raise OSError(f"no spool file could be created in {self.directory}")
        self._pending = dict(old.entries)
        self.due = self.due or bool(old.entries or old.bad or old.torn)
        self._next_seq = old.max_seq + 1
        self._fd, self.path = fd, path
        self._torn_tail = _ends_torn(fd)
        self._unreadable = old.bad
        if old.torn:
            # Ended by our next line: marked, so that it is never taken for a corrupt one.
            self._torn_lines += 1
            self._write(fd, {"skip": [old.torn]})
        if old.header is None:
            self._write(fd, self._header())
            with contextlib.suppress(OSError):
                _fsync_dir(self.directory)
        return fd

    def _header(self) -> dict[str, Any]:
        return {
            "spool": "coreason-budget",
            "v": VERSION,
            "store": self.label,
            "store_id": self.store_id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "created": time.time(),
        }

    # -- confirming ---

    def _confirm(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            for seq in seqs:
                self._pending.pop(seq, None)
            if not self._pending:
                self._spends.clear()
            if self._fd is None:
                return
            try:
                if not self._close_if_done():
                    for chunk in _chunks(seqs):
                        self._write(self._fd, {"done": chunk})
            except OSError as e:
                # At worst replayed again later, which charges nothing twice.
                log.warning("Could not confirm replayed entries in the spool: %s", e)

    def _close_if_done(self) -> bool:
        """
        Under self._lock: if nothing in the file waits any more (no entry to
        replay, no line to quarantine), it goes, unlinked while still locked.
        """
        if self._pending or self._unreadable or self._fd is None:
            return False
        assert self.path is not None
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = self.path = None
        return True

    # -- replaying ---

    @property
    def pending(self) -> int:
        return len(self._pending)

    def claim_replay(self) -> bool:
        """For the automatic replay: True (and no longer due) if this caller should run it."""
        with self._lock:
            if not self.due or self._replaying or time.monotonic() < self.not_before:
                return False
            self.due = False
            self._replaying = True
            return True

    def end_replay(self, *, again: bool) -> None:
        with self._lock:
            self._replaying = False
            if again:
                self.due = True
                self.not_before = time.monotonic() + 1.0

    def replay(self, apply: Apply) -> ReplaySummary:
        """Replay this process's pending entries, in order."""
        with self._replay_lock:
            quarantine = self._quarantine()
            summary = self._quarantine_unreadable(quarantine)
            with self._lock:
                entries = sorted(self._pending.values(), key=lambda e: e.seq)
            summary.merge(_replay_entries(entries, apply, self._confirm, quarantine.entry))
            if quarantine.used:
                summary.quarantine_files.append(str(quarantine.path))
            return summary

    def _quarantine(self) -> _Quarantine:
        with self._lock:
            if self.path is not None:
                path = self.path.with_suffix(QUARANTINE_SUFFIX)
            else:
                path = self.directory / f"{self.store_id}-{os.getpid()}{QUARANTINE_SUFFIX}"
            return _Quarantine(path, self.path, self.label)

    def _quarantine_unreadable(self, quarantine: _Quarantine) -> ReplaySummary:
        """Quarantine the lines of an adopted file that are no entry, then mark them skipped."""
        with self._lock:
            bad = list(self._unreadable)
            summary = ReplaySummary(torn_lines=self._torn_lines)
            self._torn_lines = 0
        if not bad:
            return summary
        if not quarantine.lines(bad):
            summary.remaining += len(bad)  # still in the spool file: tried again next time
            return summary
        summary.quarantined += len(bad)
        lines = {b.line for b in bad}
        with self._lock:
            self._unreadable = [b for b in self._unreadable if b.line not in lines]
            try:
                if not self._close_if_done() and self._fd is not None:
                    for chunk in _chunks(sorted(lines)):
                        self._write(self._fd, {"skip": chunk})
            except OSError as e:
                # Kept in the quarantine file already; at worst kept there twice.
                log.warning("Could not mark quarantined lines in the spool: %s", e)
        return summary

    def has_other_files(self) -> bool:
        """Whether the directory holds spool files of other processes for this store."""
        try:
            names = os.listdir(self.directory)
        except OSError:
            return False
        mine = self.path.name if self.path is not None else None
        return any(
            n.startswith(self.store_id + "-") and n.endswith(SUFFIX) and n != mine for n in names
        )

    def replay_others(self, apply: Apply) -> ReplaySummary:
        """Replay the files of other (dead) processes for this store in the directory."""
        return replay_directory(self.directory, self.store_id, apply, exclude=self.path)


def _inode(path: Path) -> int:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return -1


def _fsync_dir(directory: Path) -> None:
    """Make a new file's name durable too, not just its contents."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replay_directory(
    directory: Path, store_id: str, apply: Apply, exclude: Path | None = None
) -> ReplaySummary:
    """
    Replay every unlocked spool file for *store_id* in *directory*.

    A file another process holds is skipped (its owner is alive, or another
    replayer has it); files for other stores are listed in ``other_stores``.
    """
    summary = ReplaySummary()
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
    except (FileNotFoundError, NotADirectoryError):
        return summary
    for path in paths:
        if exclude is not None and path == exclude:
            continue
        if not path.name.startswith(store_id + "-"):
            summary.other_stores.append(f"{path.name}: {_label_of(path)}")
            continue
        if summary.error is not None:
            summary.remaining += 1  # not even opened: the store went away
            continue
        try:
            fd = _lock(path)
        except OSError as e:  # another user's file, say: not ours to take
            log.warning("Cannot open spool file %s: %s", path, e)
            fd = None
        if fd is None:
            summary.busy_files += 1
            continue
        try:
            summary.merge(_replay_file(fd, path, apply))
        finally:
            os.close(fd)
    return summary


def _replay_file(fd: int, path: Path, apply: Apply) -> ReplaySummary:
    contents = _parse(_read_all(fd), path)
    header = contents.header or {}
    store = header.get("store")
    quarantine = _Quarantine(
        path.with_suffix(QUARANTINE_SUFFIX), path, store if isinstance(store, str) else "unknown"
    )
    entries = sorted(contents.entries.values(), key=lambda e: e.seq)
    left = {e.seq for e in entries}  # neither replayed nor quarantined yet
    # A torn last line may lack its newline: the next line must not continue it.
    torn_tail = [_ends_torn(fd)]

    def write(doc: dict[str, Any]) -> None:
        try:
            _write_lines(fd, doc, newline_first=torn_tail[0])
            torn_tail[0] = False
        except OSError as e:
            # At worst replayed (which charges nothing twice) or quarantined again.
            log.warning("Could not update spool file %s: %s", path, e)

    def confirm(seqs: list[int]) -> None:
        left.difference_update(seqs)
        write({"done": seqs})

    summary = ReplaySummary(files=1)
    # First what needs no store: lines that are no entry go to quarantine, and
    # they and a torn last line are marked, so no later replay looks at them again.
    marks = []
    if contents.torn:
        summary.torn_lines = 1
        marks.append(contents.torn)
    kept_all = True
    if contents.bad:
        if quarantine.lines(contents.bad):
            summary.quarantined += len(contents.bad)
            marks += [b.line for b in contents.bad]
        else:
            summary.remaining += len(contents.bad)
            kept_all = False
    for chunk in _chunks(marks):
        write({"skip": chunk})
    summary.merge(_replay_entries(entries, apply, confirm, quarantine.entry))
    if quarantine.used:
        summary.quarantine_files.append(str(quarantine.path))
    if not left and kept_all:
        path.unlink(missing_ok=True)  # still locked: nobody else is reading it
    return summary


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _label_of(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            header = _load(fh.readline(MAX_LINE_BYTES + 1))
        return str(header["store"])
    except (OSError, *_UNREADABLE):
        return "unknown store"


# -- one spool per process, directory and store ------------------------------------------------

_spools: dict[tuple[Path, str], Spool] = {}
_spools_lock = threading.Lock()


def spool_for(directory: Path, label: str, store_id: str) -> Spool:
    """
    The process's spool for this directory and store, shared by all its managers.

    ConfigError where there is no ``flock`` (Windows): the spool's files are
    owned by live processes through it, so it cannot work there.
    """
    flock(
        "The local spool",
        instead="set spool_dir='off' (COREASON_BUDGET_SPOOL_DIR=off); a charge the store "
        "cannot take then raises BudgetUnavailableError instead of being spooled",
    )
    key = (directory.expanduser().absolute(), store_id)
    with _spools_lock:
        spool = _spools.get(key)
        if spool is None:
            spool = _spools[key] = Spool(key[0], label, store_id)
        return spool


def _after_fork() -> None:
    global _spools_lock
    _spools_lock = threading.Lock()
    for spool in _spools.values():
        spool.after_fork()


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork)
