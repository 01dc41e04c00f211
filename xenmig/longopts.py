"""Command lines parsed as getopt_long_only does, as the real C programs do.

`-domid 5`, `--domid 5`, `-domid=5` and an unambiguous prefix `-dom 5` are
all the same option; booleans take the words `true` or `false`; integers
are base 10 only, as emum.c's parse_int (strtol(str, &end, 10), nothing
after the number): "010" is 10 and "0x10" is refused.
"""
from __future__ import annotations

import re

from dataclasses import dataclass
from typing import Any


_BASE_10 = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+")     # what strtol(.., 10) takes whole


class UsageError(Exception):
    pass


@dataclass(frozen=True)
class Opt:
    name: str
    kind: str = "str"          # str | int | bool | flag
    repeat: bool = False
    required: bool = False


def parse_bool(name: str, value: str) -> bool:
    if value == "true":
        return True
    if value == "false":
        return False
    raise UsageError(f"invalid value for -{name}: '{value}' (expected true or false)")


def parse(prog: str, argv: list[str], table: list[Opt]) -> dict[str, Any]:
    by_name = {o.name: o for o in table}
    values: dict[str, Any] = {o.name: [] if o.repeat else None for o in table}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("-") or arg in ("-", "--"):
            raise UsageError(f"{prog}: unexpected argument '{arg}'")
        key, eq, inline = arg.lstrip("-").partition("=")
        opt = by_name.get(key)
        if opt is None:
            matches = [o for o in table if o.name.startswith(key)] if key else []
            if len(matches) != 1:
                kind = "ambiguous" if matches else "unrecognized"
                raise UsageError(f"{prog}: {kind} option '{arg}'")
            opt = matches[0]
        if opt.kind == "flag":
            if eq:
                raise UsageError(f"{prog}: option '-{opt.name}' doesn't allow an argument")
            value: Any = True
        else:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"{prog}: option '-{opt.name}' requires an argument")
                inline = argv[i]
            value = _convert(opt, inline)
        if opt.repeat:
            values[opt.name].append(value)
        else:
            values[opt.name] = value
        i += 1
    for o in table:
        if o.required and values[o.name] is None:
            raise UsageError(f"{prog}: missing required option -{o.name}")
    return values


def _convert(opt: Opt, text: str) -> Any:
    if opt.kind == "bool":
        return parse_bool(opt.name, text)
    if opt.kind == "int":
        if not _BASE_10.fullmatch(text):
            raise UsageError(f"invalid value for -{opt.name}: '{text}' (expected a number)")
        return int(text, 10)
    return text
