"""``pacnet layers [TYPE]``: list registered layer types, or one type's parameters and docs."""

from __future__ import annotations

import argparse
import json
import re

from pacnet.cli.common import console, description
from pacnet.errors import SchemaError, did_you_mean


def add_parser(sub) -> None:
    p = sub.add_parser("layers", help="list layer types, or show one type's parameters",
                       description=description(__doc__))
    p.add_argument("type", nargs="?", metavar="TYPE", help="a layer type, e.g. Convolution")
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text  # plain text: docs write "[h, w]", which is not markup

    from pacnet import registry
    from pacnet.schema import layer_schema, net_schema

    types = registry.types()
    out = console(width=120)
    if args.type is None:
        if args.schema:
            print(json.dumps(net_schema(), indent=1))
            return 0
        table = Table(title=f"{len(types)} layer types", header_style="bold")
        table.add_column("type")
        table.add_column("bottoms", justify="center")
        table.add_column("tops", justify="center")
        table.add_column("summary", overflow="fold")
        for name in sorted(types):
            t = types[name]
            table.add_row(name, _arity(t.bottoms), _arity(t.tops), Text(summary(t.doc())))
        out.print(table)
        return 0
    if args.type not in types:
        raise SchemaError(f"unknown layer type {args.type!r}",
                          hint=did_you_mean(args.type, types) or "run 'pacnet layers' for the list")
    t = types[args.type]
    if args.schema:
        print(json.dumps(layer_schema(args.type), indent=1))
        return 0
    out.print(Text(args.type, style="bold") + Text(
        f"  bottoms {_arity(t.bottoms)}, tops {_arity(t.tops)}"
        + (f", learnable blobs: {', '.join(t.blobs)}" if t.blobs else "")
        + (", loss layer" if t.loss else "")))
    out.print(t.doc().replace("``", ""), markup=False)
    table = Table(header_style="bold")
    for col in ("parameter", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for key, schema in t.params.items():
        required = key in t.required
        # Text: descriptions hold [lists] that rich would take for markup tags
        table.add_row(Text(key + (" *" if required else "")), Text(_kind(schema)),
                      Text(json.dumps(schema["default"]) if "default" in schema else ""),
                      Text(schema.get("description", "")))
    out.print(table)
    return 0


def summary(doc: str) -> str:
    """The first sentence of a docstring's first paragraph, whole (its lines joined)."""
    paragraph = " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")
    m = re.search(r"[.!?](?=\s+[A-Z(])", paragraph)
    return paragraph[:m.end()] if m else paragraph


def _arity(bounds) -> str:
    lo, hi = bounds
    if hi is None:
        return f"{lo}+"
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _kind(schema: dict) -> str:
    if "enum" in schema:
        return "|".join(str(v) for v in schema["enum"])
    if "type" in schema:
        return schema["type"] if isinstance(schema["type"], str) else "|".join(schema["type"])
    if "oneOf" in schema:
        return " or ".join(_kind(s) for s in schema["oneOf"])
    return "any"
