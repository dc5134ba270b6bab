"""The reproduction's setups: every setting and the source it follows (paper text, the paper's
code at github JLi-Projects/mondeq-quant, or monquant's own choice with the reason)."""

from __future__ import annotations

from typing import Any

__all__ = ["SETUPS", "SETUP_SOURCES"]

#: Where the paper's text is silent, ``paper`` follows the paper's public code
#: (github JLi-Projects/mondeq-quant); ``fast`` is monquant's earlier choice, kept by name.
SETUPS: dict[str, dict[str, Any]] = {
    "paper": {
        "margin_init": 0.2 + 1e-4,  # softplus(m_raw0) = 0.2, plus the 1e-4 floor
        "margin_floor": 1e-4,
        "rank": "n/4",  # max(4, n // 4) = 25 for n = 100
        "init": "paper",
        "seed": 42,
        "tol": 1e-5,
        "max_iter": 500,
        "qat_parts": ("W", "U", "b"),
    },
    "fast": {
        "margin_init": 0.05,
        "margin_floor": 0.0,
        "rank": "n",
        "init": "uniform",
        "seed": 0,
        "tol": 1e-4,
        "max_iter": 2000,
        "qat_parts": ("W",),
    },
}

#: Each setting of the reproduction and where it comes from (file:line of the paper's code).
SETUP_SOURCES: list[tuple[str, str, str]] = [
    ("hidden units n = 100, relu, linear head, 784 inputs normalised (0.1307, 0.3081)",
     "paper text", "all setups"),
    ("Adam, lr 1e-3, 15 epochs, x0.1 at epoch 10, batch 128", "paper text", "all setups"),
    ("initial margin m0 = 0.2 (m = softplus(m_raw) + 1e-4)",
     "paper code (src/mondeq/operators.py: m_init=0.2, `+ 1e-4`)", "paper"),
    ("rank of A = max(4, n // 4) = 25", "paper code (src/mondeq/operators.py)", "paper"),
    ("A, S, U ~ 0.01 N(0, 1), b = 0", "paper code (src/mondeq/operators.py)", "paper"),
    ("seed 42", "paper code (experiments/train_and_quantise.py: --seed 42)", "paper"),
    ("training solver: Peaceman-Rachford at tol 1e-5, cap 500, step 1/sqrt(m L) from estimated m "
     "and L, residual checks on a schedule (the paper's code trains with FB, alpha 1 halved by a "
     "tuner, tol 1e-5, 500 iterations)",
     "monquant's choice: PR reaches the same unique equilibrium of the same operator (every "
     "solve converged is checked and reported), in far fewer iterations", "paper"),
    ("quantizer step 2 w_max / (2^b - 1); the table under w_max / (2^(b-1) - 1) is shown too",
     "paper text (the code uses the narrow rule, src/mondeq/quant.py)", "all setups"),
    ("Figure 1 solver as the paper ran it: FB at m~/L~^2 (0.01 when margin(W~) <= 0), tol 1e-5, "
     "cap 2000, the first 64 test images", "paper code (experiments/margin_stability_certificate.py)",
     "all setups"),
    ("Figure 3 (QAT against PTQ): W, U and b quantized (b per tensor), in QAT training and in "
     "both deployments; 'converged' judged by the margin test margin(W~) > 0, shown beside the "
     "PR solve", "paper code (experiments/qat_vs_ptq.py, src/training/train_qat.py)", "paper"),
    ("QAT training solver: PR at the setup's tolerance (the paper's QAT uses FB alpha 0.05, 100 "
     "iterations, tol 1e-2)", "monquant's choice: converged solves of the same operator; a "
     "100-iteration FB at tol 1e-2 stops far from the equilibrium that the implicit gradient "
     "assumes", "paper"),
    ("equilibria for Theorem 3 in float64 to 1e-12 with a-posteriori errors (the paper's code: "
     "float32, PR tol 1e-6, 500 iterations)", "monquant's choice: the rigorous check", "all setups"),
    ("m0 = 0.05, full-rank A, A, B ~ U(+-1/sqrt(n)), U, b as nn.Linear, seed 0, PR tol 1e-4",
     "monquant's earlier defaults (faster to train; kappa ~ 57)", "fast"),
]
