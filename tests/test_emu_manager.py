"""emu-manager on its own: the test plays xenopsd over real pipes, as the real one does."""
from __future__ import annotations

import json
import os
import re
import select
import socket
import subprocess
import threading
import time

import pytest

from conftest import HostDir, ProcessWatcher, argv_of, exe
from xenmig import control


class Xenopsd:
    """The toolstack end of emu-manager's control pipes."""

    def __init__(self, host: HostDir, *args: str, stream_fd: int | None = None, more_fds: tuple[int, ...] = ()) -> None:
        to_emu_r, self.to_emu = os.pipe()
        self.from_emu, from_emu_w = os.pipe()
        fds = [to_emu_r, from_emu_w, *more_fds] + ([stream_fd] if stream_fd is not None else [])
        argv = [exe("emu-manager"), "-controloutfd", str(from_emu_w), "-controlinfd", str(to_emu_r), *args]
        self.proc = subprocess.Popen(argv, env=host.env, pass_fds=fds, stderr=subprocess.PIPE, text=True)
        os.close(to_emu_r)
        os.close(from_emu_w)
        self.buf = b""
        self.received: list[str] = []

    def recv(self, timeout: float = 60) -> str | None:
        """The next control line, or None at EOF."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.from_emu], [], [], max(0, deadline - time.monotonic()))
            assert ready, f"no control message within {timeout} s"
            data = os.read(self.from_emu, 4096)
            if not data:
                return None
            self.buf += data
        line, _, self.buf = self.buf.partition(b"\n")
        self.received.append(line.decode())
        return line.decode()

    def send(self, line: str) -> None:
        os.write(self.to_emu, (line + "\n").encode())

    def finish(self, timeout: float = 60) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        rest = []
        while (line := self.recv()) is not None:
            rest.append(line)
        os.close(self.to_emu)
        os.close(self.from_emu)
        return code, self.proc.stderr.read()


@pytest.mark.parametrize("args", [
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-live", "maybe"],
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-bogus", "1"],
    ["-mode", "hvm_save", "-fd", "0"],
    ["-mode", "fly", "-domid", "1", "-fd", "0"],
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-compress", "yes"],
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-d", "1"],        # ambiguous prefix: -debuglog, -dm, -domid
    ["-mode", "hvm_save", "-domid", "0x1", "-fd", "0"],                 # base 10 only (emum.c parse_int)
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-dm", "qemu_trad"],   # emum.c: Bad dm arg
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-dm", "qemu:3"],
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-delta-cache", "-1"],    # ours: a bound in bytes
    ["-mode", "hvm_save", "-domid", "1", "-fd", "0", "-delta-cache", "64M"],
])
def test_bad_arguments_exit_1_with_nothing_on_the_control_pipe(hosts, args):
    x = Xenopsd(hosts(), *args)
    code, err = x.finish()
    assert code == 1
    assert x.received == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@pytest.mark.parametrize("spelling", ["-supports", "--supports", "-sup", "-supports=migration-v2"])
def test_supports_migration_v2(hosts, spelling):
    h = hosts()
    argv = [spelling] if "=" in spelling else [spelling, "migration-v2"]
    out = h.run("emu-manager", *argv)
    assert out.stdout == "true\n"
    assert h.run("emu-manager", "-supports", "time-travel").stdout == "false\n"


def test_abort_mid_save_exits_2_and_leaves_no_children(hosts):
    h = hosts()
    domid = h.create("vm", "128M", workload="increment")
    stream_r, stream_w = os.pipe()          # nobody reads yet: xenguest is held mid-iteration 0
    x = Xenopsd(h, "-fd", str(stream_w), "-mode", "hvm_save", "-domid", str(domid), "-live", "true",
                "-dm", "qemu", stream_fd=stream_w)
    os.close(stream_w)
    assert x.recv() == "prepare:xenguest"
    x.send("done")
    assert x.recv() == "info:\\b\\b\\b\\b0"                     # from xenguest's first event
    assert len(os.read(stream_r, 65536)) > 0                  # the stream has started
    children = [p for p in h.processes() if "xenguest" in " ".join(p.cmdline()[:2])]
    assert len(children) == 1
    x.send("abort")
    os.close(stream_r)                                         # as xenopsd drops the migration's fd
    code, err = x.finish()
    assert code == 2
    assert len(x.received) == 2, x.received                   # nothing reported after the abort
    assert not any(c.is_running() for c in children)
    assert h.domains()[0]["state"] == "running"               # never asked to suspend: the VM runs on


def test_unexpected_done_is_a_protocol_error(hosts, tmp_path):
    h = hosts()
    domid = h.create("vm", "16M")
    with open(tmp_path / "stream", "ab") as stream:
        x = Xenopsd(h, "-fd", str(stream.fileno()), "-mode", "hvm_save", "-domid", str(domid), "-live", "false",
                    stream_fd=stream.fileno())
        assert x.recv() == "suspend:"
        x.send("done")
        assert x.recv() == "prepare:xenguest"
        x.send("done")
        x.send("done")                     # nobody asked for this one
        while (line := x.recv()) is not None and not line.startswith("error:"):
            pass
        code, _ = x.finish()
    assert line is not None and "protocol error" in line
    assert code == 2


def test_nonlive_save_sequence_and_compress_forwarded(hosts, tmp_path):
    """-compress, and our -delta-cache, reach xenguest as given."""
    h = hosts()
    domid = h.create("vm", "32M")
    watcher = ProcessWatcher()
    with open(tmp_path / "stream", "ab") as stream:
        x = Xenopsd(h, "-fd", str(stream.fileno()), "-mode", "hvm_save", "-domid", f"0{domid}", "-live", "false",
                    "-compress", "true", "-debuglog", "no", "-delta-cache", "1048576", stream_fd=stream.fileno())
        assert x.recv() == "suspend:"
        x.send("done")
        assert x.recv() == "prepare:xenguest"
        x.send("done")
        while (line := x.recv()) is not None and line.startswith("info:"):
            pass
        assert line == "result:0 0"
        code, _ = x.finish()
    assert code == 0
    assert argv_of(watcher.stop(), h.root, "xenguest") == [[
        "xenguest", "-debug", "-domid", str(domid), "-controloutfd", "2", "-controlinfd", "0", "-mode", "listen",
        "-compress", "true", "-delta-cache", "1048576"]]
    assert (tmp_path / "stream").read_bytes()[:8] == b"\xff" * 8


# -- EMP on the wire: what the real emu-manager writes (em-client.c) ------------------------------
class Emulator:
    """An emulator started as emu-manager starts it, driven over its socket by the test."""

    def __init__(self, host: HostDir, domid: int, *extra: str) -> None:
        self.proc = subprocess.Popen([exe("xenguest"), "-debug", "-domid", str(domid), "-controloutfd", "2",
                                      "-controlinfd", "0", "-mode", "listen", *extra], env=host.env,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline() == "Ready\n"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(host.root / "run" / f"xenguest-control-{domid}"))
        self.buf = b""
        self.decoder = json.JSONDecoder()

    def send(self, raw: bytes, fds: list[int] | None = None) -> None:
        if fds:
            socket.send_fds(self.sock, [raw], fds)
        else:
            self.sock.sendall(raw)

    def recv(self, timeout: float = 30) -> dict:
        """The next JSON value, however the emulator frames it."""
        while True:
            text = self.buf.decode().lstrip()
            try:
                value, end = self.decoder.raw_decode(text)
                self.buf = text[end:].encode()
                return value
            except ValueError:
                pass
            ready, _, _ = select.select([self.sock], [], [], timeout)
            assert ready, f"no EMP message within {timeout} s"
            data = self.sock.recv(65536)
            assert data, "emulator closed the socket"
            self.buf += data

    def finish(self, timeout: float = 30) -> tuple[int, str]:
        self.sock.close()
        code = self.proc.wait(timeout=timeout)
        return code, self.proc.stderr.read()


def request(command: str, **arguments: str) -> bytes:
    """A request spelled as em-client.c spells it: spaces, no line terminator."""
    if not arguments:
        return f'{{ "execute" : "{command}"}}'.encode()
    args = ", ".join(f'"{k}":"{v}"' for k, v in arguments.items())
    return f'{{ "execute" : "{command}", "arguments" : {{ {args} }} }}'.encode()


def test_emp_requests_are_framed_by_json_value_not_by_line(hosts, tmp_path):
    h = hosts()
    domid = h.create("vm", "16M")
    emu = Emulator(h, domid)
    fd = os.open(tmp_path / "stream", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    emu.send(request("migrate_init"), [fd])
    os.close(fd)
    assert emu.recv() == {"return": {}}
    emu.send(request("track_dirty") + request("migrate_progress"))     # two requests in one write
    assert [emu.recv(), emu.recv()] == [{"return": {}}, {"return": {}}]
    emu.send(request("set_args", vgpu="true", pv="false"))
    assert emu.recv() == {"return": {}}
    emu.send(request("quit"))
    assert emu.recv() == {"return": {}}
    code, err = emu.finish()
    assert code == 0, err


def test_emp_endless_value_is_one_line_error(hosts):
    h = hosts()
    domid = h.create("vm", "16M")
    emu = Emulator(h, domid)
    try:
        emu.send(b'{ "execute" : "set_args", "arguments" : { "store_port" : "' + b"1" * (256 << 10))
    except (BrokenPipeError, ConnectionResetError):
        pass                   # it gave up before reading it all, as it should
    code, err = emu.finish()
    assert code == 2
    assert "EMP message longer than" in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if "error" in line.lower()]) == 1, err


# -- the order of messages (emum.c, operation_save) --------------------------------------------------
def transcript(err: str) -> list[str]:
    """What emu-manager sent, to xenopsd and to each emulator, in order (its -debuglog lines);
    progress is left out."""
    sent = [line.split(": -> ", 1)[1] for line in err.splitlines() if ": -> " in line]
    return [line for line in sent if not line.startswith("xenopsd: info:")]


def play_xenopsd(x: Xenopsd) -> str:
    """Ack every request until the end; the final line (result or error)."""
    while (line := x.recv()) is not None:
        if line in ("suspend:", "prepare:xenguest", "prepare:vgpu"):
            x.send("done")
        elif not line.startswith("info:"):
            return line
    return ""


def append_only(path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)


def saved(h: HostDir, tmp_path, domid: int, *args: str, vgpu: bool = False) -> str:
    """A save with every request acked, to O_APPEND files; emu-manager's log."""
    fds = [append_only(tmp_path / "stream")] + ([append_only(tmp_path / "vgpu")] if vgpu else [])
    x = Xenopsd(h, "-fd", str(fds[0]), "-mode", "hvm_save", "-domid", str(domid), *args, "-debuglog", "true",
                *(["-dm", f"vgpu:{fds[1]}"] if vgpu else []), stream_fd=fds[0], more_fds=tuple(fds[1:]))
    for fd in fds:
        os.close(fd)
    assert play_xenopsd(x) == "result:0 0"
    code, err = x.finish()
    assert code == 0, err
    return err


