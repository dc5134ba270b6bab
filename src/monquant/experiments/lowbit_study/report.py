"""Render ``monquant lowbit``: aggregate over seeds, judge the targets, draw, write the report.

Takes the plain results of :func:`monquant.experiments.lowbit_study.study.run_lowbit` (one row per
configuration and seed) and writes ``report.md``, ``results.json`` and ``lowbit.png``/``.pdf``.
A configuration is *certified* on a seed when the exact tier holds (``margin(W~) > 0``; the
factored ProxQuant form has ``margin(W~) >= m > 0`` by construction); its "tier on all seeds" is
the weakest tier over its seeds (a_priori > weyl > exact > none). Failed runs (training diverged)
count as uncertified and have no accuracy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from monquant.experiments.stages import wall_time_line
from monquant.names import TIER_VALUES
from monquant.report import markdown_table, new_figure, save_figure
from monquant.storage.files import atomic_write_text
from monquant.storage.jsonio import write_json

__all__ = ["TARGETS", "aggregate", "judge_targets", "render_lowbit", "summary_rows"]

NAMES = {
    "ptq": "PTQ",
    "ste": "STE QAT",
    "margin": "margin-aware QAT",
    "proxquant-w": "ProxQuant on W",
    "proxquant-factors": "ProxQuant on factors",
}
#: weakest (``none``) to strongest (``construction``): monquant.names.TIER_VALUES reversed
TIER_RANK = {t: i for i, t in enumerate(reversed(TIER_VALUES))}

#: (bits, minimum mean test accuracy or None) of the issue's targets; 3 of 3 seeds certified.
TARGETS: tuple[tuple[int, float | None], ...] = ((4, None), (3, 0.975), (2, 0.95))


# ----------------------------------------------------------------------------------- aggregation


def _stats(values: Iterable[float]) -> dict[str, float]:
    vals = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return {"mean": math.nan, "sd": math.nan, "min": math.nan, "max": math.nan}
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return {"mean": statistics.fmean(vals), "sd": sd, "min": min(vals), "max": max(vals)}


GRANULARITY_ORDER = ("per-tensor", "per-channel")


def _group_key(g: dict[str, Any]) -> tuple:
    """W-only rows first, then by bits, scaling (per-tensor first) and method."""
    return (
        g["u_bits"] is not None,
        g["bits"],
        g["u_bits"] or 0,
        GRANULARITY_ORDER.index(g["granularity"]),
        list(NAMES).index(g["kind"]),
    )


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per configuration (label): statistics over its seeds."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["label"], []).append(r)
    groups = []
    for label, rs in by_label.items():
        ok = [r for r in rs if r["status"] == "ok"]
        first = rs[0]
        tiers = [r["tier"] for r in rs]
        groups.append(
            {
                "label": label,
                "kind": first["kind"],
                "method": NAMES[first["kind"]],
                "granularity": first["granularity"],
                "bits": first["bits"],
                "u_bits": first["u_bits"],
                "seeds": sorted(r["seed"] for r in rs),
                "n": len(rs),
                "failed": len(rs) - len(ok),
                "accuracy": _stats(r["accuracy"] for r in ok),
                "margin_quantized": _stats(r["margin_quantized"] for r in ok),
                "dW_over_m": _stats(r["dW_over_m"] for r in ok),
                "converged_fraction": _stats(r["converged_fraction"] for r in ok),
                "mean_iterations": _stats(r["mean_iterations"] for r in ok),
                "solver_agreement": _stats(r.get("solver_agreement", math.nan) for r in ok),
                "tier_all": min(tiers, key=TIER_RANK.__getitem__),
                "tiers": tiers,
                "certified": sum(bool(r["certified"]) for r in rs),
                "certified_weyl": sum(bool(r["certified_weyl"]) for r in rs),
                "storage_bits": ok[0]["storage_bits"] if ok else None,
                "products_per_iteration": ok[0]["products_per_iteration"] if ok else None,
                "requantized_tiers": [r["requantized_tier"] for r in ok if "requantized_tier" in r],
            }
        )
    return sorted(groups, key=_group_key)


def judge_targets(groups: Sequence[dict[str, Any]], n_seeds: int) -> list[dict[str, Any]]:
    """Each target of the issue, with the configurations that meet it (W-only rows)."""
    out = []
    for bits, acc in TARGETS:
        rows = [g for g in groups if g["bits"] == bits and g["u_bits"] is None]
        verdicts = []
        for g in rows:
            cert_ok = g["n"] == n_seeds and g["certified"] == n_seeds
            acc_ok = acc is None or (g["accuracy"]["mean"] >= acc)
            verdicts.append(
                {
                    "label": g["label"],
                    "method": g["method"],
                    "granularity": g["granularity"],
                    "certified": f"{g['certified']}/{g['n']}",
                    "accuracy_mean": g["accuracy"]["mean"],
                    "accuracy_min": g["accuracy"]["min"],
                    "met": bool(cert_ok and acc_ok),
                }
            )
        text = f"{bits} bits: certified convergence on {n_seeds} of {n_seeds} seeds"
        if acc is not None:
            text += f" with mean test accuracy >= {acc:.1%}"
        met = [v for v in verdicts if v["met"]]
        out.append(
            {
                "bits": bits,
                "accuracy": acc,
                "target": text,
                "met": bool(met) if verdicts else None,
                "met_by": [f"{v['method']} ({v['granularity']})" for v in met],
                "verdicts": verdicts,
            }
        )
    return out


# --------------------------------------------------------------------------------------- tables


def _pm(s: dict[str, float], digits: int = 4, pct: bool = False) -> str:
    if math.isnan(s["mean"]):
        return "-"
    if pct:
        return f"{100 * s['mean']:.2f} ± {100 * s['sd']:.2f}"
    return f"{s['mean']:.{digits}g} ± {s['sd']:.2g}"


def _bits_label(g: dict[str, Any]) -> str:
    return f"W{g['bits']}" + (f"/U{g['u_bits']}" if g["u_bits"] is not None else "")


def summary_rows(groups: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The comparison table: one row per configuration."""
    headers = [
        "bits",
        "scaling",
        "method",
        "test acc. % (mean ± sd)",
        "min acc. %",
        "margin(W~)",
        "||dW||/m",
        "tier on all seeds",
        "certified",
        "Weyl",
        "converged",
        "W storage [bit]",
        "U storage [bit]",
        "W~ products/iter.",
    ]
    rows = []
    for g in groups:
        st = g["storage_bits"] or {}
        acc_min = g["accuracy"]["min"]
        rows.append(
            [
                _bits_label(g),
                g["granularity"],
                g["method"] + (f" ({g['failed']} failed)" if g["failed"] else ""),
                _pm(g["accuracy"], pct=True),
                "-" if math.isnan(acc_min) else f"{100 * acc_min:.2f}",
                _pm(g["margin_quantized"]),
                _pm(g["dW_over_m"], 3),
                g["tier_all"],
                f"{g['certified']}/{g['n']}",
                f"{g['certified_weyl']}/{g['n']}",
                _fixed(g["converged_fraction"]["mean"], 3),
                st.get("W", "-"),
                st.get("U", "-"),
                g["products_per_iteration"] or "-",
            ]
        )
    return headers, rows


