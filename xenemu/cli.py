"""`xenemu`: the host administrator's view of the emulated hypervisor (as `xl` is)."""
from __future__ import annotations

import json
import sys

import click

from . import Host, DomainError
from .build import build
from .memory import digest_report
from .profiles import PROFILES
from .units import parse_size


def _host(root: str | None) -> Host:
    return Host(root)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--root", envvar="XENEMU_ROOT", help="host directory (default: $XENEMU_ROOT)")
@click.pass_context
def cli(ctx: click.Context, root: str | None) -> None:
    ctx.obj = _host(root)


@cli.command()
@click.argument("name")
@click.option("--memory", "memory", required=True, help="e.g. 256M, 1G")
@click.option("--image", default="zero", show_default=True, help=f"{'|'.join(PROFILES)} or a file")
@click.option("--seed", default=0, show_default=True)
@click.option("--workload", default="none", show_default=True, help="none, dirty:RATE, increment[:RATE]")
@click.option("--empty", is_flag=True, help="leave it in state building (a restore target)")
@click.option("--paused", is_flag=True, help="build it but do not start it")
@click.pass_obj
def create(host: Host, name: str, memory: str, image: str, seed: int, workload: str, empty: bool,
           paused: bool) -> None:
    """Create a domain and print its domid."""
    if empty:
        domain = host.create_domain(name, parse_size(memory), meta={"workload": workload})
    else:
        domain = build(host, name, parse_size(memory), image=image, seed=seed, workload=workload,
                       start=not paused)
    click.echo(domain.domid)


@cli.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_(host: Host, as_json: bool) -> None:
    """List domains."""
    rows = [d.describe() for d in host.domains()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    click.echo(f"{'Name':<24} {'ID':>4} {'Mem(MiB)':>9} {'State':<9} Workload")
    for r in rows:
        click.echo(f"{r['name']:<24} {r['domid']:>4} {r['memory_bytes'] >> 20:>9} {r['state']:<9} {r['workload']}")


@cli.command()
@click.argument("ref")
@click.pass_obj
def pause(host: Host, ref: str) -> None:
    host.find(ref).pause()


@cli.command()
@click.argument("ref")
@click.pass_obj
def unpause(host: Host, ref: str) -> None:
    host.find(ref).unpause()


@cli.command()
@click.argument("ref")
@click.argument("spec")
@click.pass_obj
def workload(host: Host, ref: str, spec: str) -> None:
    """Change the guest's workload: none, dirty:RATE, increment[:RATE]."""
    host.find(ref).set_workload(spec)


@cli.command()
@click.argument("ref")
@click.pass_obj
def destroy(host: Host, ref: str) -> None:
    host.find(ref).destroy()


@cli.command()
@click.argument("ref")
@click.option("--pages", is_flag=True, help="one line per page: pfn and digest")
@click.option("--context", "with_context", is_flag=True, help="also a digest of each context blob")
@click.pass_obj
def digest(host: Host, ref: str, pages: bool, with_context: bool) -> None:
    """Digest of the domain's memory (stable while paused or with workload none)."""
    import hashlib

    domain = host.find(ref)
    click.echo(digest_report(domain.memory, pages))
    if with_context:
        for name, blob in sorted(domain.context().items()):
            click.echo(f"{name} {hashlib.blake2b(blob, digest_size=16).hexdigest()}")
        if domain.vgpu_bytes:
            click.echo(f"vgpu {hashlib.blake2b(domain.vgpu_memory(), digest_size=16).hexdigest()}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except (DomainError, ValueError, OSError) as e:
        click.echo(f"xenemu: {e}", err=True)
        sys.exit(1)
