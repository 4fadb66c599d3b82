"""``pacnet test NET --weights W``: evaluate weights on the test (or val) split of the net's data.

    pacnet test nets/jointupsample/pac_joint_upsample_x8.yaml --weights work_dirs/pac_joint_upsample_x8
    pacnet test NET --weights model.safetensors --save-predictions preds/ --max-batches 10

``W`` is a ``.safetensors`` file, a ``.pth``/``.pt``/``.pth.tar`` of a model the net's
``weights_from`` names (NVlabs/pacnet's published files for the zoo nets), a checkpoint's
``.state.pt`` or a work dir (its latest checkpoint); ``a,b`` loads several files as one
set.  Every blob of the test net must come from the files.  Prints the data set's metric
-- mean IoU and pixel accuracy for segmentation, RMSE beside the bilinear baseline for
depth, EPE beside bilinear for flow -- and the mean of every scalar output of the test net
(losses, accuracies).  ``--save-predictions`` writes one
file per sample: a VOC palette PNG, a ``.npy`` depth map (metres) or a ``.flo`` flow field.
"""

from __future__ import annotations

import argparse

from pacnet.cli.common import description, int_at_least, parse_assignments
from pacnet.cli.train import (_data_options, _net_name, baseline_table, console, fmt,
                              is_main_process, short_openmp_spin, results)


def add_parser(sub) -> None:
    p = sub.add_parser("test", help="evaluate weights on the net's test data (mIoU, RMSE, EPE)",
                       description=description(__doc__))
    p.add_argument("net", metavar="NET", help="net file with a data: section (YAML or .prototxt)")
    p.add_argument("--weights", required=True, metavar="W",
                   help="a .safetensors file, a .pth/.pt/.pth.tar the net's weights_from maps, "
                        "a checkpoint .state.pt, or a work dir (its latest checkpoint); a,b for "
                        "several")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which split of data: (default test)")
    p.add_argument("--save-predictions", metavar="DIR", help="write one prediction file per sample into DIR")
    p.add_argument("--max-batches", type=int_at_least(0), metavar="N", help="evaluate at most N batches")
    p.add_argument("--device", metavar="D", help="cpu, cuda or cuda:N (default: a GPU if there is one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a value, e.g. data.batch_size=1; repeatable")
    p.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", dest="vars",
                   help="value of a ${NAME} template variable; repeatable")
    p.add_argument("--no-fuse", action="store_true", help="keep the graph as written (no fusion passes)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    short_openmp_spin()
    from rich.table import Table

    from pacnet.engine import trainer
    from pacnet.load import load

    overrides = parse_assignments(args.overrides, "--set")
    variables = parse_assignments(args.vars, "--var", typed=False)
    tree = load(args.net, vars=variables, overrides=overrides)
    name = _net_name(tree, args.net)
    record = trainer.test(args.net, args.weights, vars=variables, overrides=overrides, device=args.device,
                          split=args.split, out_dir=args.save_predictions, max_batches=args.max_batches,
                          fuse=not args.no_fuse)
    if not is_main_process():
        return 0
    con = console()
    con.print(f"{name}: {record['weights']} on the {record['split']} split, {record['samples']} samples, "
              f"{record['batches']} batches, {fmt(record['seconds'])} s", markup=False, soft_wrap=True)
    table = Table(title=f"{args.split} results", header_style="bold")
    table.add_column("result")
    table.add_column("value", justify="right")
    found = results(record)
    for key, value in found.items():
        table.add_row(key, fmt(value))
    if "iou" in record:  # per-class IoU of segmentation, one compact row
        table.add_row("iou per class", " ".join(fmt(v) for v in record["iou"]))
    if not found:
        table.add_row("(none)", "the net has no scalar outputs and the data no metric")
    con.print(table)
    compare = baseline_table(record, name, _data_options(tree, args.net), f"{args.split} set: net")
    if compare is not None:
        con.print(compare)
    if args.save_predictions:
        con.print(f"wrote {record.get('written', 0)} predictions to {args.save_predictions}", markup=False,
                  soft_wrap=True)
    return 0
