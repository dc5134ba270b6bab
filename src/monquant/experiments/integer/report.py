"""Rendering of the integer-deployment study: figure (PNG + PDF), ``report.md``, ``results.json``.

Takes the plain results of :func:`monquant.experiments.integer.study.run_intdeploy`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from monquant.experiments.integer.study import TABLE_HEADERS, TABLE_KEYS
from monquant.report import markdown_table, new_figure, save_figure
from monquant.storage.files import atomic_write_text
from monquant.storage.jsonio import write_json

__all__ = ["write_report"]


def _plot(rows: list[dict[str, Any]], samples: dict[str, Any], stem: Path) -> list[Path]:
    """Left: measured distance against predicted radius per sample; right: worst ratio per config."""
    fig, axes = new_figure(ncols=2)
    ax, bx = axes[0]
    lo, hi = math.inf, 0.0
    for key, s in samples.items():
        r, d = torch.tensor(s["radius"]), torch.tensor(s["distance"])
        ok = (r > 0) & (d > 0)
        if bool(ok.any()):
            ax.scatter(r[ok], d[ok], s=6, alpha=0.5, label=key)
            lo, hi = min(lo, float(r[ok].min()), float(d[ok].min())), max(hi, float(r[ok].max()))
    if hi > 0:
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="distance = radius")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("predicted radius e_max / (1 - rho)")
    ax.set_ylabel("measured ||z_int - z~*||")
    ax.set_title("Corollary 2: integer iterates vs predicted ball")
    ax.legend(fontsize=6)
    ran = [r for r in rows if r.get("worst_ratio") is not None]
    labels = [f"w{r['weight_bits']}/a{r['act_bits']}" for r in ran]
    bx.bar(range(len(ran)), [r["worst_ratio"] for r in ran], color="tab:blue")
    bx.axhline(1.0, color="k", ls="--", lw=1)
    bx.set_xticks(range(len(ran)), labels, rotation=45, fontsize=7)
    bx.set_ylabel("worst measured / predicted")
    bx.set_title("worst ratio per configuration (<= 1: inside)")
    return save_figure(fig, stem)


def _report(results: dict[str, Any]) -> str:
    rows = results["table"]
    lines = [
        "# Integer-arithmetic deployment (Corollary 2)",
        "",
        f"n = {results['n']} hidden units, d = {results['d']} inputs, "
        f"{results['samples']} samples; float model accuracy {results['accuracy_float']:.4f}.",
        "Integer FB iteration: W~ codes with dyadic scales, fixed-point iterate, power-of-two step "
        "(the certified 2^-k with the smallest modulus), exact int32/int64 accumulation with "
        "overflow bounds checked beforehand, relu + round-half-up requantization each step.",
        "A sample is inside when ||z_int - z~*|| <= e_max/(1 - rho) + eps_ref (eps_ref: a-posteriori "
        "error of the float64 reference); 'Cor.2 holds' checks the full bound "
        "rho^K ||z0 - z~*|| + sum rho^(K-1-j) ||e_j||.",
        "",
        markdown_table(TABLE_HEADERS, [[r.get(k) for k in TABLE_KEYS] for r in rows]),
        "",
    ]
    bad = [r for r in rows if r.get("status") not in ("ok", None)]
    for r in bad:
        lines.append(f"- W {r['weight_bits']} bits, act {r['act_bits']} bits: {r['status']}")
    lines += ["", "## Deployment file size", ""]
    hdr = [
        "bits",
        "certified",
        "file bytes",
        "float32 bytes",
        "saving x",
        "packed codes",
        "roundtrip",
    ]
    keys = ["bits", "certified", "file_bytes", "float32_bytes", "ratio", "packed_code_bytes",
            "codes_roundtrip_exact"]  # fmt: skip
    lines += [markdown_table(hdr, [[r[k] for k in keys] for r in results["sizes"]]), ""]
    lines += ["![Corollary 2 validation](intdeploy.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: str | Path, results: dict[str, Any]) -> dict[str, Any]:
    """Write ``intdeploy.png``/``.pdf``, ``results.json`` and ``report.md``; returns the results
    with the figure names added."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = _plot(results["table"], results["per_sample"], out / "intdeploy")
    results = {**results, "figures": [p.name for p in figures]}
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _report(results))
    return results