def vgpu_vm(h: HostDir) -> int:
    subprocess.run([exe("xenopsd-shim"), "vm-create", "vm1", "--memory", "16M", "--vgpu", "4M"], env=h.env,
                   check=True, capture_output=True)
    return h.domains()[0]["domid"]


def test_live_save_order_emu_manager_decides_when_precopy_is_done(hosts, tmp_path):
    h = hosts()
    domid = h.create("vm", "32M", workload="increment")
    err = saved(h, tmp_path, domid, "-live", "true", "-dm", "qemu")
    assert transcript(err) == [
        "xenguest: migrate_init", "xenguest: track_dirty", "xenguest: migrate_progress",
        "xenopsd: prepare:xenguest", "xenguest: migrate_live",
        "xenopsd: suspend:", "xenguest: migrate_pause", "xenguest: migrate_paused",
        "xenopsd: result:0 0", "xenguest: quit"], err
    events = re.findall(r"xenguest: iteration (-?\d+) sent (-?\d+) remaining (-?\d+)", err)
    assert events[0] == ("0", "0", "8192"), events          # the p2m size, nothing sent yet
    assert events[1][0] == "1" and events[1][1] == "8192", events
    # the decision is emu-manager's: the pause came after the first event meeting emum.c's rule
    done_at = next(i for i, (it, _, rem) in enumerate(events) if int(it) > 0 and (int(rem) < 50 or int(it) >= 4))
    assert err.index("-> xenopsd: suspend:") > err.index(
        "xenguest: iteration {} sent {} remaining {}".format(*events[done_at]))


