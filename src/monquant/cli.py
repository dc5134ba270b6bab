"""Command-line interface: ``monquant <command>``. Thin: parse, call the library, print.

Every command accepts ``--json`` for machine-readable output on stdout, exits non-zero on error
with a one-line message on stderr, and shows progress on stderr for long work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from monquant import __version__
from monquant.cli_lowbit import register as register_lowbit
from monquant.errors import MonquantError

__all__ = ["build_parser", "main"]

EPILOG_TRAIN = """examples:
  monquant train --out runs/float                 # the paper's setup (15 epochs, PR solver)
  monquant train --out runs/qat4 --qat-bits 4     # quantization-aware training at 4 bits
  monquant train --out runs/float --resume        # continue an interrupted run
"""
EPILOG_CERTIFY = """examples:
  monquant certify runs/float/model.safetensors --bits 3 4 5 6 8
  monquant certify weights.npz --bits 4 8 --granularity per-channel --json
  monquant certify runs/float/model.safetensors --min-bits
"""
EPILOG_PTQ = """examples:
  monquant ptq runs/float/model.safetensors --bits 8
  monquant ptq runs/float/model.safetensors --bits 6 --granularity per-channel --quantize W,U,b
"""


def _emit(args: argparse.Namespace, data: Any, text: str) -> None:
    from monquant.report import to_jsonable

    if getattr(args, "json", False):
        print(json.dumps(to_jsonable(data), indent=2))
    else:
        print(text)


def _solver_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=["fb", "pr", "dr"], default="pr", help="splitting method")
    g.add_argument("--tol", type=float, default=1e-4, help="relative residual tolerance")
    g.add_argument("--max-iter", type=int, default=2000, help="iteration cap (reported if hit)")
    g.add_argument("--step", type=float, default=None, help="step size (default: FB m/L^2, PR 1/L)")


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST IDX files (else $MONQUANT_DATA, the cache, or a download)",
    )
    p.add_argument("--no-download", action="store_true", help="never download MNIST")


def _load_data(args: argparse.Namespace):
    from monquant.data import load_mnist

    return load_mnist(args.data_dir, download=not args.no_download)


# --------------------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from monquant.workflows import TrainRequest, run_training

    req = TrainRequest(
        out=Path(args.out),
        hidden=args.hidden,
        rank=args.rank,
        margin_init=args.margin_init,
        learn_margin=not args.fixed_margin,
        solver=dict(method=args.solver, tol=args.tol, max_iter=args.max_iter, step=args.step),
        backward=args.backward,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        decay_epoch=args.decay_epoch,
        decay=args.decay,
        seed=args.seed,
        qat_bits=args.qat_bits,
        qat_granularity=args.granularity,
        margin_target=args.margin_target,
        margin_weight=args.margin_weight,
        resume=args.resume,
        progress=not args.no_progress,
    )
    data = _load_data(args)
    result = run_training(req, data, echo=None if args.json else print)
    last = result["history"][-1]
    _emit(
        args,
        result,
        f"trained {last['epoch']} epochs: test accuracy {last['test_accuracy']:.4f}, "
        f"m {last['m']:.4f}, L {last['L']:.4f}, kappa {last['kappa']:.2f}, "
        f"unconverged train/test solves {sum(h['train_unconverged'] for h in result['history'])}"
        f"/{last['test_unconverged']}\nmodel: {result['model']}\nlog: {result['log']}",
    )
    return 0


# ------------------------------------------------------------------------------------- certify
def _load_W(path: str):
    """``W`` (and the model, if any) from a checkpoint or a plain weights file."""
    from monquant.checkpoint import load_model
    from monquant.errors import CheckpointError
    from monquant.io import is_monquant_file, load_weight_file
    from monquant.operators import check_weight

    p = Path(path)
    if p.suffix == ".safetensors" and is_monquant_file(p):
        try:
            loaded = load_model(p)
            return loaded.model.layer.weight().detach().double(), loaded
        except CheckpointError as exc:
            if "not a monquant model checkpoint" not in str(exc):
                raise
    weights = load_weight_file(p)
    if "W" not in weights:
        raise CheckpointError(f"{p}: no tensor named 'W' (found: {', '.join(sorted(weights))})")
    W = weights["W"]
    if W.is_complex():
        raise CheckpointError(f"{p}: W is complex ({W.dtype}); a MonDEQ weight must be real")
    if not W.is_floating_point():
        W = W.double()
    check_weight(W, f"{p.name}:W")
    return W.double(), None


def certificate_rows(certs) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows of the certificate table (see :data:`report.CERTIFICATE_COLUMNS`)."""
    from monquant.report import certificate_cells, certificate_headers

    extra = ("rho_fb_exact", "rho_pr_exact", "relative_displacement_bound")
    headers = certificate_headers(["rho_FB", "rho_PR", "rel.disp.bound"])
    return headers, [certificate_cells(c.to_dict(), extra) for c in certs]


