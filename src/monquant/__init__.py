"""monquant: quantize monotone operator equilibrium networks (MonDEQs) with certified convergence.

The model-level API (each name imports torch on first use, so ``import monquant`` stays light
for the command line)::

    import monquant
    from monquant.nn import MonDEQ

    model = torch.nn.Sequential(torch.nn.Flatten(), MonDEQ(784, 100), torch.nn.Linear(100, 10))
    monquant.quantize_(model, monquant.QuantConfig(bits=6))
    print(monquant.certify_model(model))

See :mod:`monquant.api` (``quantize_``, ``prepare_qat``, ``convert``, ``certify_model``,
``min_certified_bits``, ``qat_penalty``, ``qat_step``), :mod:`monquant.qconfig`
(``QuantConfig``) and :mod:`monquant.nn` (``MonDEQ``, ``QuantLinear``, ``QuantConv2d``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_API = ("ModelCertificate", "certify_model", "convert", "min_certified_bits", "prepare_qat",
        "qat_penalty", "qat_step", "quantize_")  # fmt: skip
__all__ = [
    "ModelCertificate",
    "QuantConfig",
    "__version__",
    "certify_model",
    "convert",
    "min_certified_bits",
    "prepare_qat",
    "qat_penalty",
    "qat_step",
    "quantize_",
]

if TYPE_CHECKING:  # pragma: no cover
    from monquant.api import (
        ModelCertificate,
        certify_model,
        convert,
        min_certified_bits,
        prepare_qat,
        qat_penalty,
        qat_step,
        quantize_,
    )
    from monquant.qconfig import QuantConfig


def __getattr__(name: str) -> Any:
    """Lazy exports (PEP 562): ``monquant.quantize_`` imports :mod:`monquant.api` when first used."""
    if name == "QuantConfig":
        from monquant.qconfig import QuantConfig

        return QuantConfig
    if name in _API:
        from monquant import api

        return getattr(api, name)
    raise AttributeError(f"module 'monquant' has no attribute {name!r}")
