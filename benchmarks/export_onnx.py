"""Benchmark: the exported ONNX files in onnxruntime (CPU) against pacnet in PyTorch.

Two parts, each timed in one process with both sides warmed up and interleaved, medians of
``--repeats`` runs, 2 threads for torch, Numba and onnxruntime:

``unfold``: which formulation of a PAC convolution (``pac_conv``: unfold the input,
scale the taps by K, contract with the weight) runs fastest in onnxruntime.  Every
formulation is a plain ONNX graph of the same op, checked against a NumPy reference:

* ``onehot``  -- every channel convolved with k*k one-hot filters (batch x channels as the
  convolution's batch; what ``pacnet.onnx_ops.Unfold`` does),
* ``grouped`` -- the same as one grouped convolution (group = channels; needs the channel
  count as an attribute),
* ``slices``  -- Pad, then one strided Slice per tap, Concat (unrolled per kernel size),
* ``gather``  -- Pad, Gather rows, Gather columns, Transpose (torch.onnx's im2col),
* ``per_tap`` -- no column tensor: per tap, Slice x, scale by K, 1x1 Conv, then Sum (unrolled).

``net``: the main job's net (``jointupsample/pac_joint_upsample_x8``, target 32 x 32,
guide 256 x 256, batch 1, float32, eval mode, random weights) exported with
``pacnet.export_onnx`` and run in onnxruntime, beside the same net's forward in PyTorch
(``torch.no_grad``, pacnet's fused Numba kernels).

    python benchmarks/export_onnx.py                     # both parts
    python benchmarks/export_onnx.py --part unfold --repeats 15
    python benchmarks/export_onnx.py --part net --size 64   # a 64 x 64 target (guide 512 x 512)

Measured: see the README's "Export to ONNX" section (figures and conditions).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

THREADS = 2


# ----------------------------------------------------------------------------- unfold

def _graph(nodes, x_shape, k_shape, y_shape, inits):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        nodes, "pac_conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)),
         helper.make_tensor_value_info("K", TensorProto.FLOAT, list(k_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(y_shape))], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


class _Builder:
    """Nodes and constants of one formulation, for an ``x [b, C, H, W]`` input, kernel ``k``
    (odd, stride 1, padding ``p``, dilation 1), ``O`` outputs."""

    def __init__(self, b, C, O, H, k, p, weight, bias):
        self.b, self.C, self.O, self.H, self.k, self.p = b, C, O, H, k, p
        self.oh = H + 2 * p - k + 1
        self.weight, self.bias = weight, bias
        self.nodes, self.inits, self._n = [], [], 0

    def const(self, value, dtype=np.int64):
        from onnx import numpy_helper

        self._n += 1
        name = f"c{self._n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def node(self, op, inputs, out=None, **attrs):
        from onnx import helper

        self._n += 1
        out = out or f"v{self._n}"
        self.nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def padded(self):
        p = self.p
        return self.node("Pad", ["x", self.const([0, 0, p, p, 0, 0, p, p])])

    def contract(self, cols):
        """cols ``[b, C, k*k, oh, ow]`` -> scaled by K -> 1x1 convolution with the weight."""
        b, C, O, k, oh = self.b, self.C, self.O, self.k, self.oh
        k5 = self.node("Reshape", ["K", self.const([b, 1, k * k, oh, oh])])
        flat = self.node("Reshape", [self.node("Mul", [cols, k5]),
                                     self.const([b, C * k * k, oh, oh])])
        w = self.const(self.weight.reshape(O, C * k * k, 1, 1), np.float32)
        self.node("Conv", [flat, w, self.const(self.bias, np.float32)], out="y")

    def model(self):
        return _graph(self.nodes, (self.b, self.C, self.H, self.H),
                      (self.b, 1, self.k, self.k, self.oh, self.oh),
                      (self.b, self.O, self.oh, self.oh), self.inits)


def onehot(f):
    k, kk = f.k, f.k * f.k
    eye = f.const(np.eye(kk).reshape(kk, 1, k, k), np.float32)
    planes = f.node("Reshape", ["x", f.const([f.b * f.C, 1, f.H, f.H])])
    cols = f.node("Conv", [planes, eye], pads=[f.p] * 4)
    f.contract(f.node("Reshape", [cols, f.const([f.b, f.C, kk, f.oh, f.oh])]))


def grouped(f):
    k, kk = f.k, f.k * f.k
    eye = f.const(np.tile(np.eye(kk).reshape(kk, 1, k, k), (f.C, 1, 1, 1)), np.float32)
    cols = f.node("Conv", ["x", eye], pads=[f.p] * 4, group=f.C)
    f.contract(f.node("Reshape", [cols, f.const([f.b, f.C, kk, f.oh, f.oh])]))


def slices(f):
    xp, axes, two = f.padded(), f.const([2, 3]), f.const([2])
    taps = [f.node("Unsqueeze", [f.node("Slice", [xp, f.const([i, j]),
                                                  f.const([i + f.oh, j + f.oh]), axes]), two])
            for i in range(f.k) for j in range(f.k)]
    f.contract(f.node("Concat", taps, axis=2))


def gather(f):
    index = f.const(np.arange(f.oh)[None, :] + np.arange(f.k)[:, None])
    rows = f.node("Gather", [f.padded(), index], axis=2)               # [b, C, k, oh, Wp]
    both = f.node("Gather", [rows, index], axis=4)                     # [b, C, k, oh, k, ow]
    cols = f.node("Transpose", [both], perm=[0, 1, 2, 4, 3, 5])
    f.contract(f.node("Reshape", [cols, f.const([f.b, f.C, f.k * f.k, f.oh, f.oh])]))


def per_tap(f):
    xp, axes, ax1 = f.padded(), f.const([2, 3]), f.const([1])
    k4 = f.node("Reshape", ["K", f.const([f.b, f.k * f.k, f.oh, f.oh])])
    terms = []
    for i in range(f.k):
        for j in range(f.k):
            t = i * f.k + j
            xs = f.node("Slice", [xp, f.const([i, j]), f.const([i + f.oh, j + f.oh]), axes])
            kt = f.node("Slice", [k4, f.const([t]), f.const([t + 1]), ax1])
            w = f.const(np.ascontiguousarray(f.weight[:, :, i:i + 1, j:j + 1]), np.float32)
            terms.append(f.node("Conv", [f.node("Mul", [xs, kt]), w]))
    f.node("Add", [f.node("Sum", terms), f.const(f.bias.reshape(1, -1, 1, 1), np.float32)],
           out="y")


FORMULATIONS = {"onehot": onehot, "grouped": grouped, "slices": slices, "gather": gather,
                "per_tap": per_tap}


def _reference(x, K, weight, bias, k, p):
    b, C, H, _ = x.shape
    oh = H + 2 * p - k + 1
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (p, p), (p, p)))
    out = np.zeros((b, weight.shape[0], oh, oh))
    for i in range(k):
        for j in range(k):
            taps = xp[:, :, i:i + oh, j:j + oh] * K[:, 0, i, j][:, None]
            out += np.einsum("oc,bcyx->boyx", weight[:, :, i, j], taps)
    return out + bias[None, :, None, None]


def _session(model):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def bench_unfold(repeats: int) -> None:
    cases = [  # (b, C, O, H, k, p): the x8 net's PAC convolutions (its transposed layers
        # convolve a zero-inserted 32/64/128 input at 64^2, 128^2, 256^2) and a CRF message
        (1, 32, 32, 68, 5, 0), (1, 32, 32, 132, 5, 0), (1, 32, 32, 260, 5, 0),
        (1, 21, 21, 128, 5, 2)]
    rng = np.random.default_rng(0)
    print(f"pac_conv formulations in onnxruntime {_ort_version()}, {THREADS} threads, "
          f"median of {repeats} (ms):")
    names = list(FORMULATIONS)
    print(f"{'case':30s}" + "".join(f"{n:>10s}" for n in names) + "   fastest")
    for b, C, O, H, k, p in cases:
        oh = H + 2 * p - k + 1
        x = rng.standard_normal((b, C, H, H)).astype(np.float32)
        K = rng.random((b, 1, k, k, oh, oh)).astype(np.float32)
        weight = (rng.standard_normal((O, C, k, k)) / np.sqrt(C * k * k)).astype(np.float32)
        bias = rng.standard_normal(O).astype(np.float32)
        want = _reference(x, K, weight, bias, k, p)
        sessions = {}
        for name, build in FORMULATIONS.items():
            f = _Builder(b, C, O, H, k, p, weight, bias)
            build(f)
            sessions[name] = _session(f.model())
            got = sessions[name].run(None, {"x": x, "K": K})[0]
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), name
        times = {n: [] for n in names}
        for _ in range(repeats):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"x": x, "K": K})
                times[name].append(time.perf_counter() - start)
        med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
        best = min(med, key=med.get)
        label = f"b{b} C{C} O{O} {H}^2 k{k} p{p}"
        print(f"{label:30s}" + "".join(f"{med[n]:10.2f}" for n in names) + f"   {best}",
              flush=True)


# ----------------------------------------------------------------------------- net

def bench_net(repeats: int, size: int) -> None:
    import numba
    import onnxruntime as ort
    import torch

    import pacnet
    from pacnet.export import export_onnx

    torch.set_num_threads(THREADS)
    numba.set_num_threads(THREADS)
    inputs = {"target": (1, 1, size, size), "guide": (1, 3, 8 * size, 8 * size)}
    net = pacnet.build("jointupsample/pac_joint_upsample_x8", inputs=inputs).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in net.parameters():
            t.copy_(torch.randn(t.shape, generator=gen) * (0.5 / max(1, t[0].numel())) ** 0.5)
    feed = {k: torch.rand(s, generator=gen) for k, s in inputs.items()}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x8.onnx")
        start = time.perf_counter()
        result = export_onnx(net, path, inputs=feed, verify=True)
        export_s = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    onnx_feed = {k: v.numpy() for k, v in feed.items()}

    def run_torch():
        with torch.no_grad():
            net(*feed.values())

    def run_ort():
        session.run(None, onnx_feed)

    for fn in (run_torch, run_ort, run_torch, run_ort):  # warm up (kernels, arenas)
        fn()
    times = {"pacnet (PyTorch + Numba)": [], "onnxruntime": []}
    for _ in range(repeats):
        for (name, fn) in zip(times, (run_torch, run_ort)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    med = {n: statistics.median(v) * 1e3 for n, v in times.items()}
    base = med["pacnet (PyTorch + Numba)"]
    print(f"\njointupsample/pac_joint_upsample_x8, target {size}^2 -> {8 * size}^2, batch 1, "
          f"forward, {THREADS} threads, median of {repeats} (export took {export_s:.1f} s, "
          f"max error {max(c.max_abs for c in result.checks):.2g}):")
    for name, ms in med.items():
        lo, hi = min(times[name]) * 1e3, max(times[name]) * 1e3
        print(f"  {name:28s} {ms:9.1f} ms ({lo:.1f}-{hi:.1f})   {base / ms:5.2f}x")


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("unfold", "net", "all"), default="all")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--size", type=int, default=32, help="the net's target size (32)")
    args = parser.parse_args(argv)
    if args.part in ("unfold", "all"):
        bench_unfold(args.repeats)
    if args.part in ("net", "all"):
        bench_net(args.repeats, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