def cmd_certify(args: argparse.Namespace) -> int:
    from monquant.certify import certify, min_certified_bits
    from monquant.report import text_table
    from monquant.verified import spectral_bounds

    W, _ = _load_W(args.path)
    st = spectral_bounds(W)
    kappa = st.L / st.m if st.m > 0 else float("inf")
    head = (
        f"W: {W.shape[0]}x{W.shape[1]}  m = margin(W) = {st.m:.6g} (proved >= {st.m_lo:.6g})  "
        f"L = {st.L:.6g} (proved <= {st.L_hi:.6g})  kappa = {kappa:.4g}  ||W|| = {st.norm_W:.6g}"
    )
    if st.verdict == "refuted":
        head += "\nW is NOT monotone (m < 0, proved): the float network has no certified equilibrium"
    elif st.verdict == "undecided":
        head += (
            "\nmargin(W) is within rounding error of 0: W is not certified monotone, "
            "so no quantization of it is certified either"
        )
    certs = [certify(W, b, args.granularity, float_bounds=st) for b in args.bits]
    data: dict[str, Any] | list[Any] = [c.to_dict() for c in certs]
    text = head
    if certs:
        h, rows = certificate_rows(certs)
        text += (
            f"\n({args.granularity}; plain columns are float64 computed values (estimates); "
            "columns with >= or <= and a-priori are bounds proved in floating point; verdicts "
            "use only the proved bounds)\n"
        )
        text += text_table(h, rows)
        if any(c.verdict == "undecided" for c in certs):
            text += (
                "\nundecided: margin(W~) is within rounding error of 0 (the proved bounds "
                "straddle 0, or no contraction modulus < 1 is provable): NOT certified"
            )
    if args.min_bits:
        mb = {g: min_certified_bits(W, g) for g in ("per-tensor", "per-channel")}
        lines = [
            f"  {g:12s} a-priori {v['a_priori']}, Weyl {v['weyl']}, exact {v['exact']}"
            for g, v in mb.items()
        ]
        text += "\nsmallest certified bit-width per tier:\n" + "\n".join(lines)
        data = {"certificates": data, "min_bits": mb} if args.bits else {"min_bits": mb}
    _emit(args, data, text)
    return 0


