"""Figure 2: the Theorem 3 displacement bound against measured equilibria (float64, tol 1e-12).

Both equilibria are solved in float64 with the same splitting method; each comes with its
a-posteriori error bound ``e = rho/(1-rho) ||s_k - s_{k-1}||``, and the comparison
``||z^ - z~^|| <= (||dW|| (||z~^|| + e2)) / m + e1 + e2`` is rigorous (see
:func:`monquant.certify.rigorous_displacement_check`). The naive comparison without the solver
errors is reported too (it is what a finite-tolerance solve would show).
"""

from __future__ import annotations

from typing import Any

import torch

from monquant.certify import (
    displacement_bound,
    relative_displacement_bound,
    rigorous_displacement_check,
)
from monquant.model import MonDEQClassifier
from monquant.quant.uniform import quantize
from monquant.solvers import SolverConfig, solve
from monquant.verified import difference_norm_bounds, spectral_bounds

__all__ = ["run_displacement"]


def run_displacement(
    model: MonDEQClassifier,
    x: torch.Tensor,
    bits: tuple[int, ...] = (6, 8, 12, 16),
    tol: float = 1e-12,
    max_iter: int = 100_000,
    method: str = "pr",
    granularity: str = "per-tensor",
) -> dict[str, Any]:
    """Per bit-width: fraction of samples satisfying Theorem 3, ratios, Corollary 3."""
    W, q = model.layer.float64_problem(x)
    # Proved constants decide: m_lo <= margin(W), ||dW|| <= d_hi, and the solvers' a-posteriori
    # errors from the proved m_lo, L_hi of each operator (verified.SpectralBounds.conservative).
    st = spectral_bounds(W)
    cfg = SolverConfig(method=method, tol=tol, max_iter=max_iter)
    ref = solve(W, q, cfg, stats=st.conservative())
    zn = ref.z.norm(dim=1)
    out_rows = []
    per_sample: dict[str, Any] = {}
    for b in bits:
        Wq = quantize(W, b, granularity).dequantized()
        rq = solve(Wq, q, cfg, stats=spectral_bounds(Wq, norm=False).conservative())
        d_hi, d = difference_norm_bounds(Wq, W)
        emp = (ref.z - rq.z).norm(dim=1)
        bound, holds = rigorous_displacement_check(
            emp, d_hi, rq.z.norm(dim=1), st.m_lo, ref.error_bound, rq.error_bound
        )
        naive = displacement_bound(d, rq.z.norm(dim=1), st.m)
        pos = emp > 0
        ratio = bound[pos] / emp[pos]
        rel_emp = emp / zn.clamp_min(1e-300)
        out_rows.append(
            {
                "bits": b,
                "dW_norm": d,
                "dW_over_m": d / st.m,
                "samples": int(x.shape[0]),
                "float_converged": int(ref.converged.sum()),
                "quantized_converged": int(rq.converged.sum()),
                "max_solver_error_bound": float(
                    torch.maximum(ref.error_bound, rq.error_bound).max()
                ),
                "fraction_within_bound": float(holds.double().mean()),
                "violations": int((~holds).sum()),
                "fraction_within_naive_bound": float((emp <= naive).double().mean()),
                "mean_ratio_bound_over_empirical": float(ratio.mean()) if pos.any() else None,
                "median_ratio_bound_over_empirical": float(ratio.median()) if pos.any() else None,
                "min_ratio_bound_over_empirical": float(ratio.min()) if pos.any() else None,
                "zero_displacement_samples": int((~pos).sum()),
                "corollary3_relative_bound": relative_displacement_bound(d_hi, st.m_lo),
                "max_relative_displacement": float(rel_emp.max()),
                "mean_relative_displacement": float(rel_emp.mean()),
            }
        )
        per_sample[str(b)] = {
            "empirical": emp,
            "bound": bound,
            # the paper's relative form: ||z* - z~*|| / ||z~*|| against ||dW|| / m
            "relative": emp / rq.z.norm(dim=1).clamp_min(1e-300),
        }
    return {
        "m": st.m,
        "L": st.L,
        "m_lower": st.m_lo,
        "L_upper": st.L_hi,
        "solver": cfg.as_dict(),
        "float_iterations": ref.iterations,
        "rows": out_rows,
        "per_sample": per_sample,
    }