def _fixed(x: float, digits: int) -> str:
    return "-" if math.isnan(x) else f"{x:.{digits}f}"


def _targets_md(targets: Sequence[dict[str, Any]]) -> str:
    lines = []
    for t in targets:
        if t["met"] is None:
            verdict = "not run in this configuration"
        elif t["met"]:
            verdict = "**MET** by " + ", ".join(t["met_by"])
        else:
            verdict = "**NOT MET** by any method"
        lines.append(f"- {t['target']}: {verdict}.")
        for v in t["verdicts"]:
            lines.append(
                f"  - {v['method']} ({v['granularity']}): certified {v['certified']}, "
                f"accuracy mean {_pct(v['accuracy_mean'])} (min {_pct(v['accuracy_min'])}) "
                f"-> {'met' if v['met'] else 'missed'}"
            )
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f}%"


# --------------------------------------------------------------------------------------- figure


def _figure(groups: Sequence[dict[str, Any]], out: Path) -> str:
    present = {g["granularity"] for g in groups if g["u_bits"] is None}
    grans = [gran for gran in GRANULARITY_ORDER if gran in present]
    fig, axes = new_figure(2, max(len(grans), 1))
    for i, gran in enumerate(grans):
        for kind, name in NAMES.items():
            gs = [
                g
                for g in groups
                if g["kind"] == kind and g["granularity"] == gran and g["u_bits"] is None
            ]
            if gs:
                _plot_method(axes[i], sorted(gs, key=lambda g: g["bits"]), name)
        a_acc, a_m = axes[i][0], axes[i][1]
        for y, ls in ((2.5, "--"), (5.0, ":")):
            a_acc.axhline(y, color="k", lw=0.8, ls=ls)
        a_m.axhline(0.0, color="k", lw=0.8)
        a_acc.set_yscale("log")
        _plain_ticks(a_acc)
        a_acc.set_title(f"test error ({gran}); targets: dashed 2.5%, dotted 5%", fontsize=9)
        a_m.set_title(f"margin(W~) ({gran}); filled: certified on every seed", fontsize=9)
        for a, lab in ((a_acc, "test error % (mean ± sd)"), (a_m, "margin(W~)")):
            a.set_xlabel("bits of W")
            a.set_ylabel(lab)
        a_acc.legend(fontsize=7)
    save_figure(fig, out / "lowbit")
    return "lowbit.png"


