"""Property-based fuzzing of the compiler with malformed nets (hypothesis).

Real nets (the zoo's YAML files, the Caffe prototxts of ../shared/graphs) are mutated:
keys deleted; values of every JSON type put in every position (layer keys, rules, tops,
bottoms, params, top-level keys); layers duplicated or reordered; the text truncated at
random points, tabs inserted, YAML anchors, merge keys and ``!!python`` tags added.  Every
case must end in a built net or a :class:`~pacnet.PacnetError` that says where: never a
traceback, never a hang.  A few hundred cases run in the default suite; ``-m slow`` runs
thousands, over every net.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import warnings

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pacnet
from pacnet.load import zoo_names
from test_caffe_import import GRAPHS, _vars_for

NETS = os.path.join(os.path.dirname(__file__), "..", "nets")

# Small nets keep the default suite fast; -m slow fuzzes all of them.
SMALL_ZOO = ["jointupsample/pac_joint_upsample_x8", "jointupsample/djif_x8",
             "jointupsample/pac_joint_upsample_lite_x4", "deeplab/deeplab_v1_largefov",
             "fcn/fcn8s_crfi5p4d5641p4d5161"]
SMALL_PROTOTXTS = ["fcn/voc-fcn8s/deploy.prototxt", "fcn/voc-fcn32s/train.prototxt",
                   "deeplab/v1_largefov_legacy/train.prototxt",
                   "deeplab/v2_vgg16_aspp_l/test.prototxt", "segaware/config/vgg/deploy.prototxt"]


def all_prototxts():
    files = glob.glob(os.path.join(GRAPHS, "**", "*.prototxt"), recursive=True)
    return sorted(os.path.relpath(f, GRAPHS) for f in files if "solver" not in os.path.basename(f))


@pytest.fixture(scope="module")
def zoo_copy(tmp_path_factory):
    """The zoo in a scratch folder: mutated files go next to the originals, so their
    relative ``_base_`` paths still resolve."""
    root = tmp_path_factory.mktemp("zoo")
    shutil.copytree(NETS, root / "nets")
    return root / "nets"


# ----------------------------------------------------------------------------- strategies

NAMES = ["data", "label", "conv1", "loss", "score", "fc8", "${NUM_LABELS}", "", "x" * 40,
         "Convolution", "Pooling", "SoftmaxWithLoss", "train", "TEST", "num_output",
         "kernel_size", "bottom", "top", "include", "exclude", "param", "phase", "stage",
         "lr_mult", "propagate_down", "loss_weight", "layers", "inputs", "dims", "outputs",
         "a.b", "forward", "_base_", "blocks", "vars", "solver", "data"]

scalars = (st.none() | st.booleans() | st.integers(-3, 40) | st.integers(-2 ** 62, 2 ** 62)
           | st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from(NAMES)
           | st.text(max_size=6))
json_values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.sampled_from(NAMES) | st.text(max_size=4), inner, max_size=3),
    max_leaves=6)


def paths(tree, prefix=()):
    """Every (container path, key) in a plain YAML tree."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return
    for key, value in items:
        yield prefix, key
        yield from paths(value, prefix + (key,))


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


@st.composite
def mutated_tree(draw, tree):
    """``tree`` (a net as plain data) after one to three structural mutations."""
    for _ in range(draw(st.integers(1, 3))):
        spots = list(paths(tree))
        kind = draw(st.sampled_from(["delete", "replace", "replace", "add", "layers"]))
        if kind == "layers" and isinstance(tree.get("layers"), list) and tree["layers"]:
            layers = tree["layers"]
            i = draw(st.integers(0, len(layers) - 1))
            j = draw(st.integers(0, len(layers) - 1))
            if draw(st.booleans()):
                layers.insert(j, layers[i])   # a duplicate (same name)
            else:
                layers[i], layers[j] = layers[j], layers[i]
            continue
        if not spots:
            continue
        parent_path, key = draw(st.sampled_from(spots))
        parent = at(tree, parent_path)
        if kind == "delete":
            del parent[key]
        elif kind == "replace":
            parent[key] = draw(json_values)
        elif isinstance(parent, dict):
            parent[draw(st.sampled_from(NAMES))] = draw(json_values)
        else:
            parent.insert(key, draw(json_values))
    return tree


def layer_spans(text):
    """(start, end) of each top-level ``layer { ... }`` / ``layers { ... }`` of a prototxt."""
    spans = []
    for m in re.finditer(r"^layers? *\{", text, flags=re.M):
        depth, i = 0, m.end() - 1
        while i < len(text):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                spans.append((m.start(), i + 1))
                break
            i += 1
    return spans


@st.composite
def shuffled_layers(draw, text):
    """A prototxt with one layer duplicated, or two layers swapped."""
    spans = layer_spans(text)
    if len(spans) < 2:
        return text
    (a0, a1), (b0, b1) = sorted(draw(st.lists(st.sampled_from(spans), min_size=2, max_size=2)))
    if draw(st.booleans()) or (a0, a1) == (b0, b1):
        return text[:b1] + "\n" + text[a0:a1] + text[b1:]
    return text[:a0] + text[b0:b1] + text[a1:b0] + text[a0:a1] + text[b1:]


