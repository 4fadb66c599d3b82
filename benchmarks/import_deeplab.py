"""Caffe import benchmark: the 22k-line DeepLab v2 ResNet-101 MSC train prototxt.

Stages, each timed separately (median of ``--repeats`` runs, in one process, after one
warm-up run so imports and first-use caches are excluded):

* ``parse``     protobuf text -> generic tree (:mod:`pacnet.prototxt`);
* ``convert``   parse + NetParameter -> pacnet net dict (:func:`load_prototxt`);
* ``build``     ``pacnet.build(prototxt, phase="train", device="meta")``: the whole compiler
  (convert, validate, graph, shapes, codegen) without allocating weights.  Target < 2 s.
* ``build+init`` the same with parameters allocated and Caffe-initialised (reference).
* ``yaml``      reference: ``pacnet.build`` of the same net written as pacnet YAML by
  ``pacnet convert`` (the route a converted net takes afterwards); the ratio says what the
  prototxt route costs relative to it.

Usage: ``python benchmarks/import_deeplab.py [--repeats 5] [--net PATH]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "graphs", "deeplab",
                                        "v2_resnet101_aspp_msc", "train.prototxt"))
VARS = {"NUM_LABELS": 21, "EXP": "voc12", "NET_ID": "deeplab_msc", "DATA_ROOT": "/data/VOC2012",
        "TRAIN_SET": "train_aug", "TEST_SET": "val", "FEATURE_DIR": "features"}


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default=DEFAULT, help="prototxt to import (default: DeepLab MSC train)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--phase", default="train", choices=("train", "test"))
    args = ap.parse_args(argv)
    if not os.path.exists(args.net):
        print(f"no such file: {args.net}", file=sys.stderr)
        return 2

    import pacnet
    from pacnet.caffe_import import convert_to_yaml_text, load_prototxt
    from pacnet.prototxt import parse, read_text

    warnings.simplefilter("ignore")
    text = read_text(args.net)
    lines = text.count("\n") + 1
    vars = {k: v for k, v in VARS.items() if "${" + k + "}" in text}
    net, _ = load_prototxt(args.net, vars)

    with tempfile.TemporaryDirectory() as tmp:
        yaml_path = os.path.join(tmp, "net.yaml")
        with open(yaml_path, "w", encoding="utf-8") as fh:
            fh.write(convert_to_yaml_text(net))
        rows = [
            ("parse", median_time(lambda: parse(text, vars, file=args.net), args.repeats)),
            ("convert", median_time(lambda: load_prototxt(args.net, vars), args.repeats)),
            ("build (meta)", median_time(lambda: pacnet.build(args.net, vars=vars, phase=args.phase,
                                                              device="meta"), args.repeats)),
            ("build+init", median_time(lambda: pacnet.build(args.net, vars=vars, phase=args.phase),
                                       max(1, args.repeats // 2))),
            ("yaml build (meta)", median_time(lambda: pacnet.build(yaml_path, phase=args.phase,
                                                                   device="meta"), args.repeats)),
        ]
    ref = dict(rows)["yaml build (meta)"]
    print(f"{os.path.relpath(args.net)}: {lines} lines, {len(net['layers'])} layers, "
          f"phase {args.phase}, median of {args.repeats}")
    print(f"{'stage':<20}{'median s':>10}{'vs yaml':>10}")
    for name, t in rows:
        print(f"{name:<20}{t:>10.3f}{t / ref:>9.2f}x")
    target = dict(rows)["build (meta)"]
    verdict = "OK" if target < 2.0 else "SLOW"
    print(f"convert + build: {target:.3f} s (target < 2 s): {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