def _plain_ticks(ax: Any) -> None:
    """Log axis with plain numbers (``2``, ``5``, ``10``) instead of powers of ten."""
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)


def _plot_method(ax_row: Sequence[Any], gs: list[dict[str, Any]], name: str) -> None:
    bits = [g["bits"] for g in gs]
    for a, key, scale in ((ax_row[0], "accuracy", -100.0), (ax_row[1], "margin_quantized", 1.0)):
        shift = 100.0 if key == "accuracy" else 0.0
        mean = [shift + scale * g[key]["mean"] for g in gs]
        sd = [abs(scale) * g[key]["sd"] for g in gs]
        line = a.errorbar(bits, mean, yerr=sd, capsize=2, lw=1, label=name)
        color = line[0].get_color()
        for b, v, g in zip(bits, mean, gs, strict=True):
            full = g["certified"] == g["n"]
            a.plot([b], [v], "o", ms=5, color=color, mfc=color if full else "white")
        a.set_xticks(sorted(set(bits)))


# --------------------------------------------------------------------------------------- report


def _mixed_note(groups: Sequence[dict[str, Any]]) -> str:
    mixed = [g for g in groups if g["u_bits"] is not None]
    if not mixed:
        return "No mixed-precision rows were run."
    return (
        "Mixed precision: W and U get different bit-widths (`W4/U8` = W at 4 bits, U at 8 bits). "
        "U storage is codes + one float scale per row (per-channel) or per tensor; rows without "
        "a U bit-width keep U in float32 (32 bits per entry), as the paper."
    )


def _same_as_ste_note(groups: Sequence[dict[str, Any]]) -> str:
    """Where margin-aware QAT reproduced STE QAT exactly (no lift, no penalty ever active)."""
    key = {(g["kind"], g["granularity"], g["bits"], g["u_bits"]): g for g in groups}
    same = [
        f"{_bits_label(g)} {g['granularity']}"
        for g in groups
        if g["kind"] == "margin"
        and (ste := key.get(("ste", g["granularity"], g["bits"], g["u_bits"]))) is not None
        and g["accuracy"] == ste["accuracy"]
        and g["margin_quantized"] == ste["margin_quantized"]
    ]
    if not same:
        return ""
    return (
        "Margin-aware QAT coincides exactly with STE QAT at "
        + ", ".join(same)
        + ": there `Q_b(W)` already had margin >= tau (no lift) and `||dW||_F <= m`, so neither "
        "penalty ever became active and the two runs are the same computation."
    )


PROX_NOTE = (
    "ProxQuant (both placements) trains the weights onto their grid: `||dW||/m` compares the "
    "frozen weights with the latent ones just before the freeze, and is 0 when the prox had "
    "already put every weight on its grid. The deployed W~ is then the trained network itself, "
    "and with `dW = 0` every tier reduces to `margin(W~) > 0`: an `a_priori` label on such a row "
    "says no more than that (the bound `n max|dW_ij| < m` holds trivially)."
)


def _factored_note(groups: Sequence[dict[str, Any]]) -> str:
    fac = [g for g in groups if g["kind"] == "proxquant-factors"]
    if not fac:
        return ""
    req = ", ".join(
        f"{_bits_label(g)} {g['granularity']}: {'/'.join(g['requantized_tiers']) or '-'}"
        for g in fac
    )
    return (
        "ProxQuant on factors deploys `W~ = (1 - m) I - A~^T A~ + B~ - B~^T` with low-bit `A~`, "
        "`B~` and a float scalar `m`: `sym(I - W~) = m I + A~^T A~ >= m I`, so it is certified "
        "at every bit-width by construction (tier `construction`, checked exactly: "
        "`margin(W~) >= m`). The price: applying it to a vector costs `2 r n + 2 n^2` = "
        "4 n^2 low-bit products per solver iteration instead of n^2, and its storage is two "
        "n x n code matrices (column 'W storage'). The assembled product is not on a b-bit "
        "grid: deploying it as one b-bit matrix re-quantizes it, and that single-matrix "
        f"deployment is certified only as follows (tier per seed): {req}."
    )


