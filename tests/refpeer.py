"""A reference xenopsd peer, written from xen-api's xenops_server.ml (VM_migrate, VM_receive_memory,
VM.receive_mem) and xenops_migrate.ml (Handshake), not from this project's code: stdlib only.

As a sender it opens the vm and mem connections with xenopsd's cookies and follows
synchronisation points 1 to 4 around a suspend image it streams as opaque bytes. As a
receiver it accepts them, answers as xenopsd does and stores the image it gets. Both keep a
transcript of every message, and fail on any byte a real peer would not expect.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import uuid as uuidlib
from pathlib import Path
from urllib.parse import quote, unquote

VERSION = "refpeer-1"
INSTANCE_ID = str(uuidlib.uuid4())
TIMEOUT = 60.0


class PeerError(Exception):
    pass


def tmp_dest_id(vm_uuid: str) -> str:
    """VM.migrate's tmp_uuid_of ~kind:`dest."""
    return vm_uuid[:24] + "000000000001"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise PeerError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def hs_send(sock: socket.socket, error: str | None = None) -> None:
    """Handshake.send: two bytes of length, big-endian, then the error text (none for Success)."""
    text = b"" if error is None else error.encode()
    sock.sendall(struct.pack(">H", len(text)) + text)


def hs_recv(sock: socket.socket) -> str | None:
    """Handshake.recv: None for Success, else the error text."""
    (length,) = struct.unpack(">H", recv_exact(sock, 2))
    return None if length == 0 else recv_exact(sock, length).decode(errors="replace")


def put(addr: tuple[str, int], path: str, cookies: dict[str, str]) -> socket.socket:
    """do_request: a PUT with cookies; nothing comes back but handshake messages."""
    sock = socket.create_connection(addr, timeout=TIMEOUT)
    cookie = "; ".join(f"{k}={quote(v, safe='')}" for k, v in cookies.items())
    sock.sendall(f"PUT {path} HTTP/1.1\r\nHost: {addr[0]}:{addr[1]}\r\nCookie: {cookie}\r\n"
                 "Connection: keep-alive\r\nUser-agent: xenopsd\r\n\r\n".encode())
    return sock


def stream(sock: socket.socket, image: Path) -> None:
    with image.open("rb") as f:
        while chunk := f.read(1 << 20):
            sock.sendall(chunk)


def send_vm(addr: tuple[str, int], vm_uuid: str, image: Path, vm_cookies: dict[str, str],
            legacy: bool = False) -> list[str]:
    """VM_migrate without a vGPU, as a sender: the transcript; PeerError when the receiver fails.
    `vm_cookies`: memory_limit and what else the vm connection carries; `legacy`: a sender from
    before mem_migration (the memory route, the image on the same connection after point 1)."""
    dest_id = tmp_dest_id(vm_uuid)
    common = {"instance_id": INSTANCE_ID, "final_id": vm_uuid, "dbg": f"refpeer-{vm_uuid}"}
    if not legacy:
        common["mem_migration"] = VERSION
    log: list[str] = []
    route = "memory" if legacy else "migrate/vm"
    with put(addr, f"/services/xenops/{route}/{dest_id}", {**common, **vm_cookies}) as vm:
        answer = hs_recv(vm)
        log.append(f"point 1: {answer or 'Success'}")
        if answer is not None:
            raise PeerError(f"point 1: {answer}")
        if legacy:
            stream(vm, image)
        else:
            with put(addr, f"/services/xenops/migrate/mem/{dest_id}", common) as mem:
                answer = hs_recv(mem)
                log.append(f"point 1-mem: {answer or 'Success'}")
                if answer is not None:
                    raise PeerError(f"point 1-mem: {answer}")
                hs_send(vm)
                log.append("point 1-mem ACK")
                stream(mem, image)
        log.append("point 2")
        hs_send(vm)
        log.append("point 3")
        answer = hs_recv(vm)
        log.append(f"point 4: {answer or 'Success'}")
        if answer is not None:
            raise PeerError(f"point 4: {answer}")
        vm.settimeout(TIMEOUT)
        rest = vm.recv(1)
        if rest:
            raise PeerError(f"an unexpected byte after point 4: {rest!r}")
    return log


