"""A reader for protobuf TEXT format (Caffe's ``.prototxt``), written by hand.

No ``protoc``, no generated classes, no schema: the text is parsed into a generic tree
that keeps everything a converter needs to reproduce what Caffe would have read and to
point errors at the right line::

    layer {                         Message([Field('layer', Message([...]), line=1, col=1)])
      name: "conv1"                   Field('name', 'conv1', kind='string')
      type: "Convolution"
      convolution_param { num_output: 64 kernel_size: 3 }
      param { lr_mult: 1 } param { lr_mult: 2 }      (repeated fields stay repeated, in order)
    }

Syntax accepted (protobuf's ``TextFormat`` plus what the real files need):

* ``field: value``, ``field { ... }``, ``field: { ... }``, ``field < ... >``;
* list syntax ``field: [1, 2, 3]`` and ``field [{...}, {...}]`` (one field entry per element);
* values: strings in ``"`` or ``'`` with C escapes (adjacent strings concatenate), integers
  (decimal, ``0x`` hex, ``0``-prefixed octal as in protobuf, negative), floats (``1.``, ``.5``, ``1e-5``, ``2.5f``, ``inf``,
  ``-inf``, ``nan``), bare identifiers (enums, ``true``/``false``);
* ``#`` comments, CRLF line endings, tabs, optional ``,`` / ``;`` separators.

Template variables: Caffe's configs are shell templates (``num_output: ${NUM_LABELS}``,
``name: "fc1_${EXP}"``).  ``${NAME}`` is replaced from ``vars`` in bare values and inside
strings (not in comments) while tokenizing, so every value keeps its position in the
original text.  All unset names are reported together in one :class:`LoadError`.

Every field carries its 1-based ``line`` and ``col``.
"""

from __future__ import annotations

import bisect
import math
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Set, Tuple, Union

from pacnet.errors import LoadError, Location

__all__ = [
    "Ident", "Field", "Message", "parse", "parse_file", "read_text", "parse_scalar",
]


