"""``pacnet datasets [NAME]``: list the data sets of the ``data:`` section, or one's fields.

    pacnet datasets              # every data set: task, required fields, metric
    pacnet datasets voc          # the fields of a voc data: section, the files it reads
    pacnet datasets --solver     # the fields of the solver: section
    pacnet datasets --markdown   # the README's data: and solver: reference
"""

from __future__ import annotations

import argparse
import json
import sys

from pacnet.cli.common import console, description
from pacnet.errors import SchemaError, did_you_mean


def add_parser(sub) -> None:
    p = sub.add_parser("datasets", description=description(__doc__),
                       help="list the data sets of the data: section, or one data set's fields")
    p.add_argument("name", nargs="?", metavar="NAME", help="a data set, e.g. voc")
    p.add_argument("--schema", action="store_true", help="print the JSON schema instead")
    p.add_argument("--solver", action="store_true", help="show the fields of the solver: section")
    p.add_argument("--markdown", action="store_true",
                   help="print the data: and solver: reference as Markdown (as in the README)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from pacnet.engine import reference
    from pacnet.engine.data import DATASETS, data_schema
    from pacnet.engine.solver import SOLVER_SCHEMA

    if args.markdown:
        sys.stdout.write(reference.markdown())
        return 0
    out = console(width=120, highlight=False)
    if args.solver:
        if args.schema:
            print(json.dumps(SOLVER_SCHEMA, indent=1))
            return 0
        out.print(_fields_table(reference.solver_fields(), "solver: (Caffe SolverParameter)"))
        return 0
    if args.name is None:
        if args.schema:
            raise SchemaError("--schema needs a data set name",
                              hint="e.g. pacnet datasets voc --schema")
        table = Table(title=f"{len(DATASETS)} data sets (data: {{dataset: NAME, ...}})",
                      header_style="bold")
        for col in ("dataset", "task", "required", "metric"):
            table.add_column(col, overflow="fold")
        for row in reference.summary_rows():
            table.add_row(*(Text(v) for v in row.values()))
        out.print(table)
        out.print("'pacnet datasets NAME' shows a data set's fields and the files it reads.",
                      markup=False)
        return 0
    if args.name not in DATASETS:
        raise SchemaError(f"unknown data set {args.name!r}",
                          hint=did_you_mean(args.name, DATASETS)
                          or "run 'pacnet datasets' for the list")
    if args.schema:
        print(json.dumps(data_schema(args.name), indent=1))
        return 0
    about = reference.info(args.name)
    out.print(f"{args.name}: {about['task']}", markup=False, style="bold")
    out.print(f"reads: {about['layout']}", markup=False)
    out.print(f"a sample gives: {about['gives']}", markup=False)
    out.print(_fields_table(reference.dataset_fields(args.name),
                            f"data: {{dataset: {args.name}}} fields"))
    from pacnet.engine.data import _COMMON

    out.print(_fields_table(reference.fields(_COMMON), "fields of every data set"))
    return 0


def _fields_table(rows, title: str):
    from rich.table import Table
    from rich.text import Text

    table = Table(title=title, header_style="bold")
    for col in ("field", "type", "default", "description"):
        table.add_column(col, overflow="fold")
    for f in rows:  # Text: no markup in descriptions that hold [lists]
        name = f.name + (" *" if f.required else "")
        kind = f.type.replace("\\|", "|")
        table.add_row(*(Text(v) for v in (name, kind, f.default, f.description)))
    return table