def test_live_save_order_with_vgpu(hosts, tmp_path):
    h = hosts()
    err = saved(h, tmp_path, vgpu_vm(h), "-live", "true", vgpu=True)
    assert transcript(err) == [
        "xenguest: migrate_init", "xenguest: set_args", "vgpu: migrate_init",
        "xenguest: track_dirty", "xenguest: migrate_progress", "vgpu: track_dirty", "vgpu: migrate_progress",
        "xenopsd: prepare:xenguest", "xenguest: migrate_live", "xenopsd: prepare:vgpu", "vgpu: migrate_live",
        "xenopsd: suspend:", "xenguest: migrate_pause", "vgpu: migrate_pause",
        "xenguest: migrate_paused", "vgpu: migrate_paused",
        "xenopsd: result:0 0", "xenguest: quit", "vgpu: quit"], err
    assert "<- set_args {'vgpu': 'true'}" in err, err


def test_emulators_cpu_reported_after_the_result_then_exit(hosts, tmp_path):
    """Our extension: after `result:`, each emulator's CPU (from wait4 once reaped), then EOF."""
    h = hosts()
    fds = [append_only(tmp_path / "stream"), append_only(tmp_path / "vgpu")]
    x = Xenopsd(h, "-fd", str(fds[0]), "-mode", "hvm_save", "-domid", str(vgpu_vm(h)), "-live", "false",
                "-dm", f"vgpu:{fds[1]}", stream_fd=fds[0], more_fds=(fds[1],))
    for fd in fds:
        os.close(fd)
    assert play_xenopsd(x) == "result:0 0"
    rest = []
    while (line := x.recv()) is not None:
        rest.append(line)
    reports = [control.parse_cpu(line) for line in rest]
    assert [emu for emu, _ in reports] == ["xenguest", "vgpu"], rest
    assert all(seconds > 0 for _, seconds in reports), rest
    code, err = x.finish()
    assert code == 0, err