def render_lowbit(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write ``lowbit.png/.pdf``, ``results.json`` and ``report.md`` into ``out``."""
    out = Path(out)
    cfg = results["config"]
    groups = aggregate(results["rows"])
    n_seeds = len(cfg["seeds"])
    targets = judge_targets(groups, n_seeds)
    results["groups"] = groups
    results["targets"] = targets
    fig = _figure(groups, out) if groups else None
    results["figures"] = [fig, fig.replace(".png", ".pdf")] if fig else []
    h, rows = summary_rows(groups)
    write_json(out / "results.json", results)
    atomic_write_text(out / "report.md", _markdown(results, groups, targets, h, rows, fig))
    return results


def _failures_md(rows: Sequence[dict[str, Any]]) -> str:
    failed = [r for r in rows if r["status"] != "ok"]
    if not failed:
        return "No run failed."
    lines = [
        f"- {r['label']} seed {r['seed']}: {r.get('error', 'failed')} "
        "(counted as uncertified, no accuracy)"
        for r in failed
    ]
    return "\n".join(lines)


def _float_md(results: dict[str, Any]) -> str:
    rows = []
    for seed, fl in results["float_eval"].items():
        rows.append([seed, fl["accuracy"], fl["m"], fl["converged_fraction"]])
    if not rows:
        return "No float model was evaluated."
    return markdown_table(["seed", "float test acc.", "m", "converged"], rows)


def _markdown(results, groups, targets, h, rows, fig) -> str:
    cfg = results["config"]
    mode = "QUICK (CI-sized; not the full protocol)" if cfg["quick"] else "full protocol"
    missing = results["not_run"]
    status = (
        f"INCOMPLETE: {len(missing)} stages not run within the time budget "
        f"(rerun with `--resume` to add them): {', '.join(missing[:12])}"
        + (" ..." if len(missing) > 12 else "")
        if missing
        else "complete"
    )
    mixed = [r for r in rows if "/U" in str(r[0])]
    main = [r for r in rows if "/U" not in str(r[0])]
    checked = [g for g in groups if math.isfinite(g["solver_agreement"]["min"])]
    worst = min(checked, key=lambda g: g["solver_agreement"]["min"]) if checked else None
    parts = [
        "# monquant lowbit: certified low-bit MonDEQs",
        "",
        f"Command: `{results['command']}`  ",
        f"Mode: {mode}; status: {status}  ",
        f"Seeds: {cfg['seeds']}; bits {cfg['bits']}; scaling {cfg['granularities']}; "
        f"solver {cfg['solver'].upper()} tol {cfg['tol']:g}, cap {cfg['max_iter']}; hidden "
        f"n = {cfg['hidden']}  ",
        f"{wall_time_line(results)}",
        "",
        "## Protocol",
        "",
        results["protocol"],
        "",
        "## Targets",
        "",
        _targets_md(targets),
        "",
        "## Comparison (mean ± sd over seeds; certified = exact tier margin(W~) > 0)",
        "",
        markdown_table(h, main),
        "",
        f"![low-bit comparison]({fig})" if fig else "",
        "",
        "## Mixed precision",
        "",
        _mixed_note(groups),
        "",
        markdown_table(h, mixed) if mixed else "",
        "",
        "## Notes",
        "",
        _factored_note(groups),
        "",
        PROX_NOTE,
        "",
        _same_as_ste_note(groups),
        "",
        (
            "Solver cross-check: every deployed model was also evaluated with Douglas-Rachford "
            f"on the first {cfg['check_limit']} test images; the smallest fraction of "
            f"predictions that agree with the main solver's is "
            f"{worst['solver_agreement']['min']:.4f} ({worst['label']}, tier "
            f"{worst['tier_all']})."
            if worst
            else "No solver cross-check ran."
        ),
        "",
        "Storage counts the equilibrium layer only (codes + 32-bit scales; the float margin `m` "
        "of the factored form included); the bias and the head stay float32 everywhere. "
        "Float32 storage of the same layer: "
        + (
            f"{groups[0]['storage_bits']['float32_total']} bits."
            if groups and groups[0]["storage_bits"]
            else "-"
        ),
        "",
        "## Failed runs",
        "",
        _failures_md(results["rows"]),
        "",
        "## Float models",
        "",
        _float_md(results),
    ]
    return "\n".join(parts) + "\n"
