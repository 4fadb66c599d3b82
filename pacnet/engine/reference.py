"""The reference of the ``data:`` and ``solver:`` sections, generated from their schemas.

:func:`fields` lists a schema's fields as plain rows (name, type, default, description);
:func:`markdown` renders the README's reference from them, so the documentation cannot
drift from what the validator accepts (``tests/test_reference.py`` compares the README
with it; ``pacnet datasets --markdown`` prints it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

from pacnet.engine.data import _AUTO_METRIC, _COMMON, _REQUIRED, DATASET_INFO, DATASETS, PHASES
from pacnet.engine.solver import IGNORED_FIELDS, SOLVER_SCHEMA

__all__ = ["Field", "fields", "dataset_fields", "solver_fields", "markdown", "BEGIN", "END"]

BEGIN = "<!-- BEGIN generated reference: pacnet datasets --markdown -->"
END = "<!-- END generated reference -->"


@dataclass(frozen=True)
class Field:
    """One field of a section: its name, value type, default ('' = none) and meaning."""

    name: str
    type: str
    default: str
    description: str
    required: bool = False


def _type(schema: Mapping[str, Any]) -> str:
    if "enum" in schema:
        return " \\| ".join(str(v) for v in schema["enum"])
    if "anyOf" in schema:
        return " or ".join(_type(s) for s in schema["anyOf"])
    kind = schema.get("type", "any")
    if kind == "array":
        item = schema.get("items", {})
        n = (schema.get("minItems"), schema.get("maxItems"))
        size = f"{n[0]}" if n[0] is not None and n[0] == n[1] else ""
        what = _type(item) if item else "value"
        what = what + "s" if what in ("integer", "number", "string", "value") else what
        return f"list of {size + ' ' if size else ''}{what}"
    if kind == "object":
        return "mapping"
    return {"boolean": "bool"}.get(kind, kind)


def fields(properties: Mapping[str, Mapping[str, Any]],
           required: Sequence[str] = ()) -> List[Field]:
    """The rows of a schema's ``properties``, in their order."""
    return [Field(name, _type(sub), json.dumps(sub["default"]) if "default" in sub else "",
                  str(sub.get("description", "")), name in required)
            for name, sub in properties.items()]


def dataset_fields(name: str) -> List[Field]:
    """The fields a ``data:`` section of data set ``name`` takes beyond the common ones."""
    return fields(DATASETS[name], _REQUIRED.get(name, ()))


def solver_fields() -> List[Field]:
    return fields(SOLVER_SCHEMA["properties"], SOLVER_SCHEMA["required"])


def _table(rows: Sequence[Field]) -> List[str]:
    out = ["| field | type | default | meaning |", "| --- | --- | --- | --- |"]
    for f in rows:
        name = f"`{f.name}`" + (" (required)" if f.required else "")
        default = f"`{f.default}`" if f.default else ""
        out.append(f"| {name} | {f.type} | {default} | {f.description.replace('|', '/')} |")
    return out


def info(name: str) -> Dict[str, str]:
    """What :data:`~pacnet.engine.data.DATASET_INFO` says of a data set (blanks if nothing)."""
    return {"task": "", "gives": "", "layout": "", **DATASET_INFO.get(name, {})}


def markdown() -> str:
    """The README's ``data:`` and ``solver:`` reference (between :data:`BEGIN` and :data:`END`)."""
    lines = [BEGIN, "", "### The `data:` section", "",
             "`dataset` names the data set; its fields (below) may also be set per phase under "
             f"{', '.join('`' + p + ':`' for p in PHASES)} (e.g. random crops and mirroring only "
             "in `train:`). Fields every data set takes:", ""]
    lines += _table(fields(_COMMON))
    for name in DATASETS:
        about = info(name)
        lines += ["", f"#### `dataset: {name}` — {about['task']}", "",
                  f"Reads: {about['layout']}. A sample gives: {about['gives']}. Metric: "
                  f"`{_AUTO_METRIC.get(name, 'none')}`.", ""]
        lines += _table(dataset_fields(name))
    ignored = ", ".join(f"`{k}`" for k in IGNORED_FIELDS)
    lines += ["", "### The `solver:` section", "",
              "Caffe's `SolverParameter` fields (a Caffe `solver.prototxt` converts with `pacnet "
              "convert solver.prototxt`, or trains as it is with `pacnet train NET --solver "
              f"solver.prototxt`). Accepted and ignored: {ignored}.", ""]
    lines += _table([f for f in solver_fields() if f.name not in IGNORED_FIELDS])
    lines += ["", END]
    return "\n".join(lines) + "\n"


def summary_rows() -> List[Dict[str, str]]:
    """One row per data set for ``pacnet datasets``: name, task, required fields, metric."""
    return [{"dataset": name, "task": info(name)["task"],
             "required": ", ".join(_REQUIRED.get(name, ())) or "-",
             "metric": _AUTO_METRIC.get(name, "none")} for name in DATASETS]
