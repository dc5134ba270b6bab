"""``monquant certify``, ``ptq``, ``eval`` and ``demo``: certificates and their checks."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from monquant.cli.common import (
    AddCommand,
    allow_unconverged_arg,
    bits_arg,
    certificate_rows,
    data_args,
    emit,
    granularity_arg,
    load_data,
    load_kernel,
    load_W,
    positive_float,
    positive_int,
    quant_parts,
    require_checkpoint,
    step_rule_arg,
    unconverged_status,
)
from monquant.storage.files import check_output_file

__all__ = [
    "cmd_certify",
    "cmd_demo",
    "cmd_eval",
    "cmd_ptq",
    "register",
]

EPILOG_CERTIFY = """examples:
  monquant certify runs/float/model.safetensors --bits 3 4 5 6 8
  monquant certify weights.npz --bits 4 8 --granularity per-channel --json
  monquant certify runs/float/model.safetensors --min-bits
  monquant certify kernel.npz --image-size 28 28 --bits 4 8 --granularity per-channel
"""
EPILOG_PTQ = """examples:
  monquant ptq runs/float/model.safetensors --bits 8
  monquant ptq runs/float/model.safetensors --bits 6 --granularity per-channel --quantize W,U,b
"""


def _certificate_table(args: argparse.Namespace, certs: list[Any]) -> str:
    """The certificate table with its legend and, where any verdict is undecided, why."""
    from monquant.report import text_table

    h, rows = certificate_rows(certs)
    text = (
        f"\n({args.granularity}, {args.step_rule} step; plain columns are float64 computed "
        "values (estimates); "
        "columns with >= or <= and a-priori are bounds proved in floating point; verdicts "
        "use only the proved bounds)\n"
    )
    text += text_table(h, rows)
    if any(c.verdict == "undecided" for c in certs):
        text += (
            "\nundecided: margin(W~) is within rounding error of 0 (the proved bounds "
            "straddle 0, or no contraction modulus < 1 is provable): NOT certified"
        )
    return text


def _certify_conv(args: argparse.Namespace, K: Any = None, image: Any = None) -> int:
    """``certify KERNEL.npz --image-size H W``, or a convolutional checkpoint (its composite
    kernel ``K`` on its image): the circular convolution by the kernel ``W``."""
    from monquant.certify_conv import certify_conv, conv_spectral_bounds, min_certified_bits_conv
    from monquant.operators.conv import check_kernel

    if K is None:
        K = load_kernel(args.path)
        image = tuple(args.image_size)
    image = check_kernel(K, image)
    st = conv_spectral_bounds(K, image)
    c, _, kh, kw = K.shape
    kappa = st.L / st.m if st.m > 0 else float("inf")
    head = (f"W: circular convolution, kernel {c}x{c}x{kh}x{kw} on {image[0]}x{image[1]} "
            f"(operator size {c * image[0] * image[1]}; bounds proved from its Fourier blocks)  "
            f"m = {st.m:.6g} (proved >= {st.m_lo:.6g})  L = {st.L:.6g} (proved <= {st.L_hi:.6g})  "
            f"kappa = {kappa:.4g}")  # fmt: skip
    if st.verdict != "certified":
        head += f"\nW is not certified monotone ({st.verdict}): no quantization of it is either"
    return _emit_certificates(
        args, head,
        lambda b: certify_conv(K, image, b, args.granularity, step_rule=args.step_rule, float_bounds=st),
        lambda g: min_certified_bits_conv(K, image, g, progress=not args.no_progress,
                                          step_rule=args.step_rule),
    )  # fmt: skip


def _certify_multitier(args: argparse.Namespace, op: Any) -> int:
    """A multi-tier checkpoint: its composite kernels quantized at each bit-width, certified by
    the Weyl tier with a proved ``||dW||`` (:mod:`monquant.certify_multitier`)."""
    from monquant.certify_multitier import (
        certify_multitier,
        min_certified_bits_multitier,
        multitier_float_bounds,
    )

    fb = multitier_float_bounds(op)
    st = fb.bounds
    tiers = ", ".join(f"{c}x{h}x{w}" for c, (h, w) in zip(op.channels, op.images, strict=True))
    head = (f"W: multi-tier operator, tiers {tiers} (operator size {op.size}; block bounds proved "
            f"from Fourier blocks, polyphase for the stride-2 couplings)  m = {float(op.m):.6g} "
            f"(by construction; proved >= {st.m_lo:.6g})  L <= {st.L_hi:.6g} (proved)\n"
            "certificates: the Weyl tier only (no exact tier for the coupled operator); the plain "
            "margins are estimates from above (power iteration, capped by the diagonal blocks)")  # fmt: skip
    return _emit_certificates(
        args, head,
        lambda b: certify_multitier(op, b, args.granularity, step_rule=args.step_rule, float_bounds=fb),
        lambda g: min_certified_bits_multitier(op, g, progress=not args.no_progress,
                                               step_rule=args.step_rule, float_bounds=fb),
    )  # fmt: skip


def _min_bits_text(mb: dict[str, dict[str, Any]], tiers: tuple[str, ...]) -> str:
    lines = [f"  {g:12s} " + ", ".join(f"{t} {v[t]}" for t in tiers) for g, v in mb.items()]
    return "\nsmallest certified bit-width per tier:\n" + "\n".join(lines)


def _emit_certificates(
    args: argparse.Namespace,
    head: str,
    certify_at: Callable[[int], Any],
    min_bits: Callable[[str], dict[str, Any]],
) -> int:
    """The output of ``certify`` for any operator kind: ``head``, then one certificate per
    ``--bits`` (default 3 4 5 6 8, none with ``--min-bits`` alone) from ``certify_at(bits)``, and
    with ``--min-bits`` the smallest certified bits per granularity from ``min_bits(granularity)``."""
    from monquant.certify import TIERS

    bits = args.bits if args.bits is not None else ([] if args.min_bits else [3, 4, 5, 6, 8])
    certs = [certify_at(b) for b in bits]
    data: dict[str, Any] | list[Any] = [c.to_dict() for c in certs]
    text = head + (_certificate_table(args, certs) if certs else "")
    if args.min_bits:
        mb = {g: min_bits(g) for g in ("per-tensor", "per-channel")}
        text += _min_bits_text(mb, TIERS)
        data = {"certificates": data, "min_bits": mb} if bits else {"min_bits": mb}
    emit(args, data, text)
    return 0


def cmd_certify(args: argparse.Namespace) -> int:
    import torch

    from monquant.certify import certify, min_certified_bits
    from monquant.verified import spectral_bounds

    if args.image_size is not None:
        return _certify_conv(args)
    W, loaded = load_W(args.path)
    if not isinstance(W, torch.Tensor):  # a multi-tier checkpoint: its operator
        return _certify_multitier(args, W)
    if W.dim() == 4:  # a convolutional checkpoint: its composite kernel on its image
        return _certify_conv(args, W, loaded.model.config.image)
    st = spectral_bounds(W)
    kappa = st.L / st.m if st.m > 0 else float("inf")
    head = (
        f"W: {W.shape[0]}x{W.shape[1]}  m = margin(W) = {st.m:.6g} (proved >= {st.m_lo:.6g})  "
        f"L = {st.L:.6g} (proved <= {st.L_hi:.6g})  kappa = {kappa:.4g}  ||W|| = {st.norm_W:.6g}"
    )
    if st.verdict == "refuted":
        head += (
            "\nW is NOT monotone (m < 0, proved): the float network has no certified equilibrium"
        )
    elif st.verdict == "undecided":
        head += (
            "\nmargin(W) is within rounding error of 0: W is not certified monotone, "
            "so no quantization of it is certified either"
        )
    return _emit_certificates(
        args, head,
        lambda b: certify(W, b, args.granularity, float_bounds=st, step_rule=args.step_rule),
        lambda g: min_certified_bits(W, g, progress=not args.no_progress, step_rule=args.step_rule),
    )  # fmt: skip


# ------------------------------------------------------------------------------------ ptq/eval
def cmd_ptq(args: argparse.Namespace) -> int:
    from monquant.storage.checkpoints import check_parts
    from monquant.workflows import run_ptq

    parts = args.quantize
    loaded = require_checkpoint(args.checkpoint, "ptq")
    check_parts(loaded.model, parts)  # before any data loads
    if args.out:
        check_output_file(args.out)
    data = load_data(args)
    result = run_ptq(
        args.checkpoint,
        data,
        bits=args.bits,
        granularity=args.granularity,
        parts=parts,
        out=args.out,
        test_limit=args.test_limit,
        progress=not args.no_progress,
        step_rule=args.step_rule,
        loaded=loaded,
    )
    ev, c = result["eval"], result["certificate"]
    text = (
        f"{args.bits}-bit PTQ ({args.granularity}, {args.step_rule} step, {','.join(parts)}): "
        f"tier {c['tier']} "
        f"({c.get('verdict', 'undecided')}), "
        f"||dW||/m = {c['dW_over_m']:.4g}, margin(W~) >= {c['margin_quantized_lower']:.4g} "
        f"(proved; computed {c['margin_quantized']:.4g}"
        f"{', an estimate' if result['architecture'] == 'multitier' else ''})\n"
        f"accuracy {ev['accuracy']:.4f} (float {result['float_eval']['accuracy']:.4f}); "
        f"converged {ev['converged']}/{ev['samples']} solves; iterations mean "
        f"{ev['mean_iterations']:.1f}, max {ev['max_iterations']}\nquantized model: {result['out']}"
    )
    if ev["unconverged"]:
        text += f"\nWARNING: {ev['unconverged']} solves did not converge (hit the cap or diverged)"
    emit(args, result, text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from monquant.workflows import run_eval

    loaded = require_checkpoint(args.checkpoint, "eval")
    data = load_data(args)
    result = run_eval(args.checkpoint, data, test_limit=args.test_limit,
                      progress=not args.no_progress, loaded=loaded)  # fmt: skip
    ev = result["eval"]
    text = (
        f"accuracy {ev['accuracy']:.4f} on {ev['samples']} test images "
        f"({'quantized' if result['quantized'] else 'float'} weights)\n"
        f"m {result['m']:.4g}  L {result['L']:.4g}  kappa {result['kappa']:.4g}"
        f"{'' if result['exact'] else ' (estimates: m from above, L a block-norm bound)'}  "
        f"iterations mean {ev['mean_iterations']:.1f} max {ev['max_iterations']}  "
        f"unconverged {ev['unconverged']}"
    )
    emit(args, result, text)
    return unconverged_status(args, ev["unconverged"], "test solves did not converge")


def cmd_demo(args: argparse.Namespace) -> int:
    """A synthetic MonDEQ: certificates, and a check against actual solves."""
    import torch

    from monquant.certify import certify
    from monquant.operators import wk_weight
    from monquant.quant.uniform import quantize
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
    emit(args, data, text)
    return 0


def register(add: AddCommand) -> None:
    """Add ``certify``, ``ptq``, ``eval`` and ``demo`` to the main parser."""
    c = add("certify", cmd_certify, "certify quantized W without running a solver", EPILOG_CERTIFY)
    c.add_argument("path", help="monquant checkpoint, or .npz/.safetensors holding W (U, b)")
    bits_arg(c, many=True, help_="bit-widths to certify (default: 3 4 5 6 8; with --min-bits "
             "and no --bits, only the smallest certified bit-widths)")  # fmt: skip
    granularity_arg(c)
    step_rule_arg(c)
    c.add_argument("--min-bits", action="store_true", help="smallest certified bits per tier")
    c.add_argument("--image-size", type=positive_int, nargs=2, default=None, metavar=("H", "W"),
                   help="certify W as a circular convolution kernel (c, c, kh, kw) on an H x W "
                   "state (torch conv2d layout, cross-correlation, circular padding)")  # fmt: skip

    q = add("ptq", cmd_ptq, "post-training quantization: quantize, certify, evaluate", EPILOG_PTQ)
    q.add_argument("checkpoint", help="monquant model checkpoint (.safetensors from train)")
    bits_arg(q, many=False, required=True, help_="weight bit-width")
    granularity_arg(q)
    step_rule_arg(q)
    q.add_argument("--quantize", type=quant_parts, default=("W",),
                   help="comma list of W,U,b (default W, as the paper)")  # fmt: skip
    q.add_argument("--out", default=None, help="quantized model path (default: next to CKPT)")
    q.add_argument(
        "--test-limit", type=positive_int, default=None, metavar="K",
        help="evaluate on the first K test images",
    )  # fmt: skip
    data_args(q)

    e = add(
        "eval",
        cmd_eval,
        "evaluate a (float or quantized) checkpoint on the test set",
        "examples:\n  monquant eval runs/float/model.safetensors\n"
        "  monquant eval runs/float/ptq-4bit-per-tensor.safetensors --json\n",
    )
    e.add_argument("checkpoint", help="monquant model checkpoint (float or quantized)")
    e.add_argument(
        "--test-limit", type=positive_int, default=None, metavar="K",
        help="evaluate on the first K test images",
    )  # fmt: skip
    allow_unconverged_arg(e)
    data_args(e)

    d = add(
        "demo",
        cmd_demo,
        "certificates of a small synthetic MonDEQ, checked by solving",
        "examples:\n  monquant demo\n  monquant demo --n 50 --margin 0.2 --bits 3 4 8 --json\n",
    )
    d.add_argument(
        "--n", type=positive_int, default=100, help="hidden units of the synthetic operator"
    )
    d.add_argument(
        "--margin", type=positive_float, default=0.5, help="margin m of the synthetic W-K operator"
    )
    d.add_argument("--seed", type=int, default=0, help="random seed")
    bits_arg(d, many=True, default=[3, 4, 5, 6, 8, 12, 16], help_="bit-widths to certify and solve")
