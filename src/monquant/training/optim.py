"""Adam and a step-decay learning-rate schedule, self-contained.

The paper's optimiser (Adam, lr 1e-3, decay x0.1 at epoch 10) written out in a few tensor
operations. Why not ``torch.optim``: constructing any ``torch.optim.Optimizer`` imports
``torch._dynamo`` (and sympy), which costs about 70 MB of resident memory in every training
process; the whole MNIST set in memory is 47 MB.

Adam (Kingma and Ba), for each parameter ``p`` with gradient ``g`` at step ``t``::

    m <- b1 m + (1 - b1) g,        v <- b2 v + (1 - b2) g^2
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

The step runs as one fused kernel per device and dtype (``torch._fused_adam_``, the kernel behind
``torch.optim.Adam(fused=True)``: one pass over each tensor instead of seven), where the installed
torch has it for the device; elsewhere as seven multi-tensor (``_foreach``) operations. Both
compute the formula above; they may differ in the last bit.

The state dictionaries use the same layout and names as ``torch.optim.Adam`` (``state`` keyed by
parameter index with ``step``, ``exp_avg``, ``exp_avg_sq``; ``param_groups``), so checkpoints
store them the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from monquant.errors import ConfigError

__all__ = ["Adam", "StepDecay"]


#: Whether ``torch._fused_adam_`` runs for a device type and dtype (found out by the first step
#: there).
_FUSED: dict[tuple[str, torch.dtype], bool] = {}


def _fused_step(
    ps: list[Any], gs: list[Any], m: list[Any], v: list[Any], steps: list[Any],
    lr: float, b1: float, b2: float, eps: float,
) -> bool:
    """One fused Adam update of tensors on one device with one dtype; ``False`` (nothing done)
    where this torch has no fused kernel for the device."""
    kind = (ps[0].device.type, ps[0].dtype)
    if _FUSED.get(kind) is False or not hasattr(torch, "_fused_adam_"):
        return False
    try:
        torch._fused_adam_(ps, gs, m, v, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=0.0,
                           eps=eps, amsgrad=False, maximize=False)  # fmt: skip
    except (NotImplementedError, RuntimeError):
        if kind in _FUSED:  # it ran here before: a real error
            raise
        _FUSED[kind] = False  # no kernel for this device and dtype in this torch: refused
        return False
    _FUSED[kind] = True
    return True


class Adam:
    """Adam with bias correction over one parameter group."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = [p for p in params]
        if not lr > 0:
            raise ConfigError(f"lr must be positive, got {lr}")
        self.param_groups: list[dict[str, Any]] = [
            {"lr": float(lr), "initial_lr": float(lr), "betas": tuple(betas), "eps": float(eps)}
        ]
        self.state: dict[int, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every parameter with a gradient: a fused kernel per device and dtype
        (each parameter's bias correction from its own step count), or where there is none
        seven multi-tensor (``_foreach``) operations over all of them at once, grouped by step
        count (one group unless some parameter went without a gradient at some step)."""
        group = self.param_groups[0]
        lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
        kinds: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            st = self.state.get(i)
            if st is None:
                st = self.state[i] = {
                    "step": torch.zeros((), dtype=torch.float64),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
            st["step"] += 1
            kinds.setdefault((p.device, p.dtype), []).append(i)
        for idx in kinds.values():
            ps = [self.params[i] for i in idx]
            sts = [self.state[i] for i in idx]
            if not _fused_step(ps, [p.grad for p in ps], [s["exp_avg"] for s in sts],
                               [s["exp_avg_sq"] for s in sts], [s["step"] for s in sts],
                               lr, b1, b2, eps):  # fmt: skip
                self._foreach_step(idx, lr, b1, b2, eps)

    def _foreach_step(self, idx: list[int], lr: float, b1: float, b2: float, eps: float) -> None:
        """The multi-tensor update of the parameters ``idx`` (steps already counted)."""
        groups: dict[float, list[int]] = {}
        for i in idx:
            groups.setdefault(float(self.state[i]["step"]), []).append(i)
        for t, idx in groups.items():
            ps = [self.params[i] for i in idx]
            gs = [p.grad for p in ps]
            m = [self.state[i]["exp_avg"] for i in idx]
            v = [self.state[i]["exp_avg_sq"] for i in idx]
            torch._foreach_lerp_(m, gs, 1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, gs, gs, value=1.0 - b2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, math.sqrt(1.0 - b2**t))
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ps, m, denom, value=-lr / (1.0 - b1**t))

    def state_dict(self) -> dict[str, Any]:
        group = dict(self.param_groups[0])
        group["betas"] = list(group["betas"])
        group["params"] = list(range(len(self.params)))
        return {"state": {i: dict(s) for i, s in self.state.items()}, "param_groups": [group]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        group = dict(state["param_groups"][0])
        group.pop("params", None)
        group["betas"] = tuple(group["betas"])
        self.param_groups = [group]
        self.state = {}
        for i, s in state["state"].items():
            p = self.params[int(i)]
            self.state[int(i)] = {
                "step": torch.as_tensor(s["step"], dtype=torch.float64).clone(),
                "exp_avg": s["exp_avg"].to(p).clone(),
                "exp_avg_sq": s["exp_avg_sq"].to(p).clone(),
            }


class StepDecay:
    """``lr = initial_lr * gamma^(epoch // step_size)``; call :meth:`step` once per epoch."""

    def __init__(self, optimizer: Adam, step_size: int, gamma: float) -> None:
        self.optimizer, self.step_size, self.gamma = optimizer, int(step_size), float(gamma)
        self.last_epoch = 0

    def _apply(self) -> None:
        group = self.optimizer.param_groups[0]
        group["lr"] = group["initial_lr"] * self.gamma ** (self.last_epoch // self.step_size)

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"step_size": self.step_size, "gamma": self.gamma, "last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_size, self.gamma = int(state["step_size"]), float(state["gamma"])
        self.last_epoch = int(state["last_epoch"])
        self._apply()
