"""Rendering of ``monquant conv``: tables (text and Markdown), the figure (PNG + PDF),
``report.md`` and ``results.json``, from the plain results of
:func:`monquant.experiments.conv.study.run_conv_study`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from monquant.report import markdown_table, new_figure, save_figure, text_table
from monquant.storage.files import atomic_write_text
from monquant.storage.jsonio import write_json

__all__ = ["conv_tables", "render_conv"]

MODELS = ("fc", "conv", "multitier")
COLORS = {"fc": "tab:blue", "conv": "tab:red", "multitier": "tab:green"}


def _models(res: dict[str, Any]) -> list[str]:
    """The models a result holds (runs before the multi-tier model have two)."""
    return [a for a in MODELS if a in res["compare"] and a in res["phase"]]


def _bits(mb: dict[str, Any]) -> str:
    return " / ".join("-" if mb.get(t) is None else str(mb[t]) for t in ("a_priori", "weyl", "exact"))


def _compare_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    h = ["model", "test acc.", "params (all)", "W params", "assembled W, float32 (KiB)",
         "margin m (proved >=)", "L", "min cert. bits per-tensor (a-priori/Weyl/exact)",
         "per-channel", "solver it. (mean)", "epoch (s, median)"]  # fmt: skip
    rows = []
    for a in _models(res):
        c = res["compare"][a]
        rows.append([c["architecture"], f"{c['accuracy']:.4f}", c["parameters"],
                     c["operator_parameters"], f"{c['W_storage_float32_bits'] / 8192:.1f}",
                     f"{c['margin']:.4f} (>= {c['margin_lower']:.4f})", c["L"],
                     _bits(c["min_bits"]["per-tensor"]), _bits(c["min_bits"]["per-channel"]),
                     f"{c['mean_iterations']:.1f}", f"{c['median_epoch_seconds']:.1f}"])  # fmt: skip
    return h, rows


def _phase_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    h = ["bits"] + [f"{a} {g}" for a in _models(res) for g in ("per-tensor", "per-channel")]
    by: dict[tuple[str, str, int], dict[str, Any]] = {}
    for a in _models(res):
        for r in res["phase"][a]["rows"]:
            by[(a, r["granularity"], r["bits"])] = r
    rows = []
    for b in res["config"]["bits"]:
        row: list[Any] = [b]
        for a in _models(res):
            for g in ("per-tensor", "per-channel"):
                r = by[(a, g, b)]
                unc = f", {r['unconverged']} unconv." if r["unconverged"] else ""
                row.append(f"{r['accuracy']:.4f} {r['tier']} (m~ >= {r['margin_quantized_lower']:.3g}{unc})")
        rows.append(row)
    return h, rows


def _disp_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    h = ["bits", "||dW||/m", "samples", "converged float/quant.", "within Thm 3 bound",
         "violations", "median bound/measured", "max a-posteriori error"]  # fmt: skip
    rows = []
    for r in res["displacement"]["rows"]:
        err, frac = r["max_solver_error_bound"], r["fraction_within_bound"]
        no_err = err is None or not math.isfinite(err)
        # stage files from before vacuous_samples existed: an infinite error bound means W~ had
        # no certified modulus, which leaves every sample's bound infinite
        vac = r.get("vacuous_samples", r["samples"] if no_err else 0)
        ratio = r["median_ratio_bound_over_empirical"]  # None or inf: no finite bound to compare
        rows.append([r["bits"], r["dW_over_m"], r["samples"],
                     f"{r['float_converged']}/{r['quantized_converged']}",
                     "not checkable (W~ not proved monotone)" if frac is None or vac == r["samples"]
                     else f"{100 * frac:.1f}%" + (f" of {r['samples'] - vac}" if vac else ""),
                     r["violations"],
                     "-" if ratio is None or not math.isfinite(ratio) else ratio,
                     "none (no certified modulus)" if no_err
                     else f"{err:.2e}"])  # fmt: skip
    return h, rows


def _qat_table(res: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    h = ["method", "status", "test acc.", "verdict (tier)", "margin(W~) >=", "||dW||/m",
         "W~ storage (KiB)", "unconverged (train/test)"]  # fmt: skip
    rows = []
    for r in res["qat"]["rows"]:
        if r["status"] != "ok":
            rows.append([r["label"], "failed: " + r["error"][:60], "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([r["label"], "ok", f"{r['accuracy']:.4f}", f"{r['verdict']} ({r['tier']})",
                     r["margin_quantized_lower"], r["dW_over_m"],
                     f"{r['storage_bits']['W'] / 8192:.1f}",
                     f"{r['train_unconverged']}/{r['unconverged']}"])  # fmt: skip
    return h, rows


TABLES = (("Side by side (float models)", _compare_table),
          ("Phase transition: PTQ accuracy, tier and proved margin(W~)", _phase_table),
          ("Theorem 3 displacement (conv model, per-channel, float64)", _disp_table),
          ("Low-bit training of the conv model (per-channel)", _qat_table))  # fmt: skip


def conv_tables(res: dict[str, Any]) -> str:
    """The terminal tables."""
    return "\n\n".join(f"{title}\n{text_table(*fn(res))}" for title, fn in TABLES)


def _plot(res: dict[str, Any], stem: Path) -> list[Path]:
    fig, ax = new_figure(ncols=2, size=(5.2, 3.8))
    for a in _models(res):
        color = COLORS[a]
        for g, ls in (("per-tensor", "-"), ("per-channel", "--")):
            rows = [r for r in res["phase"][a]["rows"] if r["granularity"] == g]
            b = [r["bits"] for r in rows]
            ax[0, 0].plot(b, [100 * r["accuracy"] for r in rows], ls, color=color, marker="o",
                          ms=3, label=f"{a}, {g}")  # fmt: skip
            ax[0, 1].plot(b, [r["margin_quantized_lower"] for r in rows], ls, color=color,
                          marker="o", ms=3, label=f"{a}, {g}")  # fmt: skip
    ax[0, 0].set(xlabel="bits $b$", ylabel="test accuracy of $\\tilde W = Q_b(W)$ (%)",
                 title="PTQ accuracy")  # fmt: skip
    ax[0, 1].axhline(0.0, color="k", lw=0.8)
    ax[0, 1].set(xlabel="bits $b$", ylabel="proved lower bound on margin$(\\tilde W)$",
                 title="certified monotonicity (verdict: $> 0$)")  # fmt: skip
    for axis in ax[0]:
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    fig.suptitle("Dense, single-convolution and multi-tier MonDEQs on MNIST ($W$: composite kernels)",
                 fontsize=10)  # fmt: skip
    return save_figure(fig, stem)


def _report(res: dict[str, Any], figure: str) -> str:
    cfg = res["config"]
    parts = [
        "# monquant conv: a single-convolution MonDEQ, quantized and certified\n",
        f"Command: `{res['command'] or 'monquant conv'}`" + (" (quick run)" if cfg["quick"] else ""),
        f"\nConv model: {cfg['channels']} channels, {cfg['kernel']}x{cfg['kernel']} factors, "
        f"{cfg['epochs']} epochs (Adam {cfg['lr']:g}, x0.1 at epoch {cfg['decay_epoch']}), PR; "
        f"dense model: 100 units, {cfg['fc_epochs']} epochs (the paper's setup)"
        + (f"; multi-tier model: {'/'.join(str(c) for c in cfg['tier_channels'])} channels on "
           f"28x28/14x14/7x7, {cfg['multitier_epochs']} epochs" if "tier_channels" in cfg else "")
        + ". "
        f"Phase transition on the first {res['phase']['conv']['samples']} test images; the "
        f"other accuracies on {res['qat']['samples']}. Every verdict rests on bounds proved in "
        "floating point (conv: from the Fourier blocks of the composite kernel, no dense matrix; "
        "multi-tier: the Weyl tier with a proved ||dW|| from proved block norms, so a multi-tier "
        "operator that Weyl cannot certify is undecided, not refuted, unless a diagonal block is "
        "provably non-monotone); plain values are float64 computations, and the multi-tier "
        "model's plain margins are estimates from above (power iteration), never bounds.\n",
        f"![phase transition]({figure})\n",
    ]
    for title, fn in TABLES:
        parts.append(f"## {title}\n\n{markdown_table(*fn(res))}\n")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in res["stage_seconds"].items())
    parts.append(f"Stage times: {secs}; total {res['total_seconds'] / 60:.1f} min"
                 + (f" (resumed: {', '.join(res['resumed_stages'])})" if res["resumed_stages"] else "")
                 + ".\n")  # fmt: skip
    return "\n".join(parts)


def render_conv(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``results.json``, ``conv.png``/``.pdf`` and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = _plot(results, out / "conv")
    results["figures"] = [p.name for p in paths]
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _report(results, paths[0].name))
    return results
