"""CLI commands for integer deployment: ``export``, ``run`` and ``intdeploy`` (thin wrappers)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from monquant.cli.common import (
    allow_unconverged_arg,
    bit_width,
    bits_arg,
    data_args,
    emit,
    granularity_arg,
    load_data,
    positive_int,
    renamed_flag,
    require_checkpoint,
    require_deployment,
    step_rule_arg,
    unconverged_status,
)
from monquant.storage.files import check_output_file

__all__ = ["register"]

EPILOG_EXPORT = """examples:
  monquant export runs/float/model.safetensors --bits 8 --out model-int8.safetensors
  monquant export runs/float/model.safetensors --bits 4 --act-bits 16 --u-bits 8
"""
EPILOG_RUN = """examples:
  monquant run model-int8.safetensors --test-limit 1000     # first 1000 MNIST test images
  monquant run model-int8.safetensors --input batch.npz     # tensor 'x' (N x 784), optional 'y'
"""
EPILOG_INTDEPLOY = """examples:
  monquant intdeploy runs/float/model.safetensors --out results/intdeploy
  monquant intdeploy runs/float/model.safetensors --bits 4 8 --act-bits 12 16 --test-limit 500
"""


def _float_parts(checkpoint: str, command: str):
    model = require_checkpoint(checkpoint, command).model.eval()
    layer = model.layer
    return (
        model,
        layer.weight().detach().double(),
        layer.U.weight.detach().double(),
        layer.U.bias.detach().double(),
        model.head.weight.detach().float(),
        model.head.bias.detach().float(),
    )


def cmd_export(args: argparse.Namespace) -> int:
    from monquant.deploy.files import check_deployable, export_deployment, export_float_checkpoint

    _, W, U, b, hw, hb = _float_parts(args.checkpoint, args.command)
    if args.out:
        check_output_file(args.out)
    if not args.allow_uncertified:  # decided by W alone: refused before any data loads
        check_deployable(W, args.bits, args.granularity, allow="--allow-uncertified",
                         step_rule=args.step_rule)  # fmt: skip
    data = load_data(args)
    calib = data.x_train[: args.calibration_limit].double()
    out = Path(args.out or Path(args.checkpoint).with_name(f"deploy-{args.bits}bit.safetensors"))
    res = export_deployment(
        out, W, U, b, hw, hb, args.bits, args.act_bits, x_calib=calib, u_bits=args.u_bits,
        granularity=args.granularity, max_iter=args.max_iter, step_rule=args.step_rule,
        require_certified=not args.allow_uncertified,
    )  # fmt: skip
    ref = export_float_checkpoint(out.with_name(out.stem + ".float32-reference.safetensors"),
                                  W, U, b, hw, hb)  # fmt: skip
    ratio = ref.nbytes / res.nbytes
    text = (
        f"wrote {res.path} ({res.nbytes:,} bytes; {'certified' if res.certified else 'NOT certified'})"
        f"\nfloat32 file of the same tensors: {ref.nbytes:,} bytes -> {ratio:.2f}x smaller"
    )
    emit(args, {"path": str(res.path), "bytes": res.nbytes, "float32_bytes": ref.nbytes,
                 "ratio": ratio, "certified": res.certified, "metadata": res.metadata}, text)  # fmt: skip
    return 0


def _inputs(args: argparse.Namespace):
    import torch

    from monquant.errors import CheckpointError
    from monquant.storage.tensors import load_weight_file

    if args.input:
        t = load_weight_file(args.input)
        if "x" not in t:
            raise CheckpointError(f"{args.input}: no tensor named 'x' (found {sorted(t)})")
        y = t.get("y")
        return t["x"].double(), (y.long() if y is not None else None)
    from monquant.data import subset

    data = load_data(args)
    x, y = subset(data.x_test, data.y_test, args.test_limit)
    return x.to(torch.float64), y


def cmd_run(args: argparse.Namespace) -> int:
    from monquant.deploy.files import load_deployment
    from monquant.errors import ConfigError

    require_deployment(args.file, args.command)
    dep = load_deployment(args.file)
    if args.max_iter is not None:
        dep.solver.max_iter = args.max_iter
    x, y = _inputs(args)
    d = dep.U.shape[1]
    if x.dim() != 2 or x.shape[1] != d:
        raise ConfigError(f"inputs must be (N, {d}) to match the deployment, got {tuple(x.shape)}")
    logits, report = dep.run(x, reference=args.reference, allow_uncertified=args.allow_uncertified,
                             progress=not args.no_progress)  # fmt: skip
    pred = logits.argmax(dim=1)
    summary: dict[str, Any] = report.summary()
    summary["samples"] = int(x.shape[0])
    if y is not None:
        summary["accuracy"] = float((pred == y).double().mean())
    unsettled = round((1 - summary["settled_fraction"]) * summary["samples"])
    text = (
        f"{summary['samples']} inputs: {summary['settled_fraction']:.1%} settled "
        f"(an exact fixed point of the integer map), mean iterations "
        f"{summary['mean_iterations']:.1f}, max {summary['max_iterations']}"
        + (f", accuracy {summary['accuracy']:.4f}" if y is not None else "")
        + (f"\nWARNING: {unsettled} inputs did not settle within the budget" if unsettled else "")
    )
    if "max_distance_to_float" in summary:
        text += f"\nmax distance to the float64 equilibrium of W~: {summary['max_distance_to_float']:.3g}"
    if args.per_sample:
        summary["per_sample"] = report.per_sample()
        summary["predictions"] = pred.tolist()
    emit(args, summary, text)
    return unconverged_status(args, unsettled, "inputs did not settle within the iteration budget")


def cmd_intdeploy(args: argparse.Namespace) -> int:
    from monquant.experiments.integer.report import write_report
    from monquant.experiments.integer.study import run_intdeploy

    _, W, U, b, hw, hb = _float_parts(args.checkpoint, args.command)
    data = load_data(args)
    from monquant.data import subset

    x, y = subset(data.x_test, data.y_test, args.test_limit)
    x = x.double()
    res = run_intdeploy(
        args.out, W, U, b, hw, hb, x, y, weight_bits=tuple(args.bits),
        act_bits=tuple(args.act_bits), echo=None if args.no_progress else _stderr_line,
    )  # fmt: skip
    res = write_report(args.out, res)
    emit(args, res, f"report: {Path(args.out) / 'report.md'}")
    return 0


def _stderr_line(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def register(add) -> None:
    """Add the deployment commands to the main parser (``add`` from :func:`monquant.cli`)."""

    e = add("export", cmd_export, "write an integer deployment file (packed codes, certificate)",
            EPILOG_EXPORT)  # fmt: skip
    e.add_argument("checkpoint", help="monquant model checkpoint (.safetensors from train)")
    bits_arg(e, many=False, required=True, help_="weight bit-width of W (and U)")
    bits_arg(e, many=False, flag="--u-bits", help_="bit-width of U (default: --bits)")
    e.add_argument("--act-bits", type=int, default=16, help="fixed-point bits of the iterate")
    granularity_arg(e)
    step_rule_arg(e)
    e.add_argument(
        "--max-iter",
        type=positive_int,
        default=2000,
        help="iteration cap of the integer solver stored in the file",
    )
    e.add_argument(
        "--calibration-limit",
        type=positive_int,
        default=1000,
        metavar="K",
        help="calibrate the activation format on the first K training images",
    )
    renamed_flag(e, "--calibration", "--calibration-limit", "calibration_limit", type=positive_int)
    e.add_argument(
        "--out",
        default=None,
        help="deployment file (default: deploy-<bits>bit.safetensors beside CKPT)",
    )
    e.add_argument("--allow-uncertified", action="store_true",
                   help="write the file even if W~ is not certified (flagged; run refuses it)")  # fmt: skip
    data_args(e)

    r = add("run", cmd_run, "run a deployment file with the integer solver (no training code)",
            EPILOG_RUN)  # fmt: skip
    r.add_argument("file", help="deployment file written by 'monquant export'")
    g = r.add_mutually_exclusive_group(required=True)
    g.add_argument("--input", help=".npz/.safetensors with tensor 'x' (and optional labels 'y')")
    g.add_argument("--test-limit", type=positive_int, metavar="K",
                   help="the first K MNIST test images")  # fmt: skip
    renamed_flag(g, "--mnist", "--test-limit", "test_limit", type=positive_int)
    r.add_argument("--reference", action="store_true",
                   help="also solve the float64 equilibrium of the same W~ and report distances")  # fmt: skip
    r.add_argument("--per-sample", action="store_true", help="include per-input reports")
    r.add_argument(
        "--allow-uncertified",
        action="store_true",
        help="run a file flagged uncertified (radii are then inf)",
    )
    r.add_argument("--max-iter", type=positive_int, default=None,
                   help="iteration cap (default: the one stored in the file)")  # fmt: skip
    allow_unconverged_arg(r)
    data_args(r)

    i = add("intdeploy", cmd_intdeploy, "validate integer iterates against Corollary 2",
            EPILOG_INTDEPLOY)  # fmt: skip
    i.add_argument("checkpoint", help="monquant model checkpoint (.safetensors from train)")
    i.add_argument("--out", default="results/intdeploy", help="results folder")
    bits_arg(i, many=True, default=[4, 6, 8], help_="bit-widths of W (and U)")
    renamed_flag(i, "--weight-bits", "--bits", "bits", type=bit_width, nargs="+")
    i.add_argument(
        "--act-bits",
        type=int,
        nargs="+",
        default=[8, 12, 16],
        help="fixed-point bits of the iterate",
    )
    i.add_argument(
        "--test-limit", type=positive_int, default=1000, metavar="K",
        help="the first K MNIST test images",
    )  # fmt: skip
    data_args(i)
