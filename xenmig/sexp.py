"""The S-expressions of OCaml's sexplib, as far as xenopsd's Xenops record needs them.

The real xenopsd prints the record with `Sexp.to_string` (sexplib0's machine
form) and reads it with `Sexp.of_string`. This module prints exactly that
form and parses atoms, quoted atoms with sexplib's escapes, and lists,
with nesting depth and atom count bounded. Comments (`;`, `#|...|#`, `#;`)
and anything else give a one-line `SexpError`: xenopsd never writes them.

An atom is a `str` whose characters are bytes (latin-1), as OCaml strings are.
"""
from __future__ import annotations

import re
from typing import Union

Sexp = Union[str, list["Sexp"]]

MAX_DEPTH = 64               # the Xenops record nests 3 deep; a VM's own metadata a little more
MAX_ATOMS = 1 << 16

# sexplib0 Printing_helpers.must_escape: empty, a delimiter, a control or
# non-ASCII byte (space included), or a block-comment mark.
_MUST_ESCAPE = re.compile(r'[";()\\\x00-\x20\x7f-\xff]|#\||\|#')
# sexplib0 escaped: these get a backslash and a letter, printable ASCII stays, the rest is \ddd decimal.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b"}
# sexplib's lexer: the escapes it reads in a quoted atom (others keep their backslash).
_UNESCAPES = {"n": "\n", "t": "\t", "b": "\b", "r": "\r", " ": " ", "\\": "\\", '"': '"', "'": "'"}
_WHITESPACE = " \t\n\r\x0c"
_DELIMITERS = _WHITESPACE + '()";'


class SexpError(ValueError):
    """Not an S-expression this module reads (one line)."""


def quote(atom: str) -> str:
    """An atom as `Sexp.to_string` prints it: bare when it can be, else quoted and escaped."""
    if atom and not _MUST_ESCAPE.search(atom):
        return atom
    out = []
    for c in atom:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif " " <= c <= "~":
            out.append(c)
        else:
            out.append(f"\\{ord(c):03d}")
    return '"' + "".join(out) + '"'


def dumps(sexp: Sexp) -> bytes:
    """Machine form: a space only between two bare atoms, none around parentheses or quoted atoms."""
    out: list[str] = []
    bare_before = False

    def emit(s: Sexp) -> None:
        nonlocal bare_before
        if isinstance(s, str):
            text = quote(s)
            bare = text == s
            if bare and bare_before:
                out.append(" ")
            out.append(text)
            bare_before = bare
            return
        out.append("(")
        bare_before = False
        for item in s:
            emit(item)
        out.append(")")
        bare_before = False
    emit(sexp)
    return "".join(out).encode("latin-1")


def loads(raw: bytes, what: str = "S-expression") -> Sexp:
    """Exactly one S-expression (surrounding whitespace allowed); iterative, so depth costs no stack."""
    text = raw.decode("latin-1")
    stack: list[list[Sexp]] = [[]]
    atoms, i, n = 0, 0, len(text)

    def fail(why: str, at: int) -> SexpError:
        return SexpError(f"{what} is not a valid S-expression: {why} at byte {at}")
    while i < n:
        c = text[i]
        if c in _WHITESPACE:
            i += 1
            continue
        if c == "(":
            if len(stack) > MAX_DEPTH:
                raise fail(f"nested deeper than {MAX_DEPTH}", i)
            stack.append([])
            i += 1
            continue
        if c == ")":
            if len(stack) == 1:
                raise fail("unbalanced ')'", i)
            done = stack.pop()
            stack[-1].append(done)
            i += 1
        elif c == ";" or text.startswith("#|", i) or text.startswith("#;", i):
            raise fail("comments are not supported", i)
        elif c == '"':
            atom, i = _quoted(text, i, fail)
            stack[-1].append(atom)
        else:
            start = i
            while i < n and text[i] not in _DELIMITERS:
                if text.startswith("#|", i) or text.startswith("|#", i):
                    raise fail("block comment mark in an atom", i)
                i += 1
            stack[-1].append(text[start:i])
        atoms += 1
        if atoms > MAX_ATOMS:
            raise fail(f"more than {MAX_ATOMS} atoms and lists", i)
        if len(stack) == 1 and len(stack[0]) > 1:
            raise fail("more than one S-expression", i)
    if len(stack) > 1:
        raise fail("unbalanced '('", n)
    if not stack[0]:
        raise fail("empty", n)
    return stack[0][0]


def _quoted(text: str, i: int, fail) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    """The quoted atom starting at text[i] == '"', and the index after its closing quote."""
    out: list[str] = []
    i += 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return "".join(out), i + 1
        if c != "\\":
            out.append(c)
            i += 1
            continue
        if i + 1 >= n:
            break
        e = text[i + 1]
        if e in _UNESCAPES:
            out.append(_UNESCAPES[e])
            i += 2
        elif e.isdigit():
            digits = text[i + 1:i + 4]
            if len(digits) < 3 or not digits.isdigit() or int(digits) > 255:
                raise fail(f"bad escape \\{digits}", i)
            out.append(chr(int(digits)))
            i += 4
        elif e == "x":
            digits = text[i + 2:i + 4]
            if len(digits) < 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise fail(f"bad escape \\x{digits}", i)
            out.append(chr(int(digits, 16)))
            i += 4
        elif e == "\n":              # a line continuation: the newline and the next line's indent vanish
            i += 2
            while i < n and text[i] in " \t":
                i += 1
        else:                        # sexplib keeps an unknown escape as written
            out.append("\\" + e)
            i += 2
    raise fail("unterminated quoted atom", n)
