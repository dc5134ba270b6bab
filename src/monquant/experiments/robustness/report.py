"""Rendering of ``monquant robustness``: the table (text and Markdown), the figure (PNG + PDF),
``report.md`` and ``results.json``. Takes the plain results of
:func:`monquant.experiments.robustness.study.run_robustness`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monquant.report import markdown_table, new_figure, save_figure, text_table
from monquant.storage.files import atomic_write_text
from monquant.storage.jsonio import write_json

__all__ = ["render_robustness", "robustness_table", "table_rows"]


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def table_rows(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows: one per configuration, certified and PGD accuracy at every eps."""
    eps = [f"{e:g}" for e in results["config"]["eps"]]
    h = ["configuration", "verdict", "margin(W~) >=", "clean acc.",
         "certified agreement (Thm 3 / + W~ solve)", "measured agreement", "gap"]  # fmt: skip
    h += [f"eps {e}: certified / PGD" for e in eps]
    rows = []
    for r in results["rows"]:
        q = r["kind"] != "float"
        rows.append([
            r["name"], r.get("verdict", "certified" if r["margin_lower"] > 0 else "-"),
            r["margin_lower"], f"{r['clean_accuracy']:.4f}",
            (f"{_pct(r['certified_agreement_rate_theorem3'])} / {_pct(r['certified_agreement_rate'])}"
             if q else "-"),
            _pct(r["measured_agreement_rate"]) if q else "-",
            _pct(r["agreement_gap"]) if q else "-",
        ] + [f"{r['certified_accuracy'][e]:.3f} / {r['pgd']['accuracy'][e]:.3f}" for e in eps])  # fmt: skip
    return h, rows


def robustness_table(results: dict[str, Any]) -> str:
    """The terminal table with its legend and any warnings (capped solves, contradictions)."""
    cfg = results["config"]
    r0 = results["rows"][0]["pgd"]
    h, rows = table_rows(results)
    text = (f"{results['samples']} test images (PGD on the first {r0['samples']}: L2, "
            f"{cfg['pgd_steps']} steps, {cfg['pgd_restarts']} restarts); eps in normalised input "
            "space; certified accuracy is proved (a lower bound), PGD accuracy measured (an upper "
            "bound)\n" + text_table(h, rows))  # fmt: skip
    for r in results["rows"]:
        caps = {k: r[k] for k in ("float_solves_unconverged", "quantized_solves_unconverged",
                                  "measured_solves_unconverged") if r.get(k)}  # fmt: skip
        if caps:
            text += (f"\nWARNING ({r['name']}): solves hit their cap: {caps} (those inputs are "
                     "not certified; measured predictions from them are unconverged)")  # fmt: skip
    for c in results["contradictions"]:
        text += f"\nERROR: a certificate was contradicted: {c}"
    return text