def test_nonlive_save_order_pause_then_each_emulator_in_turn(hosts, tmp_path):
    h = hosts()
    err = saved(h, tmp_path, vgpu_vm(h), "-live", "false", vgpu=True)
    assert transcript(err) == [
        "xenguest: migrate_init", "xenguest: set_args", "vgpu: migrate_init",
        "xenopsd: suspend:", "xenguest: migrate_pause", "vgpu: migrate_pause",
        "xenguest: migrate_paused", "vgpu: migrate_paused",
        "xenopsd: prepare:xenguest", "xenguest: migrate_nonlive",
        "xenopsd: prepare:vgpu", "vgpu: migrate_nonlive",
        "xenopsd: result:0 0", "xenguest: quit", "vgpu: quit"], err
    # xenguest was told of the vGPU (emum.c, configure_emus); and it finished before vgpu started
    assert "<- set_args {'vgpu': 'true'}" in err, err
    assert err.index("xenguest: completed") < err.index("-> xenopsd: prepare:vgpu"), err


def test_xenguest_accepts_only_its_set_args_and_restore_needs_the_ports(hosts, tmp_path):
    h = hosts()
    domid = h.empty("vm", "16M")
    (tmp_path / "stream").write_bytes(b"")
    emu = Emulator(h, domid)
    fd = os.open(tmp_path / "stream", os.O_RDONLY)
    emu.send(request("migrate_init"), [fd])
    os.close(fd)
    assert emu.recv() == {"return": {}}
    for bad in (request("set_args", memory_pnode="1"), request("set_args", store_port="0x10"),
                request("set_args", pv="yes"), request("set_args"), b'{"execute":"set_args","arguments":{}}'):
        emu.send(bad)
        assert "error" in emu.recv(), bad
    emu.send(request("set_args", store_port="010"))          # base 10, as strtol(.., 10)
    assert emu.recv() == {"return": {}}
    emu.send(request("restore"))                              # no console_port yet
    reply = emu.recv()
    assert "Missing options" in reply.get("error", ""), reply
    emu.send(request("quit"))
    assert emu.recv() == {"return": {}}
    code, err = emu.finish()
    assert code == 0, err
    assert h.domains()[0]["state"] == "building"


