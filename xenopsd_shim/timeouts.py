"""How long the toolstack waits for a peer before it gives up, from xenopsd.conf.

Every wait of a migration has a bound, so a stalled or silent peer fails the
migration (and the source falls back) instead of hanging it. Each is a
`migration-<name>-timeout = SECONDS` line in the host's xenopsd.conf; the
defaults are the ones this project ships. emu-manager's own waits are set the
same way for it through `EMU_MANAGER_*_TIMEOUT` (see emu_manager.orchestrator).
"""
from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, fields

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)


class TimeoutConfigError(ValueError):
    pass


@dataclass(frozen=True)
class Timeouts:
    connect: float = 30.0     # TCP connect and the receiver's status line
    request: float = 30.0     # the receiver waiting for a request's head
    stall: float = 120.0      # no byte moves either way on a migration socket
    handshake: float = 300.0  # restore result, verification, commit, start
    vgpu: float = 30.0        # a VM's mem or vGPU connection (and its ACK) arriving after its vm one

    @classmethod
    def keys(cls) -> dict[str, str]:
        """Each timeout's xenopsd.conf key, by field name."""
        return {f.name: f"migration-{f.name}-timeout" for f in fields(cls)}

    @classmethod
    def from_config(cls, conf: dict[str, str]) -> "Timeouts":
        values: dict[str, float] = {}
        for name, key in cls.keys().items():
            if key not in conf:
                continue
            try:
                values[name] = float(conf[key])
            except ValueError:
                values[name] = -1.0
            if not 0 < values[name] < 1e6:
                raise TimeoutConfigError(f"{key} must be a number of seconds, not {conf[key]!r}")
        return cls(**values)

    def arm(self, sock: socket.socket) -> None:
        """Bound every blocking read and write on this socket, whichever process holds its fd.

        The socket is shared with the emulators (they write and read its fd), so the bound
        lives in the kernel: SO_SNDTIMEO/SO_RCVTIMEO make a stalled write or read fail with
        EAGAIN, and TCP_USER_TIMEOUT drops a connection whose sent data goes unacknowledged."""
        seconds = int(self.stall)
        timeval = struct.pack("ll", seconds, int((self.stall - seconds) * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(self.stall * 1000))
