"""Hot-swap convolutions for pixel-adaptive ones (PAC paper §3.3; NVlabs/pacnet ``fcn8spac``).

:func:`hotswap` takes a loaded net (the expanded tree of :func:`pacnet.load.load`) and turns
chosen ``Convolution`` layers into ``PacConv`` layers that keep their names, blob shapes,
``param`` entries and fillers, so weights trained for the plain net load unchanged.  Each
swapped layer is guided by one blob of the net (``guide``): resized bilinearly (trilinearly
for the 3-D convolutions of 5-D nets; half-pixel, ``Resize`` with the layer's input as the
size-giving second bottom) when its size differs from the layer's input, and multiplied by
``guide_scale`` (a ``Power`` layer) when that is not 1.  With a small scale (the original
uses 1e-4) the adaptive kernel starts near 1 and the swapped net computes what the plain one
did; with a constant guide it computes exactly that (zero padding makes the border taps 0
whatever the kernel).

:func:`to_yaml` writes the result as a readable net file (one flow mapping per layer).
The result has no ``blocks`` or ``vars``: they were expanded and substituted on loading.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from pacnet.errors import Location, SchemaError, did_you_mean
from pacnet.layers.common import SPATIAL_AXES
from pacnet.load import where

__all__ = ["HotswapError", "hotswap", "to_yaml"]

# Convolution parameters PacConv does not have: dropped when they hold Caffe's default
# (the value as written, or the schema default), refused otherwise.
_CONV_ONLY_DEFAULTS = {"group": 1, "axis": 1, "force_nd_im2col": False, "bottom_is_im2col": False}
_IGNORED = ("engine",)  # Caffe's implementation choice: meaningless for PacConv
_LAYER_KEYS = ("name", "type", "bottom", "top", "include", "exclude", "param", "loss_weight",
               "propagate_down")
_KEY_ORDER = ("name", "pacnet_version", "inputs", "dims", "outputs", "solver", "data", "layers")


class HotswapError(SchemaError):
    """A hot-swap request that does not fit the net (unknown layer or blob, wrong type, ...)."""


def _as_list(value: Any) -> List[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _plain(value: Any) -> Any:
    """MarkedDict/MarkedList (and tuples) -> plain dicts and lists, for dumping."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _axes(layer: Mapping[str, Any], key: str, default: int, rank: int) -> Tuple[int, ...]:
    """Caffe's spatial field ``key`` of a Convolution (one value for every axis, one per
    axis, or in 2-D the ``_h``/``_w`` keys) as ``rank`` values.  The net has been built, so
    the form fits the layer's bottom."""
    h, w = layer.get(f"{key}_h"), layer.get(f"{key}_w")
    if h is not None or w is not None:
        return int(h if h is not None else default), int(w if w is not None else default)
    value = layer.get(key, default)
    values = [int(v) for v in (value if isinstance(value, list) else [value])]
    return tuple(values * rank) if len(values) == 1 else tuple(values)


def _check_layer(layer: Mapping[str, Any], loc: Optional[Location]) -> None:
    """Refuse a layer that is not a Convolution PacConv can stand for, at the layer's line
    (the geometry is checked by :func:`_check_geometry` once the bottom's rank is known)."""
    name, ltype = layer.get("name"), layer.get("type")

    def fail(message: str, key: Optional[str] = None, hint: Optional[str] = None) -> HotswapError:
        return HotswapError(message, location=where(layer, key) if key else loc, layer=name,
                            layer_type=ltype, hint=hint)

    if ltype != "Convolution":
        raise fail(f"only Convolution layers can be hot-swapped, this is a {ltype}",
                   hint="choose Convolution layers (PacConv replaces a Convolution)")
    if layer.get("kernel_size") is None and layer.get("kernel_h") is None:
        raise fail("has no kernel_size", hint="give the convolution a kernel_size")
    for key, default in _CONV_ONLY_DEFAULTS.items():
        if layer.get(key, default) != default:
            raise fail(f"{key}: {layer[key]!r} has no PacConv equivalent", key=key,
                       hint=f"only convolutions with {key} {default} can be hot-swapped")


def _check_geometry(layer: Mapping[str, Any], loc: Optional[Location], rank: int) -> None:
    """Refuse a Convolution over ``rank`` spatial axes whose window PacConv cannot have:
    an even kernel, or a padding beyond dilation * (kernel_size - 1) / 2."""
    name = layer.get("name")
    k = _axes(layer, "kernel", 0, rank) if layer.get("kernel_h") is not None else \
        _axes(layer, "kernel_size", 0, rank)
    pad, dil = _axes(layer, "pad", 0, rank), _axes(layer, "dilation", 1, rank)

    def fail(message: str, key: str, hint: str) -> HotswapError:
        return HotswapError(message, location=where(layer, key) or loc, layer=name,
                            layer_type="Convolution", hint=hint)

    if any(kk % 2 == 0 for kk in k):
        key = "kernel_size" if layer.get("kernel_size") is not None else "kernel_h"
        raise fail(f"kernel {'x'.join(map(str, k))} is even; a PAC kernel needs a centre tap "
                   "(odd sizes)", key, "hot-swap only convolutions with odd kernels (1, 3, 5, ...)")
    for p, d, kk in zip(pad, dil, k):
        if 2 * p > d * (kk - 1):
            raise fail(f"pad {p} is more than dilation * (kernel_size - 1) / 2 = "
                       f"{d * (kk - 1) // 2}, which PacConv does not allow", "pad",
                       "hot-swap convolutions that keep or shrink the size")


