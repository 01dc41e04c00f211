"""What a destination accepts, and the method a source picks from it (this project's extension).

xenopsd negotiates nothing: a sender that writes what the receiver cannot read
fails mid-stream. The in-band design's outlook asks for "a general table ...
that lists features supported by xenopsd such that any other xenopsd would send
data in the preferred format": `serve` publishes it as a JSON object on
`GET /services/xenops/features` (transport.FEATURES_PATH), and a source that
would send in-band records reads it first (docs/xenopsd-protocol.md).

A source ignores fields it does not know. A receiver without the route (404,
an older one), or an answer that cannot be used, counts as accepting only the
methods every xenopsd receiver reads: `none` and `stream`.
"""
from __future__ import annotations

import json
import ssl
from dataclasses import asdict, dataclass

from xenmig import compressed, libxc, libxcwalk

from . import codecs, transport
from .codecs import Codec
from .timeouts import Timeouts


@dataclass(frozen=True)
class Features:
    """The document, field by field (their JSON names); each list holds one type (ITEM_TYPES)."""
    version: str = ""                          # the receiver's project version
    stream_formats: tuple[str, ...] = ()       # libxc stream versions its restore reads ("libxc-v3")
    record_types: tuple[int, ...] = ()         # libxc record types its restore applies (refused ones left out)
    compression: tuple[str, ...] = ()          # methods whose streams it reads (codec names)
    in_band_algorithms: tuple[str, ...] = ()   # algorithms of the COMPRESSED_PAGE_DATA records it inflates


ITEM_TYPES: dict[str, type] = {"stream_formats": str, "record_types": int, "compression": str,
                               "in_band_algorithms": str}
IN_BAND_ALGORITHMS = ("zstd",)       # compressed.ALGORITHM_ZSTD, by name
DELTA_ALGORITHMS = ("xor-zstd",)     # DELTA_PAGE_DATA's algorithm 1: XOR with the page held, then zstd
DELTA_REC_TYPE = libxc.REC_TYPE_DELTA_PAGE_DATA
# What every xenopsd receiver reads: plain streams, and whole streams through zstd (the cookie).
LEGACY_METHODS = (codecs.NONE.name, codecs.STREAM.name)


def in_band(codec: Codec) -> bool:
    """A method whose xenguest writes COMPRESSED_PAGE_DATA records (`xenguest`, and any policy that
    starts xenguest with `-compress`): it needs a receiver that reads them."""
    return "-compress" in codec.emu_args


def project_version() -> str:
    # Imported here: importlib.metadata (with csv, email, zipfile) cost every shim command ~30 ms
    # of start-up at module level, and only `serve` asks.
    from importlib import metadata

    try:
        return metadata.version("xenmig")
    except metadata.PackageNotFoundError:
        return "unknown"


def published(accept_in_band: bool, accept_delta: bool = True) -> Features:
    """The document `serve` answers with; without in-band (or deltas), what a host from before
    them reads."""
    delta = accept_in_band and accept_delta
    left_out = ({compressed.REC_TYPE} if not accept_in_band else set()) | ({DELTA_REC_TYPE} if not delta else set())
    return Features(
        version=project_version(),
        stream_formats=tuple(f"libxc-v{v}" for v in libxc.IHDR_SUPPORTED_VERSIONS),
        record_types=tuple(sorted(t for t, rule in libxcwalk.RULES.items() if not rule.refused and t not in left_out)),
        compression=tuple(c.name for c in codecs.CODECS.values() if not in_band(c))
        + ((codecs.XENGUEST.name,) if accept_in_band else ()),
        in_band_algorithms=(IN_BAND_ALGORITHMS if accept_in_band else ()) + (DELTA_ALGORITHMS if delta else ()))


def to_json(features: Features) -> bytes:
    return json.dumps(asdict(features)).encode()


class FeaturesError(ValueError):
    """An answer that is not a features document; the text says why, in a few words."""


def parse(body: bytes) -> Features:
    """A destination's document: an object whose known fields have their types (a missing one
    reads as empty; unknown ones are ignored)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise FeaturesError("not JSON") from None
    if not isinstance(doc, dict):
        raise FeaturesError("not a JSON object")
    if not isinstance(doc.get("version", ""), str):
        raise FeaturesError("field 'version' is not a string")
    for name, kind in ITEM_TYPES.items():
        value = doc.get(name, [])
        if not (isinstance(value, list) and all(type(x) is kind for x in value)):      # (a bool is no int)
            raise FeaturesError(f"field {name!r} is not a list of {kind.__name__}")
    return Features(doc.get("version", ""), **{name: tuple(doc.get(name, [])) for name in ITEM_TYPES})


def ask(dest: str, cookies: dict[str, str], timeouts: Timeouts,
        tls: ssl.SSLContext | None) -> tuple[Features | None, str]:
    """The destination's document, else None and why it offers nothing. Connecting, and a refused
    secret, fail as the migration would (TransportError)."""
    try:
        body = transport.query_features(dest, cookies, timeouts, tls)
        if body is None:
            return None, "publishes no features (an older receiver)"
        return parse(body), ""
    except (transport.AnswerError, FeaturesError) as e:
        return None, f"gave no usable features answer ({e})"


def accepts_in_band(features: Features) -> bool:
    """In-band records need all three: the method listed, the record type applied, the algorithm."""
    return codecs.XENGUEST.name in features.compression and compressed.REC_TYPE in features.record_types \
        and any(a in IN_BAND_ALGORITHMS for a in features.in_band_algorithms)


def accepts_delta(features: Features) -> bool:
    """Delta records need in-band records, their type applied and their algorithm."""
    return accepts_in_band(features) and DELTA_REC_TYPE in features.record_types \
        and any(a in DELTA_ALGORITHMS for a in features.in_band_algorithms)


def delta_cache(doc: Features | None, codec: Codec, configured: int, memory: int) -> tuple[int, str]:
    """The bound of the source's delta cache for one migration (0: no deltas), and why."""
    if not in_band(codec):
        return 0, f"{codec.name} sends no in-band records"
    if configured == 0:
        return 0, "migration-delta-cache is 0"
    if doc is None or not accepts_delta(doc):
        return 0, "the destination does not accept delta records (DELTA_PAGE_DATA)"
    bound = min(configured, memory)
    return bound, f"re-sent pages may go as deltas from a cache of up to {bound >> 20} MiB"


@dataclass(frozen=True)
class Choice:
    requested: Codec
    codec: Codec             # the method used
    reason: str              # one line, for the summary and the log

    @property
    def fallback(self) -> bool:
        """Not what was asked for: the source warns."""
        return self.codec != self.requested


FALLBACK = codecs.STREAM     # an in-band method's stand-in: it compresses too, and every receiver reads it


def choose(dest: str, requested: Codec, doc: Features | None, why_none: str = "") -> Choice:
    """The method both sides support. `doc` None: the destination offered nothing (`why_none` says
    how: an older receiver, or an unusable answer)."""
    if not in_band(requested):
        return Choice(requested, requested, f"{requested.name} is read by every receiver (not negotiated)")
    if doc is None:
        return Choice(requested, FALLBACK, f"destination {dest} {why_none}: treated as accepting only "
                                           f"{' and '.join(LEGACY_METHODS)}")
    version = doc.version or "unknown"
    if not accepts_in_band(doc):
        return Choice(requested, FALLBACK, f"destination {dest} (version {version}) does not accept in-band "
                                           "compressed records (COMPRESSED_PAGE_DATA)")
    return Choice(requested, requested, f"destination {dest} (version {version}) accepts in-band compressed records")