@st.composite
def mutated_text(draw, text):
    """Text-level damage: truncation, tabs, anchors and aliases, merge keys, python tags,
    a deleted or duplicated line."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["truncate", "tab", "anchor", "merge", "tag", "delete",
                                     "duplicate", "token"]))
        i = draw(st.integers(0, max(0, len(lines) - 1)))
        line = lines[i] if lines else ""
        if kind == "truncate":
            joined = "\n".join(lines)
            lines = joined[:draw(st.integers(0, len(joined)))].split("\n")
        elif kind == "tab":
            col = draw(st.integers(0, len(line)))
            lines[i] = line[:col] + "\t" + line[col:]
        elif kind == "anchor" and ": " in line:
            head, _, tail = line.partition(": ")
            lines[i] = f"{head}: &a {tail}"
            j = draw(st.integers(0, max(0, len(lines) - 1)))
            lines[j] = re.sub(r": [^{\[&*!].*$", ": *a", lines[j], count=1)
        elif kind == "merge":
            lines.insert(i, " " * (len(line) - len(line.lstrip())) + "<<: {pad: 1}")
        elif kind == "tag" and ": " in line:
            head, _, tail = line.partition(": ")
            lines[i] = f"{head}: !!python/object/apply:os.system ['true']"
        elif kind == "delete" and lines:
            del lines[i]
        elif kind == "duplicate" and lines:
            lines.insert(i, line)
        elif kind == "token":
            tokens = list(re.finditer(r"[A-Za-z0-9_.\"-]+", line))
            if tokens:
                m = draw(st.sampled_from(tokens))
                new = draw(st.sampled_from(['"x"', "-1", "0", "1e99", "nan", "true", "{", "}",
                                            "[", "]", ":", "TRAIN", "layer", "${X}", "'"]))
                lines[i] = line[:m.start()] + new + line[m.end():]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the property

def build_or_located_error(path, vars=None, phase="test"):
    """The property: a built net, or a PacnetError with a location."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pacnet.build(path, vars=vars, phase=phase, device="meta")
    except pacnet.PacnetError as err:
        assert err.location is not None and err.location.file, f"no location: {err}"
        assert str(err).strip(), "empty message"


def zoo_case(draw, zoo_copy, names):
    name = draw(st.sampled_from(names))
    path = zoo_copy / (name + ".yaml")
    text = path.read_text()
    if draw(st.booleans()):
        tree = yaml.safe_load(text)
        text = yaml.safe_dump(draw(mutated_tree(tree)), sort_keys=False)
    if draw(st.booleans()) or text == path.read_text():
        text = draw(mutated_text(text))
    out = path.with_name(path.stem + "_fuzz.yaml")
    out.write_text(text)
    return str(out)


def prototxt_case(draw, tmp_dir, names):
    rel = draw(st.sampled_from(names))
    source = os.path.join(GRAPHS, rel)
    text = open(source, encoding="utf-8").read()
    if draw(st.booleans()):
        text = draw(shuffled_layers(text))
    if draw(st.booleans()):
        text = draw(mutated_text(text))
    out = os.path.join(tmp_dir, "fuzz.prototxt")
    with open(out, "w", encoding="utf-8") as f:
        f.write(text)
    return out, _vars_for(source)


def _cases(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))


@_cases(120)
@given(data=st.data())
def test_mutated_zoo_nets_build_or_fail_located(zoo_copy, data):
    path = zoo_case(data.draw, zoo_copy, SMALL_ZOO)
    build_or_located_error(path, phase=data.draw(st.sampled_from(["train", "test"])))


@_cases(120)
@given(data=st.data())
def test_mutated_prototxts_build_or_fail_located(tmp_path_factory, data):
    path, vars = prototxt_case(data.draw, str(tmp_path_factory.getbasetemp()), SMALL_PROTOTXTS)
    used = set(re.findall(r"\$\{(\w+)\}", open(path, encoding="utf-8").read()))
    build_or_located_error(path, {k: v for k, v in vars.items() if k in used},
                           phase=data.draw(st.sampled_from(["train", "test"])))


@pytest.mark.slow
@_cases(2000)
@given(data=st.data())
def test_mutated_zoo_nets_exhaustive(zoo_copy, data):
    path = zoo_case(data.draw, zoo_copy, zoo_names())
    build_or_located_error(path, phase=data.draw(st.sampled_from(["train", "test"])))


@pytest.mark.slow
@_cases(2000)
@given(data=st.data())
def test_mutated_prototxts_exhaustive(tmp_path_factory, data):
    path, vars = prototxt_case(data.draw, str(tmp_path_factory.getbasetemp()), all_prototxts())
    used = set(re.findall(r"\$\{(\w+)\}", open(path, encoding="utf-8").read()))
    build_or_located_error(path, {k: v for k, v in vars.items() if k in used},
                           phase=data.draw(st.sampled_from(["train", "test"])))