def _plot(results: dict[str, Any], stem: Path) -> list[Path]:
    """Certified accuracy (solid) and PGD accuracy (dashed, same colour) against eps; PTQ rows on
    the left, trained rows (with the float model on both panels) on the right."""
    eps = [float(e) for e in results["config"]["eps"]]
    keys = [f"{e:g}" for e in eps]
    rows = results["rows"]
    groups = [("float and PTQ", [r for r in rows if r["kind"] in ("float", "ptq")])]
    trained = [r for r in rows if r["kind"] not in ("float", "ptq")]
    if trained:
        groups.append(("float and trained (fine-tuned) models",
                       [r for r in rows if r["kind"] == "float"] + trained))  # fmt: skip
    fig, axes = new_figure(ncols=len(groups), size=(6.0, 5.6))
    for ax, (title, group) in zip(axes[0], groups, strict=True):
        for i, r in enumerate(group):
            color = "k" if r["kind"] == "float" else f"C{i % 10}"
            cert = [r["certified_accuracy"][k] for k in keys]
            pgd = [r["pgd"]["accuracy"][k] for k in keys]
            ax.plot(eps, cert, "-o", color=color, ms=3, label=f"{r['name']} (certified)")
            ax.plot(eps, pgd, "--", color=color, lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel(r"L2 radius $\varepsilon$ (normalised input space)")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        from matplotlib.lines import Line2D

        handles, _ = ax.get_legend_handles_labels()
        handles.append(Line2D([], [], color="grey", ls="--", lw=1, label="PGD (measured, dashed)"))
        ax.legend(handles=handles, fontsize=6.5, loc="upper center", ncol=2,
                  bbox_to_anchor=(0.5, -0.16), frameon=False)  # fmt: skip
        ax.grid(alpha=0.3)
    return save_figure(fig, stem)


def _report(results: dict[str, Any], figure: str) -> str:
    cfg = results["config"]
    h, rows = table_rows(results)
    eps = [f"{e:g}" for e in cfg["eps"]]
    pgd_h = ["configuration", "PGD clean acc."] + [f"eps {e}: certified / PGD (same inputs)"
                                                    for e in eps]  # fmt: skip
    pgd_rows = [[r["name"], f"{r['pgd']['clean_accuracy']:.3f}"]
                + [f"{r['pgd']['certified_accuracy'][e]:.3f} / {r['pgd']['accuracy'][e]:.3f}"
                   for e in eps] for r in results["rows"]]  # fmt: skip
    n_pgd = results["rows"][0]["pgd"]["samples"]
    lines = [
        "# Certified behaviour of quantized MonDEQs",
        "",
        f"Command: `{results['command'] or 'monquant robustness'}`",
        "",
        f"Checkpoint `{Path(cfg['checkpoint']).name}`, the first {results['samples']} MNIST test "
        f"images; PGD (L2, {cfg['pgd_steps']} steps, {cfg['pgd_restarts']} restarts, gradients by "
        f"the implicit backward) on the first {n_pgd}.",
        "",
        "## Protocol",
        "",
        results["protocol"],
        "",
        "## Results",
        "",
        "*Certified* numbers are proved (float64 solves with a-posteriori errors from proved "
        "constants, proved norm and margin bounds); *measured* ones come from the float32 forward "
        "pass and PGD. The certified agreement rate is the share of inputs on which the quantized "
        "model provably predicts the float model's class: by Theorem 3 alone (from the float solve) "
        "and with the quantized model's own proved solve; the gap is measured minus certified.",
        "",
        markdown_table(h, rows),
        "",
        f"![certified and PGD accuracy against eps]({figure})",
        "",
        f"*Figure: certified accuracy (solid, proved, on all {results['samples']} inputs) and PGD "
        f"accuracy (dashed, measured, on the first {n_pgd}) against the L2 radius; one colour per "
        "configuration. Certified accuracy is a lower bound on robust accuracy, PGD accuracy an "
        "upper bound.*",
        "",
        f"On the {n_pgd} attacked inputs, certified <= PGD <= clean must hold for every "
        "configuration and radius:",
        "",
        markdown_table(pgd_h, pgd_rows),
        "",
        "## Checks",
        "",
    ]
    if results["contradictions"]:
        lines += [f"- **contradicted:** {c}" for c in results["contradictions"]]
    else:
        lines.append("- No certificate was contradicted: 0 inputs certified to agree whose measured "
                     "predictions differ, 0 inputs certified at a radius that PGD broke.")  # fmt: skip
    caps = [r["name"] for r in results["rows"]
            if any(r.get(k) for k in ("float_solves_unconverged", "quantized_solves_unconverged",
                                      "measured_solves_unconverged"))]  # fmt: skip
    lines.append(f"- Solves that hit their cap: {', '.join(caps)} (those inputs are not certified)."
                 if caps else "- Every solve converged (no solve hit its cap).")  # fmt: skip
    if results["resumed_stages"]:
        lines.append(f"- Resumed from an earlier run: {len(results['resumed_stages'])} stages.")
    return "\n".join(lines) + "\n"


def render_robustness(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``results.json``, ``robustness.png``/``.pdf`` and ``report.md`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = _plot(results, out / "robustness")
    results["figures"] = [p.name for p in paths]
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _report(results, paths[0].name))
    return results
