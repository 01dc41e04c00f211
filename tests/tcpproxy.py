"""A TCP proxy for fault tests: forwards connections until told to cut or stall them.

`cut()` closes both sides of every connection at once, as a broken link does;
`stall()` stops moving bytes while keeping the connections open, as a peer that
hangs does (the kernels keep acknowledging what fits in their buffers);
`cut_on_reply(marker, n)` cuts a connection instead of forwarding the reply that
holds its n-th marker, as a link lost at that moment of a handshake does (and,
with `then_refuse`, closes every later connection at once: a host gone for good).
"""
from __future__ import annotations

import select
import socket
import threading


class TcpProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.forwarded = 0                 # bytes client -> upstream, all connections
        self.head = bytearray()            # the first 1 MiB of them, for tests that look at the wire
        self._cut_on: tuple[bytes, int] | None = None
        self._refuse_after_cut = False
        self._refusing = threading.Event()
        self._stalled = threading.Event()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            if not select.select([self.listener], [], [], 0.05)[0]:
                continue
            client, _ = self.listener.accept()
            if self._refusing.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            t = threading.Thread(target=self._pump, args=(client, server), daemon=True)
            self._threads.append(t)
            t.start()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        replies = b""
        try:
            while not self._stop.is_set():
                if self._stalled.is_set():
                    self._stop.wait(0.05)
                    continue
                ready = select.select(list(peer), [], [], 0.05)[0]
                for s in ready:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is server and self._cut_on is not None:
                        replies += data
                        marker, n = self._cut_on
                        if replies.count(marker) >= n:
                            if self._refuse_after_cut:
                                self._refusing.set()
                            for end in (client, server):
                                end.shutdown(socket.SHUT_RDWR)
                            return
                    peer[s].sendall(data)
                    if s is client:
                        self.forwarded += len(data)
                        if len(self.head) < 1 << 20:
                            self.head += data[:(1 << 20) - len(self.head)]
        except OSError:
            return

    def wait_forwarded(self, n: int, timeout: float = 60) -> None:
        stop = threading.Event()
        for _ in range(int(timeout / 0.01)):
            if self.forwarded >= n:
                return
            stop.wait(0.01)
        raise AssertionError(f"only {self.forwarded} of {n} bytes went through the proxy")

    def cut_on_reply(self, marker: bytes, n: int, then_refuse: bool = False) -> None:
        self._cut_on = (marker, n)
        self._refuse_after_cut = then_refuse

    def stall(self) -> None:
        self._stalled.set()

    def cut(self) -> None:
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        with self._lock:
            for s in self._socks:
                s.close()
        self.listener.close()
