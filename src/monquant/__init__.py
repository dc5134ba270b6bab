"""monquant: quantize monotone operator equilibrium networks (MonDEQs) with certified convergence."""

from __future__ import annotations

__version__ = "0.1.0"