@pytest.mark.parametrize("dm", [False, True])
def test_stream_file_without_o_append_is_refused(hosts, tmp_path, dm):
    h = hosts()
    domid = h.create("vm", "16M")
    good, bad = append_only(tmp_path / "good"), os.open(tmp_path / "bad", os.O_WRONLY | os.O_CREAT, 0o600)
    main, vgpu = (good, bad) if dm else (bad, good)
    x = Xenopsd(h, "-fd", str(main), "-mode", "hvm_save", "-domid", str(domid), "-live", "true",
                *(["-dm", f"vgpu:{vgpu}"] if dm else []), stream_fd=main, more_fds=(vgpu,))
    code, err = x.finish()
    os.close(good)
    os.close(bad)
    assert code == 1 and x.received == []
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert f"Failed to validate stream {bad} for {'vgpu' if dm else 'xenguest'}: Device not a stream" in err, err
    assert h.domains()[0]["state"] == "running"


def test_xenguest_events_as_libxc_counts_and_iterates_until_told(hosts):
    h = hosts()
    domid = h.create("vm", "8M", workload="increment")       # every page stays dirty: never converges
    emu = Emulator(h, domid)
    stream_r, stream_w = os.pipe()
    events: list[dict] = []

    def reply() -> dict:
        while "event" in (value := emu.recv()):
            events.append(value["data"])
        return value

    emu.send(request("migrate_init"), [stream_w])
    os.close(stream_w)
    assert reply() == {"return": {}}
    for command in ("track_dirty", "migrate_progress", "migrate_live"):
        emu.send(request(command))
        assert reply() == {"return": {}}
    time.sleep(0.8)             # the first pass waits on the pipe past xenguest's 500 ms progress interval
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: os.read(stream_r, 1 << 20), b"")])
    drain.start()
    # Past emum.c's 4 and libxc's own 5, unless a pass finds nothing dirty (a starved guest):
    # then xenguest stops by itself, as the real one does.
    passes: list[dict] = []        # our extension: each pass's figures, beside libxc's events

    def next_event() -> None:
        message = emu.recv()
        {"MIGRATION": events, "XENMIG_ITERATION": passes}.get(message["event"], []).append(message["data"])

    while not events or (events[-1].get("iteration", 0) < 6 and events[-1].get("remaining") != 0):
        next_event()
    emu.send(request("migrate_pause"))
    assert reply() == {"return": {}}
    emu.send(request("migrate_paused"))
    assert reply() == {"return": {}}
    while not events or "status" not in events[-1]:
        next_event()
    assert events[-1] == {"status": "completed", "result": "0 0"}, events[-1]
    emu.send(request("quit"))
    assert reply() == {"return": {}}
    code, err = emu.finish()
    drain.join()
    os.close(stream_r)
    assert code == 0, err
    assert events[0] == {"sent": 0, "remaining": 2048, "iteration": 0}     # the p2m size, nothing sent
    first_pass = events[1:events.index(next(e for e in events if e.get("iteration") == 1))]
    assert first_pass and all(e["remaining"] == -1 and e["iteration"] == 0 for e in first_pass), events[:5]
    counted = [e for e in events if e.get("remaining", -1) >= 0]
    assert [e["iteration"] for e in counted] == list(range(len(counted))), counted
    assert counted[-1]["iteration"] >= 6 or counted[-1]["remaining"] == 0, counted
    # libxc's total_written: each pass adds the dirty count it was asked to send
    assert all(b["sent"] == a["sent"] + a["remaining"] for a, b in zip(counted, counted[1:])), counted
    # One report per pass, the final one last; each pre-copy pass sent what libxc's count said.
    assert [p["iteration"] for p in passes] == list(range(len(passes))), passes
    assert [p["pages"] for p in passes[:-1]] == [a["remaining"] for a in counted][:len(passes) - 1], (passes, counted)
