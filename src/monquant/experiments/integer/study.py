"""Integer-arithmetic deployment: Corollary 2 measured on a real integer solver, and file sizes.

For every weight bit-width ``b_w`` (``W`` and, by default, ``U`` quantized with the paper's
quantizer, scales made dyadic) and activation bit-width ``b_a``:

1. the deployed ``W~`` is certified exactly (``margin(W~) > 0`` and a power-of-two FB step
   ``a = 2^-k < 2 m~ / L~^2``, see :func:`monquant.deploy.intsolver.power_of_two_step`); a configuration
   that fails is reported as *not certified* and not run;
2. inputs are encoded to signed fixed point and the injection ``q~ = U~ x~ + b~`` is formed in
   integers; ``z~*``, the float64 equilibrium of the same deployed operator, is solved to ``1e-12``
   (with its a-posteriori error ``eps_ref``);
3. the integer FB iteration runs from ``z_0 = 0`` until its codes settle (or ``max_iter``); the
   per-step error ``e_j = z_{j+1} - T~(z_j)`` is measured exactly and Corollary 2 predicts

       ||z_K - z~*|| <= e_max / (1 - rho)                    (radius, for a settled iterate)
       ||z_K - z~*|| <= rho^K ||z_0 - z~*|| + sum_j rho^(K-1-j) ||e_j||     (always)

   A sample is *inside* when ``||z_K - z~^|| <= e_max / (1 - rho) + eps_ref``; the ratio reported is
   ``||z_K - z~^|| / (e_max / (1 - rho) + eps_ref)`` (inside iff ratio <= 1).

Accuracies: the float model (``W``, ``U``, ``b``; float64 solve), the float64 equilibrium of the
deployed operator, and the integer solver (head in float32 on the dequantized iterate).

File sizes: deployment files (packed codes + scales + bias + float32 head + metadata) at 2, 4 and 8
bits against the float32 weights (``W``, ``U``, ``b``, head) in the same container.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from monquant.deploy.files import (
    export_deployment,
    export_float_checkpoint,
    load_deployment,
    packed_nbytes,
)
from monquant.deploy.fixedpoint import (
    FixedPointFormat,
    IntegerOverflowError,
    IntWeights,
    calibrate_format,
    quantize_weights,
)
from monquant.deploy.intsolver import (
    Injection,
    IntFBSolver,
    bias_codes,
    deployed_bounds,
    injection_from_codes,
    power_of_two_step,
    reference_equilibrium,
)
from monquant.solvers import SolverConfig, solve
from monquant.verified import SpectralBounds

__all__ = ["run_intdeploy"]

TABLE_HEADERS = [
    "W bits",
    "act bits",
    "act frac",
    "certified",
    "step",
    "rho",
    "e_max",
    "e a-priori",
    "radius (max)",
    "dist (max)",
    "inside",
    "worst ratio",
    "Cor.2 holds",
    "mean iters",
    "settled",
    "acc int",
    "acc float W~",
    "acc float",
    "accumulator",
]
TABLE_KEYS = [
    "weight_bits",
    "act_bits",
    "act_frac_bits",
    "certified",
    "step",
    "rho",
    "e_max",
    "e_a_priori",
    "predicted_radius_max",
    "max_distance",
    "fraction_inside",
    "worst_ratio",
    "fraction_cor2",
    "mean_iterations",
    "settled_fraction",
    "accuracy_int",
    "accuracy_float_quantized",
    "accuracy_float",
    "accumulator",
]


def _log(echo: Callable[[str], None] | None, msg: str) -> None:
    if echo is not None:
        echo(f"[intdeploy] {msg}")


def _mean(t: torch.Tensor) -> float:
    return float(t.to(torch.float64).mean()) if t.numel() else math.nan


def _accuracy(
    z: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, y: torch.Tensor
) -> float:
    """Top-1 accuracy of the float32 head on equilibria ``z``."""
    logits = z.to(torch.float32) @ head_w.detach().to(torch.float32).T + head_b.detach().float()
    return float((logits.argmax(dim=1) == y.reshape(-1)).to(torch.float64).mean())


def _float_accuracy(W, U, b, head_w, head_b, x, y) -> float:
    """Accuracy of the unquantized model (float64 PR solve to ``1e-10``)."""
    q = x.to(torch.float64) @ U.detach().to(torch.float64).T + b.detach().to(torch.float64)
    res = solve(
        W.detach().to(torch.float64), q, SolverConfig(method="pr", tol=1e-10, max_iter=20000)
    )
    return _accuracy(res.z, head_w, head_b, y)


def _quantized_operator(
    W, U, b, x, bits: int, u_bits: int | None, input_bits: int, granularity: str, mult_bits: int
) -> tuple[IntWeights, Injection, SpectralBounds, FixedPointFormat]:
    """``W~``, the integer injection of the inputs, the spectral constants of ``W~``, input format."""
    Wi = quantize_weights(W, bits, granularity, mult_bits)
    Ui = quantize_weights(U, u_bits if u_bits is not None else bits, granularity, mult_bits)
    xf = calibrate_format(float(x.abs().max()), input_bits, signed=True)
    cb = bias_codes(b, Ui.scale.shift + xf.frac_bits)
    inj, _ = injection_from_codes(Ui, xf.encode(x), xf, cb)
    return Wi, inj, deployed_bounds(Wi), xf


def _uncertified_row(bits: int, ab: int, st: SpectralBounds, acc_float: float) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(TABLE_KEYS)
    row.update(
        weight_bits=bits,
        act_bits=ab,
        certified=False,
        status="not certified",
        margin_quantized=st.m,
        L_quantized=st.L,
        accuracy_float=acc_float,
    )
    return row


def _validate(
    solver: IntFBSolver, inj: Injection, ref, head_w, head_b, y
) -> tuple[dict[str, Any], dict[str, list]]:
    """Run the integer solver and compare with the float64 reference (Corollary 2)."""
    eps = ref.error_bound
    res = solver.solve(inj, initial_distance=ref.z.norm(dim=1) + eps)
    dist = (res.z - ref.z).norm(dim=1)
    radius = res.predicted_radius
    ratio = dist / (radius + eps)
    cor2 = dist <= res.cor2_bound + eps
    row = {
        "certified": True,
        "status": "ok",
        "step_shift": solver.step.shift,
        "step": solver.step.step,
        "rho": solver.rho,
        "margin_quantized": solver.stats.m,
        "L_quantized": solver.stats.L,
        "e_max": float(res.e_max.max()),
        "e_a_priori": math.sqrt(solver.W.shape[0]) * solver.act.scale / 2.0,
        "predicted_radius_max": float(radius.max()),
        "fraction_inside": _mean(ratio <= 1.0),
        "worst_ratio": float(ratio.max()),
        "mean_ratio": _mean(ratio),
        "fraction_cor2": _mean(cor2),
        "max_distance": float(dist.max()),
        "max_reference_error": float(eps.max()),
        "mean_iterations": _mean(res.iterations),
        "max_iterations": int(res.iterations.max()),
        "settled_fraction": _mean(res.settled),
        "saturated_entries": int(res.saturated.sum()),
        "accuracy_int": _accuracy(res.z, head_w, head_b, y),
        "accumulator": str(solver.accumulator.dtype).replace("torch.", ""),
        "int32_would_overflow": solver.accumulator.int32_would_overflow,
        "requant_bound_log2": solver.plan(inj).as_dict()["bound_log2"],
    }
    samples = {
        "distance": dist.tolist(),
        "radius": radius.tolist(),
        "iterations": res.iterations.tolist(),
        "settled": res.settled.tolist(),
    }
    return row, samples


def _weight_bits_rows(
    W, U, b, head_w, head_b, x, y, bits: int, act_bits, acc_float: float, opts: dict[str, Any]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every activation bit-width for one weight bit-width."""
    Wi, inj, st, _ = _quantized_operator(
        W, U, b, x, bits, opts["u_bits"], opts["input_bits"], opts["granularity"], opts["mult_bits"]
    )
    if power_of_two_step(st.m_lo, st.L_hi) is None:
        return [_uncertified_row(bits, ab, st, acc_float) for ab in act_bits], {}
    ref = reference_equilibrium(Wi, inj, stats=st)
    acc_q = _accuracy(ref.z, head_w, head_b, y)
    rows, samples = [], {}
    for ab in act_bits:
        act = calibrate_format(float(ref.z.max()), ab, headroom=opts["headroom"])
        base = {"weight_bits": bits, "act_bits": ab, "act_frac_bits": act.frac_bits}
        base.update(accuracy_float_quantized=acc_q, accuracy_float=acc_float)
        base["reference_converged"] = ref.all_converged
        try:
            solver = IntFBSolver.build(Wi, act, max_iter=opts["max_iter"], stats=st)
            row, samples[f"w{bits}_a{ab}"] = _validate(solver, inj, ref, head_w, head_b, y)
        except IntegerOverflowError as exc:
            row = {"certified": True, "status": f"overflow: {exc}"}
        rows.append({**dict.fromkeys(TABLE_KEYS), **base, **row})
        _log(opts["progress"], f"W {bits} bits, act {ab} bits: {rows[-1]['status']}")
    return rows, samples


