"""Which compression a migration uses, decided as xapi and xenopsd decide it.

`compress` comes from the call, else from the pool's `migration-compression`
(false by default, and false for a migration to the same host). What
`compress=true` means comes from xenopsd.conf's `migration-compressor`: the
name of a compressing codec (codecs.COMPRESSORS: `stream`, external zstd, the
default, or `xenguest`, in-band). Never both.
"""
from __future__ import annotations

import json
import stat
from pathlib import Path

from xenemu import Host
from xenemu.units import parse_size

from . import codecs
from .codecs import Codec
from .log import Logger
from .timeouts import Timeouts

POOL_PARAMS = {"migration-compression": "false"}
CONFIG_NAME = "xenopsd.conf"
POOL_NAME = "pool.json"
SERVE_ADDRESS = "serve-address"     # in the host's run dir while `serve` runs
SECRET_NAME = "migration-secret"    # in the host dir: when present, senders must present it
SECRET_ENV = "XENOPSD_MIGRATION_SECRET"
MAX_CONNECTIONS_KEY = "migration-max-connections"   # connections `serve` holds at once
DEFAULT_MAX_CONNECTIONS = 64
COMPRESSOR_KEY = "migration-compressor"
ACCEPT_IN_BAND_KEY = "migration-accept-in-band"    # false: `serve` acts as a host from before in-band records
ACCEPT_DELTA_KEY = "migration-accept-delta"        # false: `serve` acts as a host from before delta records
# The source's cache of sent pages that re-sent pages go as deltas against (in-band methods only).
# 64 MiB by default, as QEMU's XBZRLE cache, and never more than the VM: that is its working set's bound.
DELTA_CACHE_KEY = "migration-delta-cache"
DEFAULT_DELTA_CACHE = "64M"
CONFIG_KEYS = (COMPRESSOR_KEY, *Timeouts.keys().values(), MAX_CONNECTIONS_KEY, ACCEPT_IN_BAND_KEY,
               ACCEPT_DELTA_KEY, DELTA_CACHE_KEY)
MAX_CONFIG = 64 << 10


class ConfigError(ValueError):
    """xenopsd.conf cannot be used; the text names the file."""


def config_path(host: Host, override: Path | None) -> Path:
    return override if override is not None else host.root / CONFIG_NAME


def load_config(path: Path, explicit: bool, log: Logger) -> dict[str, str]:
    """xenopsd.conf: `key = value` lines, `#` comments. The host's own may be missing (an empty
    config), a file named on the command line may not. An unknown key is warned of, not fatal:
    a misspelt one would otherwise leave its default in force without a word."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG + 1)        # bounded: --config /dev/zero must not eat memory
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return {}
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if len(raw) > MAX_CONFIG:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG >> 10} KiB")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise ConfigError(f"config file {path} is not a text file of `key = value` lines")
    conf: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip().strip('"')
    for key in conf:
        if key not in CONFIG_KEYS:
            log.warning(f'{path}: unknown key "{key}" ignored (known: {", ".join(CONFIG_KEYS)})')
    return conf


def compressor(conf: dict[str, str], log: Logger) -> Codec:
    """The codec `compress=true` means on this host."""
    value = conf.get(COMPRESSOR_KEY, codecs.DEFAULT.name)
    if value.lower() in codecs.COMPRESSORS:
        return codecs.CODECS[value.lower()]
    log.warning(f'unknown migration compressor "{value}", using "{codecs.DEFAULT.name}"')
    return codecs.DEFAULT


def pool_params(host: Host) -> dict[str, str]:
    try:
        stored = json.loads((host.root / POOL_NAME).read_text())
    except FileNotFoundError:
        stored = {}
    return {**POOL_PARAMS, **stored}


def set_pool_param(host: Host, key: str, value: str) -> None:
    if key not in POOL_PARAMS:
        raise ValueError(f"unknown pool parameter {key!r} (known: {', '.join(POOL_PARAMS)})")
    if key == "migration-compression" and value.lower() not in ("true", "false"):
        raise ValueError(f"migration-compression must be true or false, not {value!r}")
    params = {**pool_params(host), key: value.lower()}
    tmp = host.root / f".{POOL_NAME}.tmp"
    tmp.write_text(json.dumps(params, indent=1))
    tmp.replace(host.root / POOL_NAME)


def is_same_host(host: Host, dest: str) -> bool:
    """True when `dest` is where this very host's `serve` listens."""
    try:
        return (host.run_dir / SERVE_ADDRESS).read_text().strip() == dest.strip()
    except FileNotFoundError:
        return False


def decide(host: Host, dest: str | None, requested: bool | None, conf: dict[str, str], log: Logger) -> Codec:
    """The codec for one migration (`requested` None: the pool's setting) or suspend (`dest` None)."""
    if requested is None:
        requested = dest is not None and pool_params(host)["migration-compression"] == "true" \
            and not is_same_host(host, dest)
    return compressor(conf, log) if requested else codecs.NONE


def max_connections(conf: dict[str, str]) -> int:
    value = conf.get(MAX_CONNECTIONS_KEY, str(DEFAULT_MAX_CONNECTIONS))
    if not value.isdigit() or not 0 < int(value) < 1 << 20:
        raise ValueError(f"{MAX_CONNECTIONS_KEY} must be a positive whole number, not {value!r}")
    return int(value)


def _boolean(conf: dict[str, str], key: str) -> bool:
    value = conf.get(key, "true").lower()
    if value not in ("true", "false"):
        raise ValueError(f"{key} must be true or false, not {value!r}")
    return value == "true"


def accept_in_band(conf: dict[str, str]) -> bool:
    return _boolean(conf, ACCEPT_IN_BAND_KEY)


def accept_delta(conf: dict[str, str]) -> bool:
    return _boolean(conf, ACCEPT_DELTA_KEY)


def delta_cache(conf: dict[str, str]) -> int:
    """The bound of the source's delta cache, in bytes (0: no delta encoding)."""
    value = conf.get(DELTA_CACHE_KEY, DEFAULT_DELTA_CACHE)
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"{DELTA_CACHE_KEY} must be a size such as 64M, or 0 to turn deltas off, "
                         f"not {value!r}") from None


def read_secret(path: Path, required: bool = True) -> str | None:
    """A migration secret from a file (first line). A file that is missing (unless not
    `required`), empty or unreadable is an error: a secret named must never be silently off."""
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise ValueError(f"migration secret file {path} is not a regular file")
        text = path.read_text()
    except FileNotFoundError:
        if not required:
            return None
        raise ValueError(f"migration secret file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read migration secret file {path}: {getattr(e, 'strerror', None) or e}") from None
    secret = text.splitlines()[0].strip() if text.strip() else ""
    if not secret:
        raise ValueError(f"migration secret file {path} is empty")
    return secret


def receiver_secret(host: Host, override: Path | None) -> str | None:
    """The secret `serve` requires: a file named is required, the host's own only if present."""
    return read_secret(override, required=True) if override is not None \
        else read_secret(host.root / SECRET_NAME, required=False)