class Receiver:
    """VM.receive_memory and VM.receive_mem for one migration: the image goes to `store`.

    `refuse`: the error VM_create would raise (sent at point 1). `at_point_3` runs when the
    source's all-clear arrives, before the answer (the source is paused there)."""

    def __init__(self, store: Path, refuse: str | None = None, at_point_3=lambda: None) -> None:
        self.store = store
        self.refuse = refuse
        self.at_point_3 = at_point_3
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.log: list[str] = []
        self.cookies: dict[str, dict[str, str]] = {}
        self.error: BaseException | None = None
        self.mem: dict[str, socket.socket] = {}
        self._mem_ready = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._handle, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _handle(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(TIMEOUT)
            path, cookies = self._read_request(conn)
            for prefix, handler in (("/services/xenops/migrate/vm/", self._receive_memory),
                                    ("/services/xenops/memory/", self._receive_memory),
                                    ("/services/xenops/migrate/mem/", self._receive_mem)):
                if path.startswith(prefix):
                    self.cookies[prefix.split("/")[-2]] = cookies
                    handler(conn, path[len(prefix):], cookies)
                    return
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nUser-agent: xenopsd\r\n\r\n")
            raise PeerError(f"unexpected request {path}")
        except BaseException as e:      # the test reads it
            self.error = self.error or e
        finally:
            conn.close()

    @staticmethod
    def _read_request(conn: socket.socket) -> tuple[str, dict[str, str]]:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += recv_exact(conn, 1)
            if len(head) > 65536:
                raise PeerError("request head too long")
        lines = head.decode("latin-1").split("\r\n")
        method, path, version = lines[0].split(" ")
        if method != "PUT" or version != "HTTP/1.1":
            raise PeerError(f"unexpected request line {lines[0]!r}")
        cookies = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == "cookie":
                for item in value.split(";"):
                    k, _, v = item.strip().partition("=")
                    cookies[k] = unquote(v)
        return path, cookies

    def _receive_mem(self, conn: socket.socket, vm_id: str, cookies: dict[str, str]) -> None:
        """Stores the fd, answers Success (point 1-mem) and keeps it until the restore is done."""
        done = threading.Event()
        with self._mem_ready:
            self.mem[vm_id] = conn
            self._mem_done = done
            self._mem_ready.notify_all()
        self.log.append("sent point 1-mem")
        hs_send(conn)
        done.wait(TIMEOUT)

    def _receive_memory(self, conn: socket.socket, vm_id: str, cookies: dict[str, str]) -> None:
        cookies["dbg"], int(cookies["memory_limit"])        # KeyError / ValueError, as List.assoc fails
        if self.refuse is not None:
            hs_send(conn, json.dumps(["Internal_error", self.refuse]))
            self.log.append("sent point 1: Error")
            return
        self.log.append("sent point 1")
        hs_send(conn)                                          # VM_create done
        if "mem_migration" in cookies:
            answer = hs_recv(conn)
            if answer is not None:
                raise PeerError(f"1-mem ACK: {answer}")
            self.log.append("got point 1-mem ACK")
            with self._mem_ready:
                if not self._mem_ready.wait_for(lambda: vm_id in self.mem, TIMEOUT):
                    raise PeerError("no mem connection")
                mem = self.mem.pop(vm_id)
        else:
            mem = conn
        with self.store.open("wb") as f:           # the restore: here, the image to a file
            while chunk := mem.recv(1 << 20):
                f.write(chunk)
        if mem is not conn:
            self._mem_done.set()
        self.log.append("point 2")
        answer = hs_recv(conn)
        if answer is not None:
            raise PeerError(f"point 3: {answer}")
        self.log.append("got point 3")
        self.at_point_3()
        self.log.append("sent point 4")
        hs_send(conn)                                          # unpaused
        conn.settimeout(TIMEOUT)
        rest = conn.recv(1)
        if rest:
            raise PeerError(f"an unexpected byte after point 4: {rest!r}")

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)       # wakes the accept() (close alone would not)
        except OSError:
            pass
        self.sock.close()
        self._accepting.join(TIMEOUT)
        for t in self._threads:
            t.join(TIMEOUT)