def _size_rows(
    out: Path, W, U, b, head_w, head_b, x_calib, size_bits, act_bits: int, opts: dict[str, Any]
) -> list[dict[str, Any]]:
    """Deployment file sizes against the float32 weights; roundtrip check of the codes."""
    f32 = export_float_checkpoint(out / "float32_weights.safetensors", W, U, b, head_w, head_b)
    rows = []
    for bits in size_bits:
        path = out / f"deploy_w{bits}.safetensors"
        res = export_deployment(
            path, W, U, b, head_w, head_b, bits, act_bits, x_calib=x_calib,
            u_bits=opts["u_bits"], input_bits=opts["input_bits"], granularity=opts["granularity"],
            mult_bits=opts["mult_bits"], max_iter=opts["max_iter"], require_certified=False,
        )  # fmt: skip
        dep = load_deployment(path)
        u_bits = opts["u_bits"] if opts["u_bits"] is not None else bits
        same = torch.equal(dep.W.codes, quantize_weights(W, bits, opts["granularity"]).codes)
        same = same and torch.equal(
            dep.U.codes, quantize_weights(U, u_bits, opts["granularity"]).codes
        )
        code_bytes = packed_nbytes(W.numel(), bits) + packed_nbytes(U.numel(), u_bits)
        rows.append(
            {
                "bits": bits,
                "certified": res.certified,
                "file_bytes": res.nbytes,
                "float32_bytes": f32.nbytes,
                "ratio": f32.nbytes / res.nbytes,
                "packed_code_bytes": code_bytes,
                "codes_roundtrip_exact": bool(same),
                "path": path.name,
            }
        )
        _log(opts["progress"], f"deployment file at {bits} bits: {res.nbytes} bytes")
    return rows