class Ident(str):
    """A bare identifier value: an enum name (``MAX``, ``TRAIN``) or ``true``/``false``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Ident({str.__repr__(self)})"


class Field:
    """One ``name: value`` or ``name { ... }`` entry of a message, with its position.

    ``kind`` is ``"message"``, ``"string"``, ``"int"``, ``"float"`` or ``"ident"``.
    ``value`` is a :class:`Message`, ``str``, ``int``, ``float`` or :class:`Ident`.
    ``vline``/``vcol`` give where the value starts (for scalars; the brace for messages).
    """

    __slots__ = ("name", "value", "kind", "line", "col", "vline", "vcol")

    def __init__(self, name: str, value: Any, kind: str, line: int, col: int,
                 vline: int, vcol: int) -> None:
        self.name = name
        self.value = value
        self.kind = kind
        self.line = line
        self.col = col
        self.vline = vline
        self.vcol = vcol

    def __repr__(self) -> str:
        return f"Field({self.name!r}, {self.value!r}, kind={self.kind!r}, line={self.line}, col={self.col})"


class Message:
    """An ordered list of :class:`Field` entries; repeated fields appear once per value."""

    __slots__ = ("fields", "line", "col", "file")

    def __init__(self, fields: Optional[List[Field]] = None, line: int = 1, col: int = 1,
                 file: Optional[str] = None) -> None:
        self.fields = fields if fields is not None else []
        self.line = line
        self.col = col
        self.file = file

    def __iter__(self) -> Iterator[Field]:
        return iter(self.fields)

    def __len__(self) -> int:
        return len(self.fields)

    def __repr__(self) -> str:
        return f"Message({self.fields!r})"

    def all(self, name: str) -> List[Field]:
        """Every entry named ``name``, in order."""
        return [f for f in self.fields if f.name == name]

    def values(self, name: str) -> List[Any]:
        return [f.value for f in self.fields if f.name == name]

    def field(self, name: str) -> Optional[Field]:
        """The last entry named ``name`` (protobuf: the last singular value wins), or None."""
        for f in reversed(self.fields):
            if f.name == name:
                return f
        return None

    def get(self, name: str, default: Any = None) -> Any:
        f = self.field(name)
        return default if f is None else f.value

    def has(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    def names(self) -> List[str]:
        """Field names in first-appearance order, each once."""
        seen: Dict[str, None] = {}
        for f in self.fields:
            seen.setdefault(f.name, None)
        return list(seen)

    def to_dict(self) -> Dict[str, Any]:
        """Plain nested dicts: a name written once maps to its value, repeated to a list."""
        out: Dict[str, Any] = {}
        counts: Dict[str, int] = {}
        for f in self.fields:
            counts[f.name] = counts.get(f.name, 0) + 1
        for f in self.fields:
            v = f.value.to_dict() if isinstance(f.value, Message) else _plain(f.value)
            if counts[f.name] > 1:
                out.setdefault(f.name, []).append(v)
            else:
                out[f.name] = v
        return out

    def location(self, file: Optional[str] = None) -> Location:
        return Location(file or self.file, self.line, self.col)


def _plain(v: Any) -> Any:
    if isinstance(v, Ident):
        if v in ("true", "True", "t"):
            return True
        if v in ("false", "False", "f"):
            return False
        return str(v)
    return v


# ----------------------------------------------------------------------------- tokenizer

# One match per token: whitespace and comments are eaten as the prefix of the next token,
# so the Python loop runs once per token.  ``end`` matches once, at the end of the text.
_TOKEN = re.compile(
    r"""
    [ \t\r\n\f\v]*(?:\#[^\n]*[ \t\r\n\f\v]*)*
    (?:
      (?P<punct>[{}\[\]:,;<>])
    | (?P<string>"[^"\\\n]*(?:\\.[^"\\\n]*)*"|'[^'\\\n]*(?:\\.[^'\\\n]*)*')
    | (?P<bare>[A-Za-z0-9_.+\-]+(?:\$\{[^}\n]*\}[A-Za-z0-9_.+\-]*)*
             |\$\{[^}\n]*\}(?:[A-Za-z0-9_.+\-]|\$\{[^}\n]*\})*)
    | (?P<open>["'])
    | (?P<end>\Z)
    | (?P<bad>.)
    )
    """,
    re.VERBOSE | re.DOTALL,
)
_VAR = re.compile(r"\$\{([^}\n]*)\}")
_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[-+]?(?:0[xX][0-9a-fA-F]+|[0-9]+)\Z")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?|\.[0-9]+(?:[eE][-+]?[0-9]+)?)[fF]?\Z")
_SPECIAL_FLOATS = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}

# Token kinds (small ints compare fastest).
T_PUNCT, T_STRING, T_BARE, T_EOF = 0, 1, 2, 3


class _Tok:
    __slots__ = ("kind", "text", "value", "pos")

    def __init__(self, kind: int, text: str, value: Any, pos: int) -> None:
        self.kind = kind
        self.text = text     # source text (for messages)
        self.value = value   # punct char, decoded string, or bare text after substitution
        self.pos = pos


_SIMPLE_ESCAPES = {
    "n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "a": "\a",
    "b": "\b", "f": "\f", "v": "\v", "?": "?",
}


class _Source:
    """The text plus helpers mapping offsets to line/column."""

    def __init__(self, text: str, file: Optional[str]) -> None:
        self.text = text
        self.file = file
        self._starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def linecol(self, pos: int) -> Tuple[int, int]:
        i = bisect.bisect_right(self._starts, pos) - 1
        return i + 1, pos - self._starts[i] + 1

    def loc(self, pos: int) -> Location:
        line, col = self.linecol(pos)
        return Location(self.file, line, col)

    def error(self, pos: int, message: str, hint: Optional[str] = None) -> LoadError:
        return LoadError(message, location=self.loc(pos), hint=hint)


def _unescape(src: _Source, body: str, pos: int) -> str:
    """Decode C-style escapes of a quoted string body (``pos`` = offset of the body)."""
    if "\\" not in body:
        return body
    out = bytearray()
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if c != "\\":
            j = body.find("\\", i)
            j = n if j < 0 else j
            out += body[i:j].encode("utf-8", "surrogatepass")
            i = j
            continue
        if i + 1 >= n:
            raise src.error(pos + i, "string ends with a lone backslash")
        e = body[i + 1]
        if e in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[e].encode()
            i += 2
        elif e in "01234567":
            j = i + 1
            while j < n and j < i + 4 and body[j] in "01234567":
                j += 1
            out.append(int(body[i + 1:j], 8) & 0xFF)
            i = j
        elif e in "xX":
            j = i + 2
            while j < n and j < i + 4 and body[j] in "0123456789abcdefABCDEF":
                j += 1
            if j == i + 2:
                raise src.error(pos + i, "\\x escape without hex digits")
            out.append(int(body[i + 2:j], 16))
            i = j
        elif e in "uU":
            width = 4 if e == "u" else 8
            digits = body[i + 2:i + 2 + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise src.error(pos + i, f"\\{e} escape needs {width} hex digits")
            out += chr(int(digits, 16)).encode("utf-8", "surrogatepass")
            i += 2 + width
        else:
            raise src.error(pos + i, f"unknown escape sequence '\\{e}' in string")
    return out.decode("utf-8", "replace")


class _Tokenizer:
    def __init__(self, src: _Source, vars: Mapping[str, Any], keep_unset: bool = False) -> None:
        self.src = src
        self.vars = vars
        self.keep_unset = keep_unset  # leave unset ${NAME} in the values (as strings)
        self.unset: Dict[str, int] = {}  # name -> offset of first use
        self.used: Set[str] = set()

    def _subst(self, text: str, pos: int) -> str:
        """Replace ``${NAME}`` in ``text`` (found at offset ``pos``); record unset names."""

        def repl(m: "re.Match[str]") -> str:
            name = m.group(1)
            if not _VAR_NAME.match(name):
                raise self.src.error(pos + m.start(), f"bad template variable '${{{name}}}'",
                                     hint="variable names are letters, digits and '_'")
            if name in self.vars:
                self.used.add(name)
                v = self.vars[name]
                if isinstance(v, bool):
                    return "true" if v else "false"
                return str(v)
            self.unset.setdefault(name, pos + m.start())
            return m.group(0) if self.keep_unset else "0"

        return _VAR.sub(repl, text)

    def tokens(self) -> List[_Tok]:
        text = self.src.text
        toks: List[_Tok] = []
        append = toks.append
        for m in _TOKEN.finditer(text):
            kind = m.lastgroup
            pos = m.start(kind)
            if kind == "punct":
                c = m.group(kind)
                append(_Tok(T_PUNCT, c, c, pos))
            elif kind == "bare":
                raw = m.group(kind)
                val = self._subst(raw, pos) if "${" in raw else raw
                # a value left as an unset ${NAME} is a string for whoever sets NAME later
                append(_Tok(T_STRING if "${" in val else T_BARE, raw, val, pos))
            elif kind == "string":
                raw = m.group(kind)
                body = raw[1:-1]
                if "${" in body:
                    body = self._subst(body, pos + 1)
                append(_Tok(T_STRING, raw, _unescape(self.src, body, pos + 1), pos))
            elif kind == "end":
                break
            elif kind == "open":  # an opening quote with no closing quote on its line
                raise self.src.error(pos, "unterminated string",
                                     hint="close it with a matching quote on the same line")
            else:
                raise self.src.error(pos, f"unexpected character {text[pos]!r}",
                                     hint="expected a field name, value, '{', '}', ':' or '['")
        append(_Tok(T_EOF, "end of file", None, len(text)))
        return toks


# ----------------------------------------------------------------------------- parser

def parse_scalar(text: str) -> Tuple[Any, str]:
    """Classify bare text: ``(value, kind)`` with kind ``int``/``float``/``ident``, or
    ``(text, "bad")`` when it is none of them."""
    if _INT.match(text):
        neg = text.startswith("-")
        body = text.lstrip("+-")
        if body[:2].lower() == "0x":
            v = int(body, 16)
        elif len(body) > 1 and body[0] == "0":  # protobuf (and C): a leading 0 means octal
            if any(c in "89" for c in body):
                return text, "bad"
            v = int(body, 8)
        else:
            v = int(body, 10)
        return (-v if neg else v), "int"
    if _FLOAT.match(text):
        return float(text.rstrip("fF")), "float"
    low = text.lower()
    sign = 1.0
    if low[:1] in "+-":
        sign = -1.0 if low[0] == "-" else 1.0
        low = low[1:]
        if low in _SPECIAL_FLOATS:
            return sign * _SPECIAL_FLOATS[low], "float"
        return text, "bad"
    if low in _SPECIAL_FLOATS:
        return _SPECIAL_FLOATS[low], "float"
    if _IDENT.match(text):
        return Ident(text), "ident"
    return text, "bad"


def _describe(tok: _Tok) -> str:
    if tok.kind == T_EOF:
        return "end of file"
    if tok.kind == T_STRING:
        return "a string"
    return repr(tok.text)


class _Parser:
    def __init__(self, src: _Source, toks: List[_Tok]) -> None:
        self.src = src
        self.toks = toks
        self.i = 0

    def fail(self, tok: _Tok, expected: str, hint: Optional[str] = None) -> LoadError:
        return self.src.error(tok.pos, f"expected {expected}, got {_describe(tok)}", hint=hint)

    def message_body(self, close: Optional[str], opener: Optional[Tuple[int, int]],
                     owner: str) -> List[Field]:
        """Fields until ``close`` (``}``/``>``) or, at top level, end of file."""
        toks = self.toks
        src = self.src
        fields: List[Field] = []
        append = fields.append
        while True:
            tok = toks[self.i]
            k = tok.kind
            if k == T_BARE:
                name = tok.value
                if not _IDENT.match(name):
                    raise src.error(tok.pos, f"expected a field name, got {tok.text!r}",
                                    hint="field names are identifiers like 'num_output'")
                self.i += 1
                self.field(name, tok, append)
                sep = toks[self.i]
                if sep.kind == T_PUNCT and (sep.value == "," or sep.value == ";"):
                    self.i += 1
                continue
            if k == T_PUNCT and tok.value == close:
                self.i += 1
                return fields
            if k == T_EOF:
                if close is None:
                    return fields
                line, col = opener
                raise src.error(tok.pos, f"unexpected end of file: expected '{close}' to close "
                                f"'{owner}' opened at line {line}, column {col}",
                                hint="the file looks truncated, or a brace is missing")
            if close is None:
                raise self.fail(tok, "a field name", hint="an extra '}'?" if tok.value == "}" else None)
            raise self.fail(tok, f"a field name or '{close}' closing '{owner}'")

    def field(self, name: str, name_tok: _Tok, append) -> None:
        toks = self.toks
        line, col = self.src.linecol(name_tok.pos)
        tok = toks[self.i]
        colon = False
        if tok.kind == T_PUNCT and tok.value == ":":
            colon = True
            self.i += 1
            tok = toks[self.i]
        if tok.kind == T_PUNCT:
            c = tok.value
            if c == "{" or c == "<":
                self.i += 1
                append(self.message_field(name, tok, line, col))
                return
            if c == "[":
                self.i += 1
                self.list_values(name, tok, line, col, append)
                return
        if not colon:
            raise self.fail(tok, f"':' or '{{' after field name '{name}'")
        append(self.scalar(name, line, col))

    def message_field(self, name: str, brace: _Tok, line: int, col: int) -> Field:
        close = "}" if brace.value == "{" else ">"
        sub = self.message_body(close, (line, col), name)
        vline, vcol = self.src.linecol(brace.pos)
        return Field(name, Message(sub, vline, vcol, self.src.file), "message", line, col, vline, vcol)

    def list_values(self, name: str, bracket: _Tok, line: int, col: int, append) -> None:
        toks = self.toks
        tok = toks[self.i]
        if tok.kind == T_PUNCT and tok.value == "]":
            self.i += 1
            return
        while True:
            tok = toks[self.i]
            if tok.kind == T_PUNCT and (tok.value == "{" or tok.value == "<"):
                self.i += 1
                append(self.message_field(name, tok, line, col))
            else:
                append(self.scalar(name, line, col))
            tok = toks[self.i]
            if tok.kind == T_PUNCT and tok.value == ",":
                self.i += 1
                continue
            if tok.kind == T_PUNCT and tok.value == "]":
                self.i += 1
                return
            if tok.kind == T_EOF:
                bl, bc = self.src.linecol(bracket.pos)
                raise self.src.error(tok.pos, f"unexpected end of file: expected ']' to close the "
                                     f"list of '{name}' opened at line {bl}, column {bc}")
            raise self.fail(tok, f"',' or ']' in the list of '{name}'")

    def scalar(self, name: str, line: int, col: int) -> Field:
        toks = self.toks
        tok = toks[self.i]
        vline, vcol = self.src.linecol(tok.pos)
        if tok.kind == T_STRING:
            parts = [tok.value]
            self.i += 1
            while toks[self.i].kind == T_STRING:  # "a" "b" concatenates
                parts.append(toks[self.i].value)
                self.i += 1
            return Field(name, "".join(parts), "string", line, col, vline, vcol)
        if tok.kind == T_BARE:
            self.i += 1
            value, kind = parse_scalar(tok.value)
            if kind == "bad":
                if tok.value != tok.text:  # came from a template variable: keep it as text
                    return Field(name, tok.value, "string", line, col, vline, vcol)
                raise self.src.error(tok.pos, f"bad value {tok.text!r} for field '{name}'",
                                     hint="expected a number, an identifier or a quoted string")
            return Field(name, value, kind, line, col, vline, vcol)
        raise self.fail(tok, f"a value for field '{name}'")


def _unset_error(src: _Source, unset: Dict[str, int]) -> LoadError:
    items = sorted(unset.items(), key=lambda kv: kv[1])
    listed = ", ".join(f"{name} (line {src.linecol(pos)[0]})" for name, pos in items)
    first = items[0][1]
    return LoadError(f"unset template variables: {listed}",
                     location=Location(src.file, *src.linecol(first)),
                     hint="pass --var NAME=VALUE for each (Python: vars={'NAME': VALUE})")


def parse(text: str, vars: Optional[Mapping[str, Any]] = None, *,
          file: Optional[str] = None, keep_unset: Optional[Dict[str, int]] = None) -> Message:
    """Parse protobuf text into a :class:`Message` tree; ``file`` only labels errors.

    Raises :class:`LoadError` for garbled or truncated text (with line and column) and,
    before parsing, one error listing every unset ``${VAR}`` -- unless ``keep_unset`` is
    a dict: then unset variables stay in the values as ``${VAR}`` text and their names are
    recorded there (name -> offset of the first use); warns (an error in the CLI) about
    names of ``vars`` that no ``${VAR}`` uses.
    """
    from pacnet.load import warn_unused_vars

    if text.startswith("\ufeff"):
        text = text[1:]
    src = _Source(text, file)
    tz = _Tokenizer(src, vars or {}, keep_unset=keep_unset is not None)
    toks = tz.tokens()
    if keep_unset is not None:
        keep_unset.update(tz.unset)
    elif tz.unset:
        raise _unset_error(src, tz.unset)
    p = _Parser(src, toks)
    fields = p.message_body(None, None, "")
    warn_unused_vars(vars or {}, tz.used, Location(file))
    return Message(fields, 1, 1, file)


def read_text(path: Union[str, os.PathLike]) -> str:
    """The text of ``path``; a missing or undecodable file is a :class:`LoadError`."""
    p = os.fspath(path)
    try:
        with open(p, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise LoadError(f"no such file: {p}", hint="check the path") from None
    except IsADirectoryError:
        raise LoadError(f"{p} is a directory, not a prototxt file") from None
    except OSError as err:
        raise LoadError(f"cannot read {p}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if b"\x00" in data[:4096]:
            raise LoadError(f"{p} is a binary file, not protobuf text",
                            hint="a .caffemodel holds weights: use --weights for it") from None
        src = _Source(data[:err.start].decode("utf-8"), p)
        raise LoadError(f"not valid UTF-8 text (byte offset {err.start})",
                        location=src.loc(err.start)) from None


def parse_file(path: Union[str, os.PathLike], vars: Optional[Mapping[str, Any]] = None) -> Message:
    """Read and :func:`parse` a prototxt file; errors name the file."""
    return parse(read_text(path), vars, file=os.fspath(path))
