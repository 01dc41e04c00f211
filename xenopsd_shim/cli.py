"""`xenopsd-shim`: the toolstack's commands (VM lifecycle, migration, suspend/resume, serve)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar


import click

from xenemu import DomainError, Host
from xenemu.build import build
from xenemu.memory import digest_report
from xenemu.profiles import PROFILES
from xenemu.units import format_size, parse_rate, parse_size
from xenmig import emp, image
from xenmig.procwait import exit_now

from . import cancel, codecs, evacuate, migctl, policy, tlstunnel, transport
from .emuctl import EmuManagerError
from .imagereader import ImageReader
from .imagewriter import ImageWriter
from .log import Logger
from .migrate import MigrationError, Options, SourceMigration
from .receiver import Receiver, ReceiverError
from .timeouts import Timeouts

EXIT_FAILED = 2
MAX_ANSWER_WAIT = 3600.0         # vm-compress --timeout: seconds, an hour at most (emu-manager answers in seconds)
T = TypeVar("T")


class Ctx:
    def __init__(self, root: str | None, verbose: bool, config: Path | None) -> None:
        self.host = Host(root)
        self.config = policy.config_path(self.host, config)
        os.environ["XENEMU_ROOT"] = str(self.host.root)     # emu-manager and xenguest find the host here
        self.log = Logger(self.host.root / "xenopsd.log", verbose)
        self.conf = policy.load_config(self.config, explicit=config is not None, log=self.log)

    def _setting(self, read: Callable[[dict[str, str]], T]) -> T:
        """A value from xenopsd.conf: a bad one is one line naming the file."""
        try:
            return read(self.conf)
        except ValueError as e:         # TimeoutConfigError included
            raise click.ClickException(f"{self.config}: {e}") from None

    @property
    def max_connections(self) -> int:
        return self._setting(policy.max_connections)

    @property
    def accept_in_band(self) -> bool:
        return self._setting(policy.accept_in_band)

    @property
    def accept_delta(self) -> bool:
        return self._setting(policy.accept_delta)

    @property
    def delta_cache(self) -> int:
        return self._setting(policy.delta_cache)

    @property
    def timeouts(self) -> Timeouts:
        return self._setting(Timeouts.from_config)


def _progress(label: str):  # type: ignore[no-untyped-def]
    """A progress bar on a terminal, fed by emu-manager's info: messages; silent otherwise."""
    if not sys.stderr.isatty():
        return lambda p, s: None

    def show(percent: int, status: str) -> None:
        bar = "#" * (percent // 4)
        sys.stderr.write(f"\r{label} [{bar:<25}] {percent:3d}%" + (f" {status}\x1b[K" if status else ""))
        if percent >= 100:
            sys.stderr.write("\n")
        sys.stderr.flush()
    return show


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="XENEMU_ROOT", help="host directory (default: $XENEMU_ROOT)")
@click.option("-v", "--verbose", is_flag=True, help="log to stderr as well as to ROOT/xenopsd.log")
@click.option("--config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="xenopsd.conf to read (default: ROOT/xenopsd.conf)")
@click.pass_context
def cli(ctx: click.Context, root: str | None, verbose: bool, config: Path | None) -> None:
    ctx.obj = Ctx(root, verbose, config)


@cli.command("pool-param-set")
@click.argument("assignment", metavar="KEY=VALUE")
@click.pass_obj
def pool_param_set(ctx: Ctx, assignment: str) -> None:
    """Set a pool parameter, e.g. migration-compression=true."""
    key, eq, value = assignment.partition("=")
    if not eq:
        raise click.UsageError("expected KEY=VALUE, e.g. migration-compression=true")
    policy.set_pool_param(ctx.host, key.strip(), value.strip())


@cli.command("pool-param-get")
@click.argument("key")
@click.pass_obj
def pool_param_get(ctx: Ctx, key: str) -> None:
    params = policy.pool_params(ctx.host)
    if key not in params:
        raise click.UsageError(f"unknown pool parameter {key!r}")
    click.echo(params[key])


@cli.command("vm-create")
@click.argument("name")
@click.option("--memory", required=True, help="e.g. 512M, 1G")
@click.option("--image", default="mixed", show_default=True, help=f"{'|'.join(PROFILES)}, or a file")
@click.option("--workload", default="none", show_default=True, help="none, dirty:RATE, increment[:RATE]")
@click.option("--seed", default=0, show_default=True)
@click.option("--vgpu", default=None, help="give the VM an emulated GPU with this much memory, e.g. 64M")
@click.pass_obj
def vm_create(ctx: Ctx, name: str, memory: str, image: str, workload: str, seed: int, vgpu: str | None) -> None:
    """Create and start a VM; prints its uuid."""
    domain = build(ctx.host, name, parse_size(memory), image=image, workload=workload, seed=seed,
                   vgpu_bytes=parse_size(vgpu) if vgpu else 0)
    click.echo(domain.uuid)


@cli.command("vm-list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def vm_list(ctx: Ctx, as_json: bool) -> None:
    rows = [d.describe() for d in ctx.host.domains()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    for r in rows:
        click.echo(f"{r['name']:<20} {r['uuid']} domid {r['domid']:<4} {r['state']:<8} "
                   f"{format_size(r['memory_bytes']):>10} {r['workload']}")


@cli.command("vm-destroy")
@click.argument("name")
@click.pass_obj
def vm_destroy(ctx: Ctx, name: str) -> None:
    ctx.host.find(name).destroy()


@cli.command("vm-digest")
@click.argument("name")
@click.option("--pages", is_flag=True, help="one line per page: pfn and digest")
@click.pass_obj
def vm_digest(ctx: Ctx, name: str, pages: bool) -> None:
    """Digest of the VM's memory; stable while it is paused or its workload is none."""
    click.echo(digest_report(ctx.host.find(name).memory, pages))


@cli.command()
@click.option("--listen", default="127.0.0.1:8090", show_default=True, help="HOST:PORT to accept migrations on")
@click.option("--secret-file", type=click.Path(path_type=Path), default=None,
              help="require this secret of senders; it must exist and be readable "
                   "(default: ROOT/migration-secret, if it exists)")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="accept only TLS, with this certificate (PEM)")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="the certificate's private key (PEM)")
@click.option("--in-band/--no-in-band", default=None,
              help=f"accept xenguest's in-band compressed records (default: {policy.ACCEPT_IN_BAND_KEY} "
                   "in xenopsd.conf, else yes); without, act as a host from before them")
@click.option("--delta/--no-delta", default=None,
              help=f"accept delta records of re-sent pages (default: {policy.ACCEPT_DELTA_KEY} in xenopsd.conf, "
                   "else yes); without, act as a host from before them")
@click.pass_obj
def serve(ctx: Ctx, listen: str, secret_file: Path | None, tls_cert: Path | None, tls_key: Path | None,
          in_band: bool | None, delta: bool | None) -> None:
    """Receive migrations until SIGTERM or SIGINT."""
    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")
    tls = tlstunnel.server_context(tls_cert, tls_key) if tls_cert and tls_key else None
    receiver = Receiver(ctx.host, listen, ctx.log, secret=policy.receiver_secret(ctx.host, secret_file),
                        timeouts=ctx.timeouts, tls=tls, max_connections=ctx.max_connections,
                        accept_in_band=ctx.accept_in_band if in_band is None else in_band,
                        accept_delta=ctx.accept_delta if delta is None else delta)
    receiver.serve_forever(ready=lambda: click.echo(f"listening on {receiver.address}", err=True))


def _sender_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options of a migration's sender: vm-migrate's, and host-evacuate's to pass on to it."""
    for option in reversed([
            click.option("--dest", required=True, help="HOST:PORT of the destination's `serve`"),
            click.option("--compress/--no-compress", default=None, help="compress the stream (default: pool setting)"),
            click.option("--max-bandwidth", default=None, help="cap the link, e.g. 125MB/s (kernel socket pacing)"),
            click.option("--json", "as_json", is_flag=True, help="print a JSON summary at the end"),
            click.option("--secret-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                         help=f"the destination's migration secret (or ${policy.SECRET_ENV})"),
            click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                         help="use TLS, trusting this CA or self-signed certificate (PEM) for the destination")]):
        command = option(command)
    return command


@cli.command("vm-migrate")
@click.argument("name")
@_sender_options
@click.option("--live/--non-live", default=True, show_default=True)
@click.option("--verify", is_flag=True, help="the destination checks every page against the pause point")
@click.pass_obj
def vm_migrate(ctx: Ctx, name: str, dest: str, compress: bool | None, live: bool, verify: bool,
               max_bandwidth: str | None, as_json: bool, secret_file: Path | None, tls_ca: Path | None) -> None:
    """Migrate a running VM to another host."""
    domain = ctx.host.find(name)
    codec = policy.decide(ctx.host, dest, compress, ctx.conf, ctx.log)
    summary = SourceMigration(ctx.host, domain, dest, Options(live=live, verify=verify, codec=codec,
                                      max_bandwidth=parse_rate(max_bandwidth) if max_bandwidth else None,
                                      secret=policy.read_secret(secret_file) if secret_file
                                      else os.environ.get(policy.SECRET_ENV), timeouts=ctx.timeouts,
                                      tls=tlstunnel.client_context(tls_ca) if tls_ca else None,
                                      delta_cache=ctx.delta_cache), ctx.log,
                              on_info=_progress(f"migrating {name}")).run()
    click.echo(json.dumps(summary) if as_json else _migrated(name, dest, summary))


def _migrated(name: str, dest: str, summary: dict) -> str:
    """vm-migrate's line for a migrated VM (host-evacuate prints one per VM)."""
    return (f"{name} migrated to {dest} in {summary['total_seconds']:.2f} s "
            f"(downtime {summary['downtime_seconds']:.3f} s, {summary['iterations']} iterations, "
            f"{format_size(summary['wire_bytes'])} on the wire)")


@cli.command("host-evacuate")
@_sender_options
@click.option("--parallel", default=None, metavar="N",
              help=f"migrations at once (default {evacuate.DEFAULT_PARALLEL}, xapi's evacuation-batch-size)")
@click.pass_context
def host_evacuate(click_ctx: click.Context, dest: str, parallel: str | None, compress: bool | None,
                  max_bandwidth: str | None, as_json: bool, secret_file: Path | None, tls_ca: Path | None) -> None:
    """Live-migrate every running VM of this host to DEST, N at a time (as `xe host-evacuate`)."""
    ctx: Ctx = click_ctx.obj
    if max_bandwidth:
        parse_rate(max_bandwidth)               # a bad value is one line now, not one per VM
    if secret_file:
        policy.read_secret(secret_file)
    top = click_ctx.find_root().params
    shim_args = ["--root", str(ctx.host.root), *(["--config", str(top["config"].resolve())] if top["config"] else []),
                 *(["-v"] if top["verbose"] else [])]
    migrate_args = [*([] if compress is None else ["--compress" if compress else "--no-compress"]),
                    *(["--max-bandwidth", max_bandwidth] if max_bandwidth else []),
                    *(["--secret-file", str(secret_file.resolve())] if secret_file else []),
                    *(["--tls-ca", str(tls_ca.resolve())] if tls_ca else [])]
    evacuate.evacuate_host(ctx.host, ctx.log, evacuate.Request(dest, evacuate.parse_parallel(parallel), shim_args,
                                                              migrate_args), as_json, _migrated)


@cli.command("vm-compress")
@click.argument("name")
@click.argument("mode", type=click.Choice(emp.COMPRESS_MODES))
@click.option("--level", type=click.IntRange(emp.MIN_LEVEL, emp.MAX_LEVEL), default=None,
              help="zstd level (default: the one in force)")
@click.option("--timeout", type=click.FloatRange(0, MAX_ANSWER_WAIT, min_open=True), default=15.0, show_default=True,
              help="seconds to wait for the answer")
@click.pass_obj
def vm_compress(ctx: Ctx, name: str, mode: str, level: int | None, timeout: float) -> None:
    """Switch in-band compression of a running migration: off, on, or auto (xenguest decides per batch)."""
    domain = ctx.host.find(name)
    try:
        answer = migctl.request(ctx.host.migration_socket(domain.domid), mode, level, timeout)
    except migctl.ControlSocketError as e:
        raise click.ClickException(f"VM {name}: {e}") from None
    applied, level_now, first = answer.split()[:3]
    click.echo(f"VM {name}: in-band compression {applied} (level {level_now}) from pass {first}")


@cli.command("vm-suspend")
@click.argument("name")
@click.option("--to", "path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--compress/--no-compress", default=False, show_default=True,
              help="compress the image with the configured migration-compressor")
@click.pass_obj
def vm_suspend(ctx: Ctx, name: str, path: Path, compress: bool) -> None:
    """Suspend a VM to a suspend image; the VM is gone from the host after."""
    domain = ctx.host.find(name)
    if domain.vgpu_bytes:
        raise click.UsageError("a VM with a vGPU cannot be suspended to a file (its stream needs its own fd)")
    codec = policy.decide(ctx.host, None, compress, ctx.conf, ctx.log)
    was_running = domain.state == "running"
    # O_APPEND, as xenopsd opens suspend files: emu-manager refuses a file it could write at random.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
    wrap = codec.sender(fd)
    assert wrap.fd is not None
    writer = ImageWriter(domain, wrap.fd, live=False, codec=codec, log=ctx.log,
                         on_info=_progress(f"suspending {name}"))
    try:
        writer.run()
        writer.close()
        wrap.finish()
        os.fsync(fd)
    except BaseException:
        writer.close()
        failure = wrap.settle()
        wrap.stop()
        os.close(fd)
        path.unlink(missing_ok=True)
        if was_running and domain.state == "paused":
            domain.unpause()
        if failure:
            raise codecs.CodecError(failure) from None
        raise
    os.close(fd)
    domain.destroy()


@cli.command("vm-resume")
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", default=None, help="name for the resumed VM (default: the image's)")
@click.pass_obj
def vm_resume(ctx: Ctx, path: Path, name: str | None) -> None:
    """Create a VM from a suspend image (plain or zstd-compressed) and start it; prints its uuid."""
    with open(path, "rb") as f:
        wrap = codecs.from_head(os.pread(f.fileno(), codecs.MAGIC_SIZE, 0)).receiver(f.fileno())
        assert wrap.fd is not None
        domain = None
        try:
            domain = ImageReader(ctx.host, wrap.fd, log=ctx.log, name=name).run()
            wrap.finish()
        except (image.ImageError, *codecs.ERRORS) as e:
            failure = wrap.failure()
            if domain is not None:
                domain.destroy()
            raise image.ImageError(failure or str(e)) from None
        finally:
            wrap.stop()
    domain.unpause()
    click.echo(domain.uuid)


def main() -> None:
    cancel.install()
    code = 0
    try:
        cli.main(standalone_mode=False)
    except cancel.Cancelled as e:
        click.echo(f"xenopsd-shim: cancelled by {e.signame}", err=True)
        code = e.exit_code
    except click.exceptions.Abort:          # an end of input at a prompt
        click.echo("xenopsd-shim: interrupted", err=True)
        code = 130
    except click.ClickException as e:
        e.show()
        code = e.exit_code
    except MigrationError as e:
        click.echo(f"xenopsd-shim: {e}", err=True)
        code = e.exit_code or EXIT_FAILED
    except (DomainError, image.ImageError, EmuManagerError, transport.TransportError, *codecs.ERRORS, ValueError,
            tlstunnel.TlsError, ReceiverError, OSError) as e:
        text = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.filename else str(e)
        click.echo(f"xenopsd-shim: {text}", err=True)
        code = EXIT_FAILED
    exit_now(code)      # every command has released what it holds: skip the interpreter's teardown


