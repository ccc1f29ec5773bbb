"""
A loopback TCP proxy between the client and a real redis-server, for injecting faults.

Faults a real network produces and a dead server does not: a reply lost after
the server executed the command (the client times out and retries, and the
retry must not charge twice), a store that accepts and never answers, and
every connection cut at once. One thread per connection, a bounded number of
connections, loopback only; every thread stops on close().
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
from collections.abc import Iterator

_CHUNK = 65536


class _Commands:
    """
    Counts the complete commands (RESP arrays) in a client's byte stream.

    Just enough RESP for what redis-py sends: arrays of bulk strings.
    """

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[str]:
        """The names (upper case) of the commands this data completes."""
        self._buf += data
        names: list[str] = []
        while True:
            parsed = self._one()
            if parsed is None:
                return names
            names.append(parsed)

    def _one(self) -> str | None:
        buf = self._buf
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        if not buf.startswith(b"*"):  # an inline command: one line
            self._buf = buf[end + 2 :]
            return buf[:end].split(b" ", 1)[0].decode(errors="replace").upper()
        count, pos, name = int(buf[1:end]), end + 2, ""
        for i in range(count):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            length = int(buf[pos + 1 : end])
            start, pos = end + 2, end + 2 + length + 2
            if pos > len(buf):
                return None
            if i == 0:
                name = buf[start : start + length].decode(errors="replace").upper()
        self._buf = buf[pos:]
        return name


class _Link:
    """One client connection and its upstream connection."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self.commands = _Commands()
        #: Discard whatever the server sends from now on (a reply was "lost").
        self.sink = False
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for sock in (self.client, self.upstream):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


class TcpProxy:
    """
    ``127.0.0.1:<port>`` forwarding to ``127.0.0.1:<upstream_port>``.

    Modes: pass-through (the default); :meth:`drop_replies` (forward the next
    N matching commands, then swallow everything the server sends on that
    connection: the client never hears back, times out and retries on a new
    connection); :meth:`blackhole` (accept, read, never forward nor answer);
    :meth:`cut` (close every connection now); :meth:`refuse` (cut, and hang up
    on every new connection at once: a store that is down, quickly).
    """

    def __init__(self, upstream_port: int, max_connections: int = 64) -> None:
        self.upstream_port = upstream_port
        self.max_connections = max_connections
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(max_connections)
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._links: set[_Link] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._blackhole = False
        self._refuse = False
        self._drops = 0
        self._drop_command: str | None = None
        #: Replies swallowed so far, and connections accepted so far.
        self.dropped = 0
        self.accepted = 0
        self._acceptor = threading.Thread(target=self._accept, daemon=True, name="proxy-accept")
        self._acceptor.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    # -- modes ---

    def pass_through(self) -> None:
        """Forward everything, both ways (and stop swallowing on new commands)."""
        with self._lock:
            self._blackhole = False
            self._refuse = False
            self._drops = 0

    def drop_replies(self, n: int = 1, command: str | None = "EVALSHA") -> None:
        """
        Forward the next *n* *command*s (any command if None) to the server,
        which executes them, and lose their replies.
        """
        with self._lock:
            self._drops = n
            self._drop_command = None if command is None else command.upper()

    def blackhole(self) -> None:
        """Accept connections and read requests, but never forward or answer anything."""
        with self._lock:
            self._blackhole = True

    def refuse(self) -> None:
        """Cut every connection and hang up on new ones until :meth:`pass_through`."""
        with self._lock:
            self._refuse = True
        self.cut()

    def cut(self) -> None:
        """Close every open connection, both sides, at once."""
        with self._lock:
            links = list(self._links)
        for link in links:
            link.close()

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self.cut()
        self._acceptor.join(timeout=5)
        for thread in self._threads:
            thread.join(timeout=5)

    # -- plumbing ---

    def _accept(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                full = len(self._links) >= self.max_connections
                refuse = self._refuse
            if full or refuse:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=1)
            except OSError:
                client.close()  # like the store itself refusing
                continue
            link = _Link(client, upstream)
            with self._lock:
                if self._refuse:  # refuse() came while we connected upstream
                    link.close()
                    continue
                self._links.add(link)
                self.accepted += 1
                self._threads = [t for t in self._threads if t.is_alive()]
                thread = threading.Thread(target=self._pump, args=(link,), daemon=True)
                self._threads.append(thread)
            thread.start()

    def _pump(self, link: _Link) -> None:
        try:
            for source, data in self._chunks(link):
                if source is link.client:
                    self._from_client(link, data)
                elif not link.sink:
                    link.client.sendall(data)
        except OSError:
            pass
        finally:
            link.close()
            with self._lock:
                self._links.discard(link)

    def _chunks(self, link: _Link) -> Iterator[tuple[socket.socket, bytes]]:
        sockets = [link.client, link.upstream]
        while not self._stop.is_set() and not link.closed:
            readable, _, _ = select.select(sockets, [], [], 0.05)
            for sock in readable:
                data = sock.recv(_CHUNK)
                if not data:
                    return
                yield sock, data

    def _from_client(self, link: _Link, data: bytes) -> None:
        names = link.commands.feed(data)
        with self._lock:
            if self._blackhole:
                return  # read, never forwarded, never answered
            for name in names:
                if self._drops > 0 and self._drop_command in (None, name):
                    # Swallow before forwarding, so no byte of the reply can slip through.
                    self._drops -= 1
                    self.dropped += 1
                    link.sink = True
        link.upstream.sendall(data)
