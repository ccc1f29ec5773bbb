"""
The local spool: charges that could not reach the store, kept on disk until they can.

A budget guard fails closed: when the store cannot be reached, ``record_spend``
and ``commit`` raise BudgetUnavailableError. But that money was already spent;
forgetting it would make the next day's budget a lie. So before raising, the
charge is appended to a spool file and later replayed through the very same
idempotent ledger operation (the spend's operation id, the reservation's id),
which makes a replay of something that did reach the store, or a second
replay, charge nothing.

Files: ``<dir>/<store-id>-<pid>.spool``, one per process and store, JSON lines,
append-only and fsynced per entry (a charge is reported as spooled only once
it is on disk). The first line names the store (URL without password, key
prefix); then one line per charge; replayed entries are confirmed by appending
``{"done": [seq, ...]}``, and a file whose entries are all confirmed is
deleted. A torn last line (a crash mid-write) or a corrupt line is skipped.

Locks: the owning process holds an exclusive ``flock`` on its file while it is
open, so another replayer (a new process, the CLI) takes only files of dead
processes, and two replayers never take the same file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import attrs

from ._config import BudgetConfig
from ._store import default_embedded_path
from .exceptions import BudgetUnavailableError

log = logging.getLogger("coreason_budget")

VERSION = 1
SUFFIX = ".spool"
OFF = "off"
#: Confirm replayed entries on disk at least this often, so a crash mid-replay
#: repeats little (repeating is harmless, only slower).
_CONFIRM_EVERY = 64

Kind = Literal["spend", "settle"]
Outcome = Literal["recorded", "duplicate", "expired", "rejected"]


@attrs.frozen
class Entry:
    """
    One spooled charge: everything its ledger operation needs, and nothing from config.

    spend:  ``op`` is the operation id (the idempotency key), ``day`` the day
            the client computed for it, ``amount`` the cost.
    settle: ``op`` is the reservation id, ``day`` the reservation's day,
            ``amount`` the actual cost, ``state`` "committed" or "released".
    """

    seq: int
    kind: Kind
    op: str
    day: int
    fields: tuple[str, ...]
    amount: int
    state: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "seq": self.seq,
            "kind": self.kind,
            "op": self.op,
            "day": self.day,
            "fields": list(self.fields),
            "amount": self.amount,
        }
        if self.state is not None:
            doc["state"] = self.state
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Entry:
        """Raises ValueError (or KeyError/TypeError) for anything but a well-formed entry."""
        kind, state = doc["kind"], doc.get("state")
        ints = (doc["seq"], doc["day"], doc["amount"])
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in ints):
            raise ValueError("seq, day and amount must be whole numbers")
        fields = doc["fields"]
        if not (isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields)):
            raise ValueError("fields must be a non-empty list of strings")
        if not isinstance(doc["op"], str) or not doc["op"]:
            raise ValueError("op must be a non-empty string")
        if (kind, state) not in (
            ("spend", None),
            ("settle", "committed"),
            ("settle", "released"),
        ):
            raise ValueError(f"bad kind/state {kind!r}/{state!r}")
        if doc["amount"] < 0:
            raise ValueError("negative amount")
        return cls(doc["seq"], kind, doc["op"], doc["day"], tuple(fields), doc["amount"], state)


@attrs.define
class ReplaySummary:
    """What a replay did; ``error`` says why it stopped early (the store went away)."""

    recorded: int = 0  # charged (or settled) now
    duplicates: int = 0  # already in the store: its reply, not the charge, had been lost
    expired: int = 0  # its day is past retention: the store keeps nothing to charge
    rejected: int = 0  # refused by the store as inconsistent: dropped, logged in full
    remaining: int = 0  # still spooled: not reached, or deferred to a live reservation handle
    files: int = 0  # other processes' spool files taken
    busy_files: int = 0  # held by a live process or another replayer: left alone
    torn_lines: int = 0  # unreadable lines skipped (a write cut short by a crash)
    other_stores: list[str] = attrs.field(factory=list)  # files for other stores: left alone
    error: str | None = None

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
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.other_stores += other.other_stores
        self.error = self.error or other.error

    def to_json(self) -> dict[str, Any]:
        return {**attrs.asdict(self), "replayed": self.replayed}


#: Replays one entry through the ledger; raises BudgetUnavailableError to stop the replay.
Apply = Callable[[Entry], Outcome]


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
class _Contents:
    header: dict[str, Any] | None = None
    entries: dict[int, Entry] = attrs.field(factory=dict)  # not yet confirmed
    torn: int = 0
    max_seq: int = 0


def _parse(data: bytes, path: Path) -> _Contents:
    out = _Contents()
    done: set[int] = set()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for number, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
            if not isinstance(doc, dict):
                raise ValueError("not an object")
            if "spool" in doc:
                out.header = out.header or doc
            elif "done" in doc:
                done.update(int(s) for s in doc["done"])
            else:
                entry = Entry.from_json(doc)
                out.entries[entry.seq] = entry
                out.max_seq = max(out.max_seq, entry.seq)
        except (ValueError, KeyError, TypeError) as e:
            out.torn += 1
            log.warning("Skipping unreadable line %d of spool file %s: %s", number, path, e)
    for seq in done:
        out.entries.pop(seq, None)
    return out


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 1 << 20):
        chunks.append(chunk)
    return b"".join(chunks)


def _write_line(fd: int, doc: dict[str, Any], *, newline_first: bool = False) -> None:
    """Append one line and fsync it: only then does the caller count it as kept."""
    data = (b"\n" if newline_first else b"") + json.dumps(doc, separators=(",", ":")).encode()
    data += b"\n"
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


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
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except OSError as e:
        os.close(fd)
        if isinstance(e, FileNotFoundError) or e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def _replay_entries(
    entries: list[Entry], apply: Apply, confirm: Callable[[list[int]], None]
) -> ReplaySummary:
    """Apply entries in order, confirming them in batches; stop at the first unavailability."""
    summary = ReplaySummary()
    done: list[int] = []
    try:
        for i, entry in enumerate(entries):
            try:
                outcome = apply(entry)
            except BudgetUnavailableError as e:
                summary.error = str(e)
                summary.remaining += len(entries) - i
                break
            summary.count(outcome)
            done.append(entry.seq)
            if len(done) >= _CONFIRM_EVERY:
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
        self._owners: dict[int, weakref.ref[Any]] = {}
        self._next_seq = 1
        self._torn_tail = False
        self._replaying = False

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
        day: int,
        fields: tuple[str, ...],
        amount: int,
        state: str | None = None,
        owner: object = None,
    ) -> None:
        """
        Keep a charge on disk (written and fsynced) before the caller reports failure.

        *owner*, a live reservation handle, defers the automatic replay of its
        settlement while the handle is alive and unsettled: whoever holds it was
        told the commit failed and may well retry it themselves.
        Raises OSError if the file cannot be written; the entry is then still
        kept in memory and replayed by this process.
        """
        with self._lock:
            self.due = True
            try:
                fd: int | None = self._open()
            except OSError as e:
                fd, error = None, e
            seq = self._next_seq
            self._next_seq += 1
            entry = Entry(seq, kind, op, day, fields, amount, state)
            self._pending[seq] = entry
            if owner is not None:
                self._owners[seq] = weakref.ref(owner, self._owner_gone)
            if fd is None:
                raise error
            self._write(fd, entry.to_json())

    def _write(self, fd: int, doc: dict[str, Any]) -> None:
        try:
            _write_line(fd, doc, newline_first=self._torn_tail)
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
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # a replayer holds a dead namesake's file (the pid was reused)
                continue
            if os.fstat(fd).st_ino != _inode(path):
                os.close(fd)  # deleted by a replayer as we opened it: try again
                continue
            break
        else:
            raise OSError(f"no spool file could be created in {self.directory}")
        # A file left by a dead process with our pid (pids are reused): its
        # entries are ours to replay now. Ours so far lived only in memory (the
        # file could not be written before); they follow, renumbered.
        old = _parse(_read_all(fd), path)
        in_memory = sorted(self._pending.values(), key=lambda e: e.seq)
        owners, self._owners = self._owners, {}
        self._pending = dict(old.entries)
        self._next_seq = old.max_seq + 1
        self._fd, self.path = fd, path
        self._torn_tail = _ends_torn(fd)
        if old.header is None:
            self._write(fd, self._header())
            with contextlib.suppress(OSError):
                _fsync_dir(self.directory)
        for entry in in_memory:
            seq = self._next_seq
            self._next_seq += 1
            self._pending[seq] = attrs.evolve(entry, seq=seq)
            if entry.seq in owners:
                self._owners[seq] = owners[entry.seq]
            self._write(fd, self._pending[seq].to_json())
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

    def _owner_gone(self, _: object) -> None:
        # From the garbage collector, on any thread: only set a flag.
        self.due = True

    # -- confirming ---

    def confirm_settled(self, reservation_id: str) -> None:
        """A live handle's own retry settled the reservation: its spooled settlements are moot."""
        with self._lock:
            seqs = [
                s for s, e in self._pending.items() if e.kind == "settle" and e.op == reservation_id
            ]
        self._confirm(seqs)

    def _confirm(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            for seq in seqs:
                self._pending.pop(seq, None)
                self._owners.pop(seq, None)
            if self._fd is None:
                return
            try:
                if not self._pending:
                    # Everything confirmed: the file goes, unlinked while still locked.
                    assert self.path is not None
                    self.path.unlink(missing_ok=True)
                    os.close(self._fd)
                    self._fd = self.path = None
                else:
                    _write_line(self._fd, {"done": seqs}, newline_first=self._torn_tail)
                    self._torn_tail = False
            except OSError as e:
                # At worst replayed again later, which charges nothing twice.
                log.warning("Could not confirm replayed entries in the spool: %s", e)

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

    def replay(self, apply: Apply, defer: Callable[[Any], bool] | None = None) -> ReplaySummary:
        """
        Replay this process's pending entries, in order.

        An entry whose owner is alive and *defer*(owner) is true is left for
        later (the owner may still settle it itself).
        """
        with self._replay_lock:
            with self._lock:
                entries = sorted(self._pending.values(), key=lambda e: e.seq)
                owners = dict(self._owners)
            todo, deferred = [], 0
            for entry in entries:
                ref = owners.get(entry.seq)
                owner = ref() if ref is not None else None
                if defer is not None and owner is not None and defer(owner):
                    deferred += 1
                else:
                    todo.append(entry)
            summary = _replay_entries(todo, apply, self._confirm)
            summary.remaining += deferred
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
    entries = sorted(contents.entries.values(), key=lambda e: e.seq)
    left = {e.seq for e in entries}
    # A torn last line may lack its newline: the next line must not continue it.
    torn_tail = [_ends_torn(fd)]

    def confirm(seqs: list[int]) -> None:
        left.difference_update(seqs)
        _write_line(fd, {"done": seqs}, newline_first=torn_tail[0])
        torn_tail[0] = False

    summary = _replay_entries(entries, apply, confirm)
    summary.files = 1
    summary.torn_lines = contents.torn
    if not left:
        path.unlink(missing_ok=True)  # still locked: nobody else is reading it
    return summary


def _ends_torn(fd: int) -> bool:
    size = os.fstat(fd).st_size
    return size > 0 and os.pread(fd, 1, size - 1) != b"\n"


def _label_of(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            header = json.loads(fh.readline())
        return str(header["store"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown store"


# -- one spool per process, directory and store ------------------------------------------------

_spools: dict[tuple[Path, str], Spool] = {}
_spools_lock = threading.Lock()


def spool_for(directory: Path, label: str, store_id: str) -> Spool:
    """The process's spool for this directory and store, shared by all its managers."""
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


os.register_at_fork(after_in_child=_after_fork)