def _blob_names(tree: Mapping[str, Any]) -> List[str]:
    names = list((tree.get("inputs") or {}).keys())
    for layer in tree.get("layers") or []:
        for t in _as_list(layer.get("top")):
            if t not in names:
                names.append(t)
    return names


def _shapes(tree: Mapping[str, Any], layers: Sequence[str], guide: str,
            inputs: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]]:
    """layer -> (shape of its first bottom, shape of the guide version it binds), from a meta
    build of the test phase, and of the train phase for train-only layers (no allocation)."""
    from pacnet.api import build
    from pacnet.graph import BlobRef

    out: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = {}
    for phase in ("test", "train"):
        if all(name in out for name in layers):
            break  # the train phase is only needed for layers the test phase drops
        net = build(tree, inputs=inputs, phase=phase, fuse=False, device="meta")
        latest: Dict[str, BlobRef] = {n: BlobRef(n) for n in net.inputs}
        for node in net.ir.nodes:
            if node.name in layers and node.name not in out and guide in latest:
                out[node.name] = (net.blob_shapes[node.inputs[0]], net.blob_shapes[latest[guide]])
            for ref in node.outputs:
                latest[ref.name] = ref
    return out


def _fresh(base: str, taken: set) -> str:
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def hotswap(tree: Mapping[str, Any], layers: Sequence[str], guide: str, *, guide_scale: float = 1.0,
            inputs: Optional[Mapping[str, Sequence[int]]] = None, source: Optional[str] = None) -> Dict[str, Any]:
    """Return a copy of the loaded net ``tree`` with the ``layers`` (names of Convolution
    layers) turned into PacConv layers guided by the blob ``guide``; the net's name gets a
    ``_pac`` suffix.

    ``guide_scale`` multiplies the guide (after resizing); ``inputs`` gives concrete input
    shapes for the size comparison (default: the net's ``dims``); ``source`` names the file
    in errors.  Raises :class:`HotswapError` (a :class:`~pacnet.errors.PacnetError`) for an
    unknown layer or guide (with did-you-mean), a layer that is not a Convolution, an even
    kernel, a grouped convolution, padding PacConv refuses, a guide produced after a layer
    it should guide, or a guide of another rank or batch than the layer's input (N x C x H x W,
    or N x C x D x H x W for a 3-D convolution).
    """
    file_loc = Location(source) if source else where(tree)
    if not layers:
        raise HotswapError("no layers to hot-swap", location=file_loc,
                           hint="name Convolution layers, e.g. --layers conv3_3,conv4_3")
    if not isinstance(guide_scale, (int, float)) or isinstance(guide_scale, bool) or \
            not math.isfinite(guide_scale) or guide_scale == 0:
        raise HotswapError(f"guide scale must be a finite non-zero number, got {guide_scale!r}",
                           location=file_loc, hint="e.g. --guide-scale 1e-4 (the PAC paper's)")
    net_layers = tree.get("layers") or []
    names = [l.get("name") for l in net_layers if isinstance(l, Mapping)]
    layers_loc = where(tree, "layers") or file_loc  # the net's `layers:` line
    wanted = list(dict.fromkeys(layers))
    for name in wanted:
        if name not in names:
            convs = [l.get("name") for l in net_layers if isinstance(l, Mapping) and l.get("type") == "Convolution"]
            hint = did_you_mean(name, names) or (
                "Convolution layers: " + ", ".join(convs[:12]) + (", ..." if len(convs) > 12 else "")
                if convs else "the net has no Convolution layers")
            raise HotswapError(f"no layer named {name!r}", location=layers_loc, hint=hint)
    blobs = _blob_names(tree)
    if guide not in blobs:
        raise HotswapError(f"no blob named {guide!r} to guide with", location=layers_loc,
                           hint=did_you_mean(guide, blobs) or "the guide must be an input or a layer's top")
    for i, layer in enumerate(net_layers):
        if layer.get("name") in wanted:
            _check_layer(layer, where(net_layers, i))
            before = set((tree.get("inputs") or {}).keys())
            for prev in net_layers[:i]:
                before.update(_as_list(prev.get("top")))
            if guide not in before:
                raise HotswapError(f"the guide {guide!r} is produced after this layer", location=where(net_layers, i),
                                   layer=layer.get("name"), layer_type="Convolution",
                                   hint="choose a guide computed before every swapped layer (an input, or "
                                        "an earlier feature map)")

    shapes = _shapes(tree, wanted, guide, inputs)
    taken = set(names) | set(blobs)
    out_layers: List[Any] = []
    for i, layer in enumerate(net_layers):
        name = layer.get("name")
        if name not in wanted:
            out_layers.append(copy.deepcopy(layer))
            continue
        found = shapes.get(name)
        if found is None:  # the guide is not reachable in the phase(s) that run this layer
            raise HotswapError(f"the guide {guide!r} does not exist where this layer runs", layer=name,
                               location=where(net_layers, i), layer_type="Convolution",
                               hint="check the include/exclude rules of the guide's producer")
        in_shape, g_shape = found
        rank = len(in_shape) - 2
        _check_geometry(layer, where(net_layers, i), rank)
        if len(g_shape) != len(in_shape) or g_shape[0] != in_shape[0]:
            layout = " x ".join(("N", "C") + SPATIAL_AXES.get(rank, ("...",)))
            raise HotswapError(f"the guide {guide!r} has shape {list(g_shape)}; it must be "
                               f"{layout} like the layer's input, with its N (input "
                               f"{list(in_shape)})",
                               layer=name, location=where(net_layers, i), layer_type="Convolution")
        bottom = _as_list(layer.get("bottom"))[0]
        # the guide's layers run where the swapped layer runs (its phase/stage rules)
        rules = {k: copy.deepcopy(layer[k]) for k in ("include", "exclude") if k in layer}
        g_blob = guide
        if tuple(g_shape[2:]) != tuple(in_shape[2:]):
            resized = _fresh(f"{name}_guide", taken)
            mode = "trilinear" if rank == 3 else "bilinear"
            out_layers.append({"name": resized, "type": "Resize", "bottom": [guide, bottom], "top": resized,
                               **rules, "mode": mode, "align_corners": False})
            g_blob = resized
        if guide_scale != 1:
            scaled = g_blob if g_blob != guide else _fresh(f"{name}_guide", taken)
            out_layers.append({"name": _fresh(f"{name}_guide_scale", taken), "type": "Power",
                               "bottom": g_blob, "top": scaled, **rules, "scale": float(guide_scale)})
            g_blob = scaled
        out_layers.append(_swapped(layer, bottom, g_blob))
    result = {k: copy.deepcopy(v) for k, v in tree.items() if k != "layers"}
    if isinstance(result.get("name"), str):
        result["name"] = result["name"] + "_pac"
    result["layers"] = out_layers
    return result


