"""Deployment files: a certified integer MonDEQ in one safetensors file, runnable without training code.

File layout (written with :func:`monquant.storage.tensors.save_tensors`, so it carries a SHA-256
digest over the tensors and the metadata and a tampered file is refused on load):

- ``W.codes`` / ``U.codes``: the ``b``-bit signed weight codes packed densely into a little-endian
  bitstream of ``uint8`` (:func:`pack_codes`: ``ceil(count * b / 8)`` bytes, so 2-bit codes take
  4 per byte, 4-bit 2 per byte, 3-bit codes 8 per 3 bytes); the shape and ``bits`` are in metadata;
- ``W.multiplier`` / ``U.multiplier``: int64 multipliers ``M`` of the dyadic scales ``M 2^-S``
  (one value, or one per row); ``S`` is in metadata;
- ``bias.codes``: the bias as int64 on the injection grid ``2^-G`` (``G = S_U + h``), exactly as it
  enters the integer sum;
- ``head.weight`` / ``head.bias``: the linear output head in float32, applied in float32 to the
  dequantized iterate ``2^-f c`` (the head is a single small matmul after the equilibrium; keeping
  it in float is a deliberate, documented choice);
- metadata (JSON): shapes, bit-widths, scale shifts, the input and activation fixed-point formats,
  the solver settings (power-of-two step ``2^-k``, iteration budget, accumulator rule), the
  certificate of the paper's quantizer (:func:`monquant.certify.certify`) and the margin, Lipschitz
  constant and modulus of the exactly deployed operator.

:func:`load_deployment` rebuilds a :class:`Deployment` from the file alone, re-derives the certified
step from the codes (refusing a file whose stored claim does not hold), and runs the integer solver
of :mod:`monquant.intsolver`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monquant.certify import certify
from monquant.deploy.fixedpoint import (
    DyadicScale,
    FixedPointFormat,
    IntWeights,
    calibrate_format,
    quantize_weights,
)
from monquant.deploy.intsolver import (
    Injection,
    IntFBSolver,
    IntSolveResult,
    RequantPlan,
    UncertifiedOperatorError,
    bias_codes,
    deployed_bounds,
    deployed_radius,
    injection_bound,
    injection_from_codes,
    power_of_two_step,
    reference_equilibrium,
)
from monquant.errors import CheckpointError, ConfigError
from monquant.quant.uniform import check_bits, check_step_rule
from monquant.solvers import SolverConfig, solve
from monquant.storage.jsonio import to_jsonable
from monquant.storage.tensors import PathLike, load_tensors, save_tensors
from monquant.verified import SpectralBounds

__all__ = [
    "DEPLOYMENT_KIND",
    "DEPLOYMENT_VERSION",
    "Deployment",
    "ExportResult",
    "RunReport",
    "check_deployable",
    "export_deployment",
    "export_float_checkpoint",
    "load_deployment",
    "pack_codes",
    "packed_nbytes",
    "unpack_codes",
]

DEPLOYMENT_KIND = "monquant-int-deployment"
DEPLOYMENT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Bit packing
# ----------------------------------------------------------------------------------------------


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes of a dense bitstream of ``count`` codes of ``bits`` bits: ``ceil(count * bits / 8)``."""
    return (int(count) * check_bits(bits) + 7) // 8


def _code_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack_codes(codes: torch.Tensor, bits: int, signed: bool = True) -> torch.Tensor:
    """Pack integer codes into a dense little-endian bitstream (``uint8``).

    Code ``i`` occupies bits ``i*b .. i*b + b - 1`` of the stream (bit ``j`` of byte ``B`` is stream
    bit ``8 B + j``); signed codes are stored in ``b``-bit two's complement. The last byte is
    zero-padded. Raises ``ValueError`` for codes outside the ``b``-bit range.
    """
    b = check_bits(bits)
    flat = codes.detach().reshape(-1).to(torch.int64).cpu()
    lo, hi = _code_range(b, signed)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ConfigError(f"codes outside the {b}-bit {'signed' if signed else 'unsigned'} range")
    v = flat.numpy().astype(np.uint64) & np.uint64((1 << b) - 1)  # two's complement, b bits
    bitmat = (v[:, None] >> np.arange(b, dtype=np.uint64)) & np.uint64(1)
    stream = np.packbits(bitmat.astype(np.uint8).reshape(-1), bitorder="little")
    return torch.from_numpy(stream)