# ------------------------------------------------------------------------------------ ptq/eval
def cmd_ptq(args: argparse.Namespace) -> int:
    from monquant.workflows import run_ptq

    parts = tuple(p.strip() for p in args.quantize.split(",") if p.strip())
    data = _load_data(args)
    result = run_ptq(
        args.checkpoint,
        data,
        bits=args.bits,
        granularity=args.granularity,
        parts=parts,
        out=args.out,
        test_limit=args.test_limit,
    )
    ev, c = result["eval"], result["certificate"]
    text = (
        f"{args.bits}-bit PTQ ({args.granularity}, {','.join(parts)}): tier {c['tier']} "
        f"({c.get('verdict', 'undecided')}), "
        f"||dW||/m = {c['dW_over_m']:.4g}, margin(W~) = {c['margin_quantized']:.4g}\n"
        f"accuracy {ev['accuracy']:.4f} (float {result['float_eval']['accuracy']:.4f}); "
        f"converged {ev['converged']}/{ev['samples']} solves; iterations mean "
        f"{ev['mean_iterations']:.1f}, max {ev['max_iterations']}\nquantized model: {result['out']}"
    )
    if ev["unconverged"]:
        text += f"\nWARNING: {ev['unconverged']} solves did not converge (hit the cap or diverged)"
    _emit(args, result, text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from monquant.workflows import run_eval

    data = _load_data(args)
    result = run_eval(args.checkpoint, data, test_limit=args.test_limit)
    ev = result["eval"]
    text = (
        f"accuracy {ev['accuracy']:.4f} on {ev['samples']} test images "
        f"({'quantized' if result['quantized'] else 'float'} weights)\n"
        f"m {result['m']:.4g}  L {result['L']:.4g}  kappa {result['kappa']:.4g}  "
        f"iterations mean {ev['mean_iterations']:.1f} max {ev['max_iterations']}  "
        f"unconverged {ev['unconverged']}"
    )
    _emit(args, result, text)
    return 0


# ----------------------------------------------------------------------------------- reproduce
EPILOG_REPRODUCE = """examples:
  monquant reproduce                              # full paper setup -> results/paper/
  monquant reproduce --quick --out results/quick  # same pipeline, small (a few minutes)
  monquant reproduce --resume                     # skip stages finished by an earlier run
  monquant reproduce --model runs/float/model.safetensors
"""


def cmd_reproduce(args: argparse.Namespace) -> int:
    from monquant.experiments.reproduce import ReproduceConfig, run_reproduce

    kw: dict[str, Any] = dict(
        out=Path(args.out),
        model=Path(args.model) if args.model else None,
        seed=args.seed,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    if args.margin_init is not None:
        kw["margin_init"] = args.margin_init
    cfg = ReproduceConfig.quick_config(**kw) if args.quick else ReproduceConfig(**kw)
    data = _load_data(args)
    echo = (lambda m: print(m, file=sys.stderr)) if args.json else print
    res = run_reproduce(cfg, data, echo=echo)
    verdicts = "\n".join(f"  [{c['verdict']}] {c['claim']}" for c in res["claims"])
    text = (
        f"report: {Path(args.out) / 'report.md'}\nresults: {Path(args.out) / 'results.json'}\n"
        f"wall time (all stages): {res['wall_seconds_all_stages']:.1f} s\nclaims:\n{verdicts}"
    )
    _emit(
        args,
        {"out": args.out, "claims": res["claims"], "stage_seconds": res["stage_seconds"]},
        text,
    )
    return 0


# -------------------------------------------------------------------------------- ste-recovery
EPILOG_STE = """examples:
  monquant ste-recovery                           # full study -> results/ste-recovery/
  monquant ste-recovery --quick --out /tmp/ste    # small grid, seconds
"""


def cmd_ste_recovery(args: argparse.Namespace) -> int:
    from monquant.experiments.ste_recovery import run_ste_recovery, summary_text

    res = run_ste_recovery(
        args.out,
        quick=args.quick,
        seed=args.seed,
        trials=args.trials,
        m=args.m,
        T=args.T,
        sigma_frac=args.noise,
        progress=not args.no_progress,
    )
    _emit(
        args,
        {"out": args.out, "scaling": res["scaling"], "timing": res["timing"]},
        summary_text(res) + f"\nreport: {Path(args.out) / 'report.md'}",
    )
    return 0


# ---------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """A synthetic MonDEQ: certificates, and a check against actual solves."""
    import torch

    from monquant.certify import certify
    from monquant.operators import wk_weight
    from monquant.quantize import quantize
    from monquant.report import text_table
    from monquant.solvers import SolverConfig, solve

    g = torch.Generator().manual_seed(args.seed)
    n = args.n
    A = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    B = torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    W = wk_weight(A, B, args.margin)
    q = torch.randn(64, n, generator=g, dtype=torch.float64)
    rows, data = [], []
    for b in args.bits:
        c = certify(W, b)
        Wq = quantize(W, b).dequantized()
        r = solve(Wq, q, SolverConfig(method="pr", tol=1e-8, max_iter=2000))
        rows.append(
            [b, c.dW_over_m, c.margin_quantized, c.tier, r.n_unconverged == 0, r.iterations]
        )
        data.append({"certificate": c.to_dict(), "solve": r.summary()})
    text = (
        f"synthetic MonDEQ: n={n}, m={args.margin}; PR solves of 64 random injections "
        "(tol 1e-8, cap 2000)\n"
        + text_table(
            ["bits", "||dW||/m", "margin(W~)", "tier", "all converged", "iterations"], rows
        )
    )
    _emit(args, data, text)
    return 0


# ------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="monquant",
        description="Quantize monotone operator equilibrium networks with certified convergence.",
    )
    p.add_argument("--version", action="version", version=f"monquant {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, epilog: str = ""):
        sp = sub.add_parser(
            name,
            help=help_,
            description=help_,
            epilog=epilog,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sp.set_defaults(func=func)
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        return sp

    t = add("train", cmd_train, "train a MonDEQ on MNIST (float or QAT)", EPILOG_TRAIN)
    t.add_argument("--out", required=True, help="run folder (checkpoint, model, log)")
    t.add_argument("--hidden", type=int, default=100)
    t.add_argument("--rank", type=int, default=None, help="rank of A (default: full)")
    t.add_argument("--margin-init", type=float, default=1.0)
    t.add_argument("--fixed-margin", action="store_true", help="do not learn the margin")
    t.add_argument("--backward", choices=["splitting", "direct"], default="splitting")
    t.add_argument("--epochs", type=int, default=15)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=128)
    t.add_argument("--decay-epoch", type=int, default=10)
    t.add_argument("--decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--qat-bits", type=int, default=None, help="quantization-aware training")
    t.add_argument("--granularity", choices=["per-tensor", "per-channel"], default="per-tensor")
    t.add_argument("--margin-target", type=float, default=None, help="margin-aware QAT target")
    t.add_argument("--margin-weight", type=float, default=1.0)
    t.add_argument("--resume", action="store_true", help="continue from the run's checkpoint")
    t.add_argument("--no-progress", action="store_true")
    _solver_args(t)
    _data_args(t)

    c = add("certify", cmd_certify, "certify quantized W without running a solver", EPILOG_CERTIFY)
    c.add_argument("path", help="monquant checkpoint, or .npz/.safetensors holding W (U, b)")
    c.add_argument("--bits", type=int, nargs="*", default=[3, 4, 5, 6, 8])
    c.add_argument("--granularity", choices=["per-tensor", "per-channel"], default="per-tensor")
    c.add_argument("--min-bits", action="store_true", help="smallest certified bits per tier")

    q = add("ptq", cmd_ptq, "post-training quantization: quantize, certify, evaluate", EPILOG_PTQ)
    q.add_argument("checkpoint")
    q.add_argument("--bits", type=int, required=True)
    q.add_argument("--granularity", choices=["per-tensor", "per-channel"], default="per-tensor")
    q.add_argument("--quantize", default="W", help="comma list of W,U,b (default W, as the paper)")
    q.add_argument("--out", default=None, help="quantized model path (default: next to CKPT)")
    q.add_argument("--test-limit", type=int, default=None, help="evaluate on the first k images")
    _data_args(q)

    e = add(
        "eval",
        cmd_eval,
        "evaluate a (float or quantized) checkpoint on the test set",
        "examples:\n  monquant eval runs/float/model.safetensors\n"
        "  monquant eval runs/float/ptq-4bit-per-tensor.safetensors --json\n",
    )
    e.add_argument("checkpoint")
    e.add_argument("--test-limit", type=int, default=None)
    _data_args(e)

    r = add("reproduce", cmd_reproduce, "reproduce every result of the paper", EPILOG_REPRODUCE)
    r.add_argument("--out", default="results/paper", help="results folder")
    r.add_argument("--quick", action="store_true", help="small CI-sized run of the same pipeline")
    r.add_argument("--model", default=None, help="reuse a float checkpoint instead of training")
    r.add_argument("--epochs", type=int, default=None, help="override the training epochs")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument(
        "--margin-init",
        type=float,
        default=None,
        help="initial learnable margin m of every trained model (the paper does not state it)",
    )
    r.add_argument("--resume", action="store_true", help="skip stages already finished")
    r.add_argument("--no-progress", action="store_true")
    _data_args(r)

    s = add(
        "ste-recovery",
        cmd_ste_recovery,
        "finite-sample STE study: binary two-layer network recovery and recurrence",
        EPILOG_STE,
    )
    s.add_argument("--out", default="results/ste-recovery")
    s.add_argument("--quick", action="store_true", help="small grid (seconds)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--trials", type=int, default=50, help="independent trials per point")
    s.add_argument("--m", type=int, default=32, help="hidden units of the recovery study")
    s.add_argument("--T", type=int, default=2000, help="STE iterations")
    s.add_argument("--noise", type=float, default=0.2, help="label noise / label std (recurrence)")
    s.add_argument("--no-progress", action="store_true")

    d = add(
        "demo",
        cmd_demo,
        "certificates of a small synthetic MonDEQ, checked by solving",
        "examples:\n  monquant demo\n  monquant demo --n 50 --margin 0.2 --bits 3 4 8 --json\n",
    )
    d.add_argument("--n", type=int, default=100)
    d.add_argument("--margin", type=float, default=0.5)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--bits", type=int, nargs="*", default=[3, 4, 5, 6, 8, 12, 16])

    for register in _extra_commands():
        register(add)
    return p


def _extra_commands() -> list[Callable[[Callable[..., argparse.ArgumentParser]], None]]:
    """Commands defined in their own modules (deployment, ...)."""
    from monquant.cli_deploy import register as deploy

    return [deploy, *_EXTRA_COMMANDS]


_EXTRA_COMMANDS: list[Callable[[Callable[..., argparse.ArgumentParser]], None]] = []
_EXTRA_COMMANDS.append(register_lowbit)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    t0 = time.perf_counter()
    try:
        return int(args.func(args) or 0)
    except MonquantError as exc:
        print(f"monquant {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"monquant {args.command}: interrupted after {time.perf_counter() - t0:.0f} s",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