def run_intdeploy(
    out_dir: str | Path,
    W: torch.Tensor,
    U: torch.Tensor,
    b: torch.Tensor,
    head_w: torch.Tensor,
    head_b: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    weight_bits: tuple[int, ...] = (4, 6, 8),
    act_bits: tuple[int, ...] = (8, 12, 16),
    echo: Callable[[str], None] | None = None,
    *,
    u_bits: int | None = None,
    input_bits: int = 8,
    granularity: str = "per-tensor",
    mult_bits: int = 24,
    max_iter: int = 5000,
    headroom: float = 1.5,
    size_bits: tuple[int, ...] = (2, 4, 8),
    deploy_act_bits: int = 16,
) -> dict[str, Any]:
    """Corollary-2 validation table and deployment file sizes (plain data).

    ``W`` (n x n), ``U`` (n x d), ``b`` (n), ``head_w`` (classes x n), ``head_b`` (classes);
    ``x_test`` (samples x d, already normalized) and integer labels ``y_test``. The deployment
    files whose sizes are measured are written to ``out_dir`` (they are the measurement);
    :func:`monquant.experiments.integer.report.write_report` renders the results. ``echo``
    receives one progress line per configuration.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    x = x_test.detach().to(torch.float64).reshape(x_test.shape[0], -1)
    opts = {
        "u_bits": u_bits, "input_bits": input_bits, "granularity": granularity,
        "mult_bits": mult_bits, "max_iter": max_iter, "headroom": headroom, "progress": echo,
    }  # fmt: skip
    acc_float = _float_accuracy(W, U, b, head_w, head_b, x, y_test)
    rows: list[dict[str, Any]] = []
    samples: dict[str, Any] = {}
    for bits in weight_bits:
        r, s = _weight_bits_rows(
            W, U, b, head_w, head_b, x, y_test, bits, act_bits, acc_float, opts
        )
        rows += r
        samples.update(s)
    sizes = _size_rows(out, W, U, b, head_w, head_b, x, size_bits, deploy_act_bits, opts)
    results = {
        "n": int(W.shape[0]),
        "d": int(U.shape[1]),
        "samples": int(x.shape[0]),
        "accuracy_float": acc_float,
        "settings": {k: v for k, v in opts.items() if k != "progress"},
        "table": rows,
        "sizes": sizes,
        "per_sample": samples,
    }
    results["seconds"] = time.perf_counter() - t0
    return results