def unpack_codes(packed: torch.Tensor, bits: int, count: int, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` int64 codes (sign-extended when ``signed``)."""
    b = check_bits(bits)
    need = packed_nbytes(count, b)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ConfigError(
            f"packed stream must be 1-D uint8 of {need} bytes for {count} x {b} bits, "
            f"got {packed.dtype} {tuple(packed.shape)}"
        )
    stream = np.unpackbits(packed.cpu().numpy(), count=int(count) * b, bitorder="little")
    bitmat = stream.reshape(int(count), b).astype(np.uint64)
    v = (bitmat << np.arange(b, dtype=np.uint64)).sum(axis=1, dtype=np.uint64).astype(np.int64)
    if signed:
        v = np.where(v >= (1 << (b - 1)), v - (1 << b), v)
    return torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_deployment` wrote: the path, its size on disk and the verdict."""

    path: Path
    nbytes: int
    certified: bool
    metadata: dict[str, Any] = field(repr=False)


def _check_shapes(W, U, b, head_weight, head_bias) -> tuple[int, int, int]:
    n = int(W.shape[0]) if W.dim() == 2 else -1
    if n < 1 or W.shape[1] != n:
        raise ConfigError(f"W must be square, got {tuple(W.shape)}")
    if U.dim() != 2 or U.shape[0] != n:
        raise ConfigError(f"U must be ({n}, d), got {tuple(U.shape)}")
    if b.reshape(-1).shape[0] != n:
        raise ConfigError(f"b must have {n} entries, got {tuple(b.shape)}")
    k = int(head_weight.shape[0])
    if head_weight.dim() != 2 or head_weight.shape[1] != n or head_bias.reshape(-1).shape[0] != k:
        raise ConfigError("head weight must be (classes, n) and head bias (classes,)")
    return n, int(U.shape[1]), k


def _weights_meta(w: IntWeights, mult_bits: int) -> dict[str, Any]:
    return {
        "bits": w.bits,
        "granularity": w.granularity,
        "step_rule": w.step_rule,
        "shape": list(w.shape),
        "shift": w.scale.shift,
        "mult_bits": mult_bits,
    }


def _input_format(x_calib, bits: int, frac_bits: int | None) -> FixedPointFormat:
    if frac_bits is not None:
        return FixedPointFormat(check_bits(bits), int(frac_bits), signed=True)
    if x_calib is None:
        raise ConfigError("give input_frac_bits or calibration inputs x_calib")
    return calibrate_format(float(x_calib.detach().abs().max()), bits, signed=True)


def _calibration_peak(W, U, b, Wi: IntWeights, inj: Injection, certified: bool, x_calib) -> float:
    """``max z*`` over the calibration inputs: of the deployed operator when it is certified, else
    of the float one (an uncertified ``W~`` has no reliable equilibrium to measure)."""
    if certified:
        z = reference_equilibrium(Wi, inj, tol=1e-8).z
    else:
        q = x_calib.detach().to(torch.float64) @ U.detach().to(torch.float64).T
        q = q + b.detach().to(torch.float64).reshape(1, -1)
        z = solve(W.detach().to(torch.float64), q, SolverConfig(method="pr", tol=1e-8)).z
    peak = float(z.max())
    if not math.isfinite(peak):
        raise ConfigError("no finite equilibrium to calibrate the iterate on; give act_frac_bits")
    return peak


def _deployed_certificate(
    W: torch.Tensor, Wi: IntWeights, bits: int, granularity: str
) -> dict[str, Any]:
    """Certificate of the deployed ``W~ = codes * M 2^-S`` (exactly what the integer solver runs)."""
    cert = certify(
        W.detach().to(torch.float64), W_tilde=Wi.dequantized(), W_tilde_radius=deployed_radius(Wi)
    ).to_dict()
    cert.update(bits=bits, granularity=granularity, operator="codes * M 2^-S (deployed)")
    return cert


def _solver_meta(solver: IntFBSolver, plan: RequantPlan, accumulator: str) -> dict[str, Any]:
    return {
        "method": "fb-integer",
        "step_shift": solver.step.shift,
        "step": solver.step.step,
        "max_iter": solver.max_iter,
        "accumulator": accumulator,
        "certified": solver.certified,
        "rho": solver.rho,
        "margin_quantized": solver.stats.m,
        "L_quantized": solver.stats.L,
        "margin_quantized_lower": solver.stats.m_lo,
        "L_quantized_upper": solver.stats.L_hi,
        "verdict": solver.stats.verdict,
        "requant": plan.as_dict(),
        "accumulator_W": solver.accumulator.as_dict(),
    }


def _deployment_tensors(
    Wi: IntWeights, Ui: IntWeights, cb: torch.Tensor, head_weight, head_bias
) -> dict[str, torch.Tensor]:
    return {
        "W.codes": pack_codes(Wi.codes, Wi.bits),
        "W.multiplier": Wi.scale.multiplier.reshape(-1).to(torch.int64),
        "U.codes": pack_codes(Ui.codes, Ui.bits),
        "U.multiplier": Ui.scale.multiplier.reshape(-1).to(torch.int64),
        "bias.codes": cb,
        "head.weight": head_weight.detach().to(torch.float32),
        "head.bias": head_bias.detach().reshape(-1).to(torch.float32),
    }


def check_deployable(
    W: torch.Tensor,
    bits: int,
    granularity: str = "per-tensor",
    mult_bits: int = 24,
    allow: str = "require_certified=False",
    step_rule: str = "paper",
) -> None:
    """Raise :class:`UncertifiedOperatorError` unless the deployed ``W~ = codes * M 2^-S`` of ``W``
    at ``bits`` has a certified power-of-two FB step (from proved bounds only). ``allow`` names,
    in the message, how the caller accepts an uncertified file (the CLI says its own flag)."""
    st = deployed_bounds(quantize_weights(W, bits, granularity, mult_bits, step_rule))
    if power_of_two_step(st.m_lo, st.L_hi) is None:
        raise _uncertified(bits, st, allow)


def _uncertified(bits: int, st: SpectralBounds, allow: str) -> UncertifiedOperatorError:
    return UncertifiedOperatorError(
        f"{bits}-bit W~ is not certified (margin(W~) = {st.m:.4g}, proved >= {st.m_lo:.4g}: "
        f"{st.verdict}; L(W~) <= {st.L_hi:.4g}); pass {allow} to write it anyway, flagged"
    )


def export_deployment(
    path: PathLike,
    W: torch.Tensor,
    U: torch.Tensor,
    b: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    bits: int,
    act_bits: int,
    *,
    x_calib: torch.Tensor | None = None,
    act_frac_bits: int | None = None,
    u_bits: int | None = None,
    input_bits: int = 8,
    input_frac_bits: int | None = None,
    granularity: str = "per-tensor",
    mult_bits: int = 24,
    max_iter: int = 2000,
    headroom: float = 1.5,
    accumulator: str = "auto",
    require_certified: bool = True,
    step_rule: str = "paper",
) -> ExportResult:
    """Quantize ``W`` (``bits``) and ``U`` (``u_bits``, default ``bits``) and write a deployment file.

    Formats: the input is signed ``input_bits`` fixed point, the iterate unsigned ``act_bits``;
    their fractional bits are given or calibrated on ``x_calib`` (inputs: ``max|x|``; iterate:
    ``headroom * max z*``). The FB step is :func:`monquant.deploy.intsolver.power_of_two_step` of the
    deployed ``W~``. The worst-case integer bounds over every input in range are checked here,
    so the deployment can never overflow. An uncertified ``W~`` raises
    :class:`UncertifiedOperatorError` unless ``require_certified=False``; then the file is written
    with ``certified: false`` and its loader refuses to run it by default.
    """
    n, d, k = _check_shapes(W, U, b, head_weight, head_bias)
    Wi = quantize_weights(W, bits, granularity, mult_bits, step_rule)
    Ui = quantize_weights(U, u_bits if u_bits is not None else bits, granularity, mult_bits,
                          step_rule)  # fmt: skip
    xf = _input_format(x_calib, input_bits, input_frac_bits)
    G = Ui.scale.shift + xf.frac_bits
    cb = bias_codes(b, G)
    st = deployed_bounds(Wi)
    certified = power_of_two_step(st.m_lo, st.L_hi) is not None
    if not certified and require_certified:
        raise _uncertified(bits, st, "require_certified=False")
    if act_frac_bits is not None:
        act = FixedPointFormat(check_bits(act_bits), int(act_frac_bits), signed=False)
    elif x_calib is None:
        raise ConfigError("give act_frac_bits or calibration inputs x_calib")
    else:
        inj, _ = injection_from_codes(Ui, xf.encode(x_calib), xf, cb, accumulator)
        peak = _calibration_peak(W, U, b, Wi, inj, certified, x_calib)
        act = calibrate_format(peak, act_bits, signed=False, headroom=headroom)
    solver = IntFBSolver.build(
        Wi, act, max_iter=max_iter, accumulator=accumulator, allow_uncertified=True, stats=st
    )
    plan = solver.plan_for(G, injection_bound(Ui, xf, cb))  # worst case over all inputs
    meta = {
        "kind": DEPLOYMENT_KIND,
        "deployment_version": DEPLOYMENT_VERSION,
        "shapes": {"n": n, "d": d, "classes": k},
        "W": _weights_meta(Wi, mult_bits),
        "U": _weights_meta(Ui, mult_bits),
        "bias": {"frac_bits": G},
        "input_format": xf.to_dict(),
        "activation_format": act.to_dict(),
        "solver": _solver_meta(solver, plan, accumulator),
        "head": {"dtype": "float32", "applied_to": "dequantized iterate 2^-f c, in float32"},
        "certificate": _deployed_certificate(W, Wi, bits, granularity),
    }
    meta = to_jsonable(meta)
    out = save_tensors(path, _deployment_tensors(Wi, Ui, cb, head_weight, head_bias), meta)
    return ExportResult(out, out.stat().st_size, certified, meta)


def export_float_checkpoint(
    path: PathLike,
    W: torch.Tensor,
    U: torch.Tensor,
    b: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
) -> ExportResult:
    """The float32 counterpart (``W``, ``U``, ``b``, head) in the same container, for size comparisons."""
    tensors = {
        "W": W.detach().to(torch.float32),
        "U": U.detach().to(torch.float32),
        "b": b.detach().reshape(-1).to(torch.float32),
        "head.weight": head_weight.detach().to(torch.float32),
        "head.bias": head_bias.detach().reshape(-1).to(torch.float32),
    }
    meta = {"kind": "monquant-float32-weights"}
    out = save_tensors(path, tensors, meta)
    return ExportResult(out, out.stat().st_size, False, meta)


# ----------------------------------------------------------------------------------------------
# Load and run
# ----------------------------------------------------------------------------------------------


@dataclass
class RunReport:
    """Per-sample outcome of :meth:`Deployment.run`.

    ``result`` is the integer solve; ``input_saturated`` counts clipped input entries;
    ``distance`` (only with ``reference=True``) is ``||z_int - z~*||`` to the float64 equilibrium
    of the same deployed operator, and ``reference_error`` that solve's a-posteriori error bound.
    """

    result: IntSolveResult
    input_saturated: torch.Tensor
    distance: torch.Tensor | None = None
    reference_error: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_saturated.shape[0])

    def per_sample(self) -> list[dict[str, Any]]:
        rows = self.result.per_sample()
        for i, row in enumerate(rows):
            row["input_saturated"] = int(self.input_saturated[i])
            if self.distance is not None and self.reference_error is not None:
                row["distance_to_float"] = float(self.distance[i])
                row["reference_error"] = float(self.reference_error[i])
        return rows

    def summary(self) -> dict[str, Any]:
        s = self.result.summary()
        s["input_saturated_entries"] = int(self.input_saturated.sum())
        if self.distance is not None:
            s["max_distance_to_float"] = float(self.distance.max()) if len(self) else 0.0
        return s


@dataclass
class Deployment:
    """A loaded integer MonDEQ: codes, scales, formats, the integer solver and the float32 head."""

    W: IntWeights
    U: IntWeights
    bias_codes: torch.Tensor
    input_format: FixedPointFormat
    solver: IntFBSolver
    head_weight: torch.Tensor
    head_bias: torch.Tensor
    metadata: dict[str, Any]
    accumulator: str = "auto"

    @property
    def certified(self) -> bool:
        return self.solver.certified

    def injection(self, x: torch.Tensor) -> Injection:
        """Encode ``x`` (``(batch, d)``) to input codes and form ``Q`` in integers."""
        inj, _ = injection_from_codes(
            self.U,
            self.input_format.encode(x),
            self.input_format,
            self.bias_codes,
            self.accumulator,
        )
        return inj

    def run(
        self,
        x: torch.Tensor,
        *,
        reference: bool = False,
        allow_uncertified: bool = False,
        progress: bool = False,
    ) -> tuple[torch.Tensor, RunReport]:
        """Logits (float32) and the per-sample report for a batch of inputs ``x``.

        Refuses an uncertified deployment unless ``allow_uncertified``. ``reference=True`` also
        solves the float64 equilibrium of the same deployed operator and reports the distance.
        ``progress`` shows the integer solve's settled samples on stderr.
        """
        if not self.certified and not allow_uncertified:
            raise UncertifiedOperatorError(
                "this deployment is not certified (no convergent power-of-two step for W~); "
                "pass allow_uncertified=True to run it anyway"
            )
        if x.dim() != 2 or x.shape[1] != self.U.shape[1]:
            raise ConfigError(f"x must be (batch, {self.U.shape[1]}), got {tuple(x.shape)}")
        inj = self.injection(x)
        res = self.solver.solve(inj, progress=progress)
        z = res.z.to(torch.float32)
        logits = z @ self.head_weight.T + self.head_bias
        report = RunReport(res, self.input_format.saturated(x).sum(dim=1))
        if reference:
            ref = reference_equilibrium(self.W, inj, stats=self.solver.stats)
            report.distance = (res.z - ref.z).norm(dim=1)
            report.reference_error = ref.error_bound
        return logits, report

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices ``argmax`` of the logits."""
        return self.run(x)[0].argmax(dim=1)


def _weights_from(tensors: dict[str, torch.Tensor], meta: dict[str, Any], name: str) -> IntWeights:
    """Unpack ``<name>.codes`` with the shape, bits and scale recorded in the metadata."""
    info = meta[name]
    rows, cols = (int(v) for v in info["shape"])
    bits = check_bits(info["bits"])
    codes = unpack_codes(tensors[f"{name}.codes"], bits, rows * cols).reshape(rows, cols)
    qmax = 2 ** (bits - 1) - 1
    if bool((codes.to(torch.int64).abs() > qmax).any()):
        raise CheckpointError(f"{name} codes outside the symmetric {bits}-bit range")
    mult = tensors[f"{name}.multiplier"].to(torch.int64)
    if info["granularity"] == "per-tensor":
        if mult.numel() != 1:
            raise CheckpointError(f"{name}: per-tensor scale needs one multiplier")
        mult = mult.reshape(())
    elif mult.numel() != rows:
        raise CheckpointError(f"{name}: per-channel scale needs {rows} multipliers")
    dtype = torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32
    rule = check_step_rule(info.get("step_rule", "paper"))  # files before the rule: paper
    return IntWeights(
        codes.to(dtype), DyadicScale(mult, int(info["shift"])), bits, info["granularity"], rule
    )


def _check_head(path: Path, tensors: dict[str, torch.Tensor], n: int) -> None:
    """The output head must be ``(classes, n)`` with a ``(classes,)`` bias (named if not)."""
    hw, hb = tensors.get("head.weight"), tensors.get("head.bias")
    if hw is None or hb is None:
        raise CheckpointError(f"{path}: deployment file lacks head.weight or head.bias")
    if hw.dim() != 2 or hw.shape[1] != n or hb.reshape(-1).shape[0] != hw.shape[0]:
        raise CheckpointError(
            f"{path}: head.weight {tuple(hw.shape)} and head.bias {tuple(hb.shape)} do not fit "
            f"n = {n} (expected (classes, {n}) and (classes,))"
        )


def _check_solver_claim(solver: IntFBSolver, claim: dict[str, Any], path: Path) -> None:
    """The stored verdict and step must be what the codes themselves give."""
    if bool(claim["certified"]) != solver.certified:
        raise CheckpointError(
            f"{path}: stored certificate says certified={claim['certified']}, but the codes give "
            f"margin(W~) >= {solver.stats.m_lo:.4g} (proved) and step 2^-{solver.step.shift} "
            f"(certified={solver.certified})"
        )


def load_deployment(
    path: PathLike, *, verify_certificate: bool = True, max_iter: int | None = None
) -> Deployment:
    """Load a file written by :func:`export_deployment` and rebuild the integer solver.

    Raises :class:`CheckpointError` for a missing, corrupt or tampered file (digest check), a file
    of another kind, or (with ``verify_certificate``) a stored certification claim that the codes
    do not support. Needs only :mod:`monquant.intsolver`, numpy and torch.
    """
    path = Path(path)
    tensors, meta = load_tensors(path)
    if meta.get("kind") != DEPLOYMENT_KIND:
        raise CheckpointError(
            f"{path}: not a monquant integer deployment (kind {meta.get('kind')!r})"
        )
    if meta.get("deployment_version") != DEPLOYMENT_VERSION:
        raise CheckpointError(
            f"{path}: unknown deployment_version {meta.get('deployment_version')!r}"
        )
    try:
        Wi = _weights_from(tensors, meta, "W")
        Ui = _weights_from(tensors, meta, "U")
        xf = FixedPointFormat.from_dict(meta["input_format"])
        act = FixedPointFormat.from_dict(meta["activation_format"])
        sv = meta["solver"]
        solver = IntFBSolver.build(
            Wi,
            act,
            max_iter=int(max_iter if max_iter is not None else sv["max_iter"]),
            step_shift=int(sv["step_shift"]),
            accumulator=str(sv["accumulator"]),
            allow_uncertified=True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: deployment metadata incomplete or invalid: {exc}") from exc
    if verify_certificate:
        _check_solver_claim(solver, sv, path)
    solver.plan_for(int(meta["bias"]["frac_bits"]), injection_bound(Ui, xf, tensors["bias.codes"]))
    _check_head(path, tensors, Wi.shape[0])
    return Deployment(
        Wi,
        Ui,
        tensors["bias.codes"].to(torch.int64),
        xf,
        solver,
        tensors["head.weight"].to(torch.float32),
        tensors["head.bias"].to(torch.float32),
        meta,
        str(sv["accumulator"]),
    )