def _swapped(layer: Mapping[str, Any], bottom: str, guide_blob: str) -> Dict[str, Any]:
    """The PacConv layer replacing Convolution ``layer``: same name, tops, param entries and
    geometry; a missing filler is written as Caffe's default (constant 0) so the swapped layer
    initialises as the convolution did (PacConv's own default is the original's uniform)."""
    new: Dict[str, Any] = {}
    for key, value in layer.items():
        if key in _CONV_ONLY_DEFAULTS or key in _IGNORED:
            continue
        new[key] = copy.deepcopy(value)
    new["type"] = "PacConv"
    new["bottom"] = [bottom, guide_blob]
    ordered = {k: new.pop(k) for k in _LAYER_KEYS if k in new}
    ordered.update(new)
    for key in ("weight_filler", "bias_filler"):
        if key not in ordered:
            ordered[key] = {"type": "constant", "value": 0.0}
    return ordered


# ----------------------------------------------------------------------------- YAML


def _flow(value: Any) -> str:
    text = yaml.safe_dump([_plain(value)], default_flow_style=True, width=1 << 30, sort_keys=False).strip()
    return text[1:-1]  # the value inside the one-item list


def _layer_lines(layer: Mapping[str, Any], width: int = 110) -> List[str]:
    parts = [f"{_flow(k)}: {_flow(v)}" for k, v in _plain(layer).items()]
    lines, current = [], "  - {"
    for j, part in enumerate(parts):
        piece = part + ("}" if j == len(parts) - 1 else ",")
        if current not in ("  - {",) and len(current) + 1 + len(piece) > width:
            lines.append(current)
            current = "     " + piece
        else:
            current += ("" if current == "  - {" else " ") + piece
    lines.append(current)
    return lines


def to_yaml(net: Mapping[str, Any], header: Sequence[str] = ()) -> str:
    """A readable net file: ``header`` lines as comments, the top-level keys in the usual
    order, then one flow mapping per layer (wrapped at 110 columns)."""
    lines = [f"# {h}".rstrip() for h in header]
    keys = [k for k in _KEY_ORDER if k in net] + [k for k in net if k not in _KEY_ORDER]
    for key in keys:
        if key == "layers":
            continue
        value = _plain(net[key])
        if isinstance(value, Mapping) and value and len(_flow(value)) + len(key) > 100:
            lines.append(f"{_flow(key)}:")
            for k, v in value.items():
                lines.append(f"  {_flow(k)}: {_flow(v)}")
        else:
            lines.append(f"{_flow(key)}: {_flow(value)}")
    lines.append("layers:")
    for layer in net.get("layers") or []:
        lines.extend(_layer_lines(layer))
    return "\n".join(lines) + "\n"
