"""Render the paper reproduction: figures (PNG + PDF), ``report.md`` and ``results.json``.

Takes the plain results of :func:`monquant.experiments.paper.reproduce.run_reproduce` and draws every
table and figure; it also judges the paper's qualitative claims against what was measured,
marking each reproduced or not, without softening a difference.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from monquant.experiments.paper.setup import SETUP_SOURCES
from monquant.experiments.stages import stage_seconds_sum
from monquant.report import (
    certificate_cells,
    certificate_headers,
    markdown_table,
    new_figure,
    save_figure,
)
from monquant.storage.files import atomic_write_text
from monquant.storage.jsonio import write_json

__all__ = ["accuracy_noise", "judge_claims", "render_report"]

#: The full run's wall-time target on the 2-core CPU machine: issue 16's 3 minutes for `make
#: reproduce` alone on the machine (it was 6 minutes before).
FULL_RUN_TARGET_S = 180.0


def accuracy_noise(p: float, q: float, n: int, z: float = 1.96) -> float:
    """Half-width of the 95% normal interval of the difference of two accuracies ``p``, ``q`` each
    measured on ``n`` test images (binomial, treated as independent: conservative for paired
    predictions on the same images). A difference below it is not a measured difference."""
    return z * math.sqrt((p * (1 - p) + q * (1 - q)) / max(n, 1))


def _fig_paper_solver(phase: dict[str, Any], out: Path) -> str | None:
    """Figure 1 as the paper draws it: FB iterations and final residual against ||dW||/m."""
    rows = [r for r in phase["rows"] if "paper_fb_step" in r]
    if not rows:
        return None
    pfb = phase["paper_fb"]
    fig, ax = new_figure(2, 1)
    a0, a1 = ax[0][0], ax[0][1]
    x = [r["dW_over_m"] for r in rows]
    for a, key in ((a0, "paper_fb_max_iterations"), (a1, "paper_fb_final_residual")):
        a.plot(x, [r[key] for r in rows], "-", color="0.6", zorder=1)
        for r in rows:
            ok = r["paper_fb_all_converged"]
            a.scatter([r["dW_over_m"]], [r[key]], marker="o" if ok else "x", s=45, zorder=2,
                      color="tab:green" if ok else "tab:red")  # fmt: skip
            a.annotate(f"{r['bits']}b", (r["dW_over_m"], r[key]), fontsize=7,
                       textcoords="offset points", xytext=(4, 4))  # fmt: skip
        a.axvline(1.0, color="k", ls="--", lw=1, label=r"$\|\Delta W\|_2 / m = 1$")
        a.set_xscale("log")
        a.set_xlabel(r"$\|\Delta W\|_2 / m$")
        a.scatter([], [], marker="o", color="tab:green", label="all solves converged")
        a.scatter([], [], marker="x", color="tab:red", label="cap reached")
        a.legend(fontsize=7)
    a0.set_ylim(0, pfb["max_iter"] * 1.08)  # from zero: the cap is the top
    a0.axhline(pfb["max_iter"], color="tab:red", ls=":", lw=1)
    a0.set_ylabel(f"FB iterations (largest of {pfb['samples']} images)")
    a1.set_yscale("log")
    a1.set_ylabel(r"final relative residual $\|z_{k+1}-z_k\| / \|z_k\|$ (largest)")
    a0.set_title(rf"(a) FB, step $\tilde m/\tilde L^2$ (else {pfb['fallback_step']:g}), "
                 rf"tol {pfb['tol']:g}")
    a1.set_title("(b) final residual")
    save_figure(fig, out / "fig1_paper_solver")
    return "fig1_paper_solver.png"


def _fig_phase(phase: dict[str, Any], out: Path) -> str:
    rows = phase["rows"]
    bits = [r["bits"] for r in rows]
    fig, ax = new_figure(2, 1)
    a0, a1 = ax[0][0], ax[0][1]
    ratio = [r["dW_over_m"] for r in rows]
    marg = [r["margin_quantized"] for r in rows]
    for a, vals, label in ((a0, ratio, "||dW|| / m"), (a1, marg, "margin(W~)")):
        a.plot(bits, vals, "-", color="0.6", zorder=1)
        for b, v, r in zip(bits, vals, rows, strict=True):
            ok = r["all_converged"]
            a.scatter(
                [b],
                [v],
                marker="o" if ok else "x",
                color="tab:green" if ok else "tab:red",
                s=45,
                zorder=2,
            )
        a.set_xlabel("bits")
        a.set_ylabel(label)
        a.set_xscale("log", base=2)
        a.set_xticks(bits)
        a.set_xticklabels([str(b) for b in bits])
    a0.set_yscale("log")
    a0.axhline(1.0, color="k", ls="--", lw=1, label="threshold ||dW|| = m")
    a1.axhline(0.0, color="k", ls="--", lw=1, label="margin(W~) = 0")
    a1.axhline(phase["float"]["margin"], color="tab:blue", ls=":", lw=1, label="float margin m")
    for a in (a0, a1):
        a.scatter([], [], marker="o", color="tab:green", label="all solves converged")
        a.scatter([], [], marker="x", color="tab:red", label="some solves did not converge")
        a.legend(fontsize=7)
    a0.set_title("Figure 1: Weyl certificate ||dW||/m < 1")
    a1.set_title("Figure 1: exact margin of the quantized operator")
    save_figure(fig, out / "fig1_phase_transition")
    return "fig1_phase_transition.png"


def _fig_displacement(disp: dict[str, Any], out: Path) -> str:
    fig, ax = new_figure(2, 1, size=(5.5, 5.0))
    a = ax[0][0]
    lo, hi = math.inf, 0.0
    for b, d in disp["per_sample"].items():
        emp = [max(v, 1e-18) for v in d["empirical"]]
        bd = d["bound"]
        a.scatter(bd, emp, s=4, alpha=0.5, label=f"{b} bits")
        lo, hi = min(lo, min(emp), min(bd)), max(hi, max(emp), max(bd))
    a.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (bound attained)")
    a.set_xscale("log")
    a.set_yscale("log")
    a.set_xlabel("Theorem 3 bound (with a-posteriori solver errors)")
    a.set_ylabel(r"empirical $\|z^\star - \tilde z^\star\|$")
    a.set_title("(a) absolute: per sample, float64 equilibria")
    a.legend(fontsize=7, markerscale=3)
    # (b) the paper's relative form: ||z* - z~*|| / ||z~*|| <= ||dW|| / m, per bit-width
    r = ax[0][1]
    rows = {str(row["bits"]): row for row in disp["rows"]}
    xs_all: list[float] = []
    for b, d in disp["per_sample"].items():
        rel = d.get("relative")
        if rel is None or b not in rows:
            continue
        x = rows[b]["dW_over_m"]
        xs_all.append(x)
        r.scatter([x] * len(rel), [max(v, 1e-18) for v in rel], s=4, alpha=0.4, label=f"{b} bits")
    if xs_all:
        grid = [min(xs_all) / 1.5, max(xs_all) * 1.5]
        r.plot(grid, grid, "k--", lw=1, label=r"Theorem 3: $\|\Delta W\|_2 / m$")
    r.set_xscale("log")
    r.set_yscale("log")
    r.set_xlabel(r"$\|\Delta W\|_2 / m$")
    r.set_ylabel(r"relative displacement $\|z^\star - \tilde z^\star\| / \|\tilde z^\star\|$")
    r.set_title("(b) relative, as the paper plots it")
    r.legend(fontsize=7, markerscale=3)
    save_figure(fig, out / "fig2_displacement")
    return "fig2_displacement.png"


def _fig_qat(qvp: dict[str, Any], out: Path) -> str:
    rows = qvp["rows"]
    bits = sorted({r["bits"] for r in rows})
    by = {(r["bits"], r["method"]): r for r in rows}
    fig, ax = new_figure(3, 1, size=(4.5, 4.2))
    width = 0.38
    for j, (key, label) in enumerate(
        (("accuracy", "test accuracy"), ("dW_over_m", r"$\|\Delta W\|_2 / m$"),
         ("margin_quantized", r"margin$(\tilde W)$"))
    ):  # fmt: skip
        a = ax[0][j]
        for i, meth in enumerate(("PTQ", "QAT")):
            cells = [by.get((b, meth), {}) for b in bits]  # {} where a bar is missing
            vals = [c.get(key, math.nan) for c in cells]
            conv = [bool(c.get("all_converged", False)) for c in cells]
            margin_ok = [bool(c.get("certified_exact", False)) for c in cells]
            xs = [k + (i - 0.5) * width for k in range(len(bits))]
            bars = a.bar(xs, vals, width, label=meth)
            for bar, ok, mok in zip(bars, conv, margin_ok, strict=True):
                if not ok:
                    bar.set_hatch("//")
                    bar.set_edgecolor("tab:red")
                if not mok and key == "margin_quantized":
                    a.annotate("margin test fails", (bar.get_x() + bar.get_width() / 2, 0),
                               fontsize=6, ha="center", va="bottom", rotation=90)  # fmt: skip
        if key == "accuracy":
            a.set_ylim(0.0, 1.0)  # bars from zero
        if key == "dW_over_m":
            a.set_ylim(bottom=0.0)
            a.axhline(1.0, color="k", ls="--", lw=1, label=r"$\|\Delta W\|_2 = m$")
        a.set_xticks(range(len(bits)))
        a.set_xticklabels([f"{b} bits" for b in bits])
        a.set_ylabel(label)
        if key == "margin_quantized":
            a.axhline(0, color="k", lw=0.8)
        a.legend(fontsize=7, title="hatched: not all converged", title_fontsize=7)
    ax[0][0].set_title("(a) test accuracy")
    ax[0][1].set_title("(b) normalised perturbation")
    ax[0][2].set_title("(c) quantized margin (the paper's criterion)")
    save_figure(fig, out / "fig3_qat_vs_ptq")
    return "fig3_qat_vs_ptq.png"


def _fig_iterate(itq: dict[str, Any], out: Path) -> str:
    fig, ax = new_figure(1, 1, size=(6.5, 4.5))
    a = ax[0][0]
    for c in itq["curves"]:
        line = a.plot(range(1, len(c["error"]) + 1), c["error"], label=c["name"])[0]
        if c["kind"] == "fixed":
            a.axhline(c["predicted_radius"], color=line.get_color(), ls="--", lw=0.8)
    a.set_yscale("log")
    a.set_xlabel("iteration k")
    a.set_ylabel("max over samples ||s_k - s*||")
    a.set_title(
        f"Corollary 2: quantized {itq['method'].upper()} iterates (rho = {itq['rho']:.4f}); "
        "dashed: e/(1-rho)",
        fontsize=9,
    )
    a.legend(fontsize=7)
    save_figure(fig, out / "fig4_iterate_quantization")
    return "fig4_iterate_quantization.png"


def _row(rows: list[dict[str, Any]], bits: int, method: str | None = None) -> dict[str, Any] | None:
    for r in rows:
        if r["bits"] == bits and (method is None or r.get("method") == method):
            return r
    return None


def judge_claims(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The paper's qualitative claims, each with what this run measured and a verdict."""
    ph = results["phase_transition"]["rows"]
    claims: list[dict[str, Any]] = []

    def add(claim: str, measured: str, ok: bool | str | None) -> None:
        if isinstance(ok, str):
            verdict = ok
        else:
            verdict = "not run" if ok is None else ("reproduced" if ok else "NOT reproduced")
        claims.append({"claim": claim, "measured": measured, "verdict": verdict})

    low = [r for r in ph if r["bits"] in (3, 4)]
    add(
        "3- and 4-bit PTQ lose monotonicity (the paper's convergence criterion: margin(W~) <= 0)",
        "; ".join(f"{r['bits']} bits: margin(W~) = {r['margin_quantized']:.3g} ({r['verdict']})"
                  for r in low) or "-",
        all(r["verdict"] == "refuted" for r in low) if low else None,
    )  # fmt: skip
    pfb_low = [r for r in low if "paper_fb_step" in r]
    if pfb_low:
        add(
            "3- and 4-bit PTQ diverge (FB as the paper ran it: step m~/L~^2, or 0.01 when "
            "margin(W~) <= 0; tol 1e-5; cap 2000)",
            "; ".join(f"{r['bits']} bits: FB at step {r['paper_fb_step']:.3g} converged on "
                      f"{r['paper_fb_converged_fraction']:.1%} of {r['paper_fb_samples']} images"
                      for r in pfb_low),
            all(not r["paper_fb_all_converged"] for r in pfb_low),
        )  # fmt: skip
    add(
        "3- and 4-bit PTQ do not converge (PR on the full test set; monotonicity is sufficient "
        "for convergence, not necessary, so PR may converge on a non-monotone W~)",
        "; ".join(
            f"{r['bits']} bits: {r['converged_fraction']:.1%} of solves converged, "
            f"margin(W~) = {r['margin_quantized']:.3g}"
            for r in low
        )
        or "-",
        all(not r["all_converged"] for r in low) if low else None,
    )
    fb_low = [r for r in low if "fb_converged_fraction" in r]
    if fb_low:
        add(
            "3- and 4-bit PTQ do not converge (FB at monquant's step: m~/L~^2, or 1/L~^2 when "
            "W~ is not monotone; same tol and cap as PR)",
            "; ".join(
                f"{r['bits']} bits: FB {r['fb_converged_fraction']:.1%} converged" for r in fb_low
            ),
            all(not r["fb_all_converged"] for r in fb_low),
        )
    high = [r for r in ph if r["bits"] >= 5]

    def _conv(r: dict[str, Any]) -> bool:  # PR on every image and the paper's FB on its images
        return bool(r["all_converged"] and r.get("paper_fb_all_converged", True))

    add(
        "5 bits and above converge (PR on the full test set and FB as the paper ran it)",
        f"both converged at {sum(_conv(r) for r in high)}/{len(high)} bit-widths >= 5"
        + "".join(
            f"; {r['bits']} bits: PR {r['converged_fraction']:.1%}, paper's FB "
            f"{r.get('paper_fb_converged_fraction', float('nan')):.1%}"
            for r in high
            if not _conv(r)
        )
        + "".join(
            f"; FB at the certified step m~/L~^2 (tol {results['phase_transition']['solver']['tol']:g}"
            f", cap {results['phase_transition']['solver']['max_iter']}) at {r['bits']} bits: "
            f"{r['fb_converged_fraction']:.1%}"
            for r in high
            if "fb_converged_fraction" in r and not r["fb_all_converged"]
        ),
        all(_conv(r) for r in high) if high else None,
    )
    r5 = _row(ph, 5)
    add(
        "at 5 bits ||dW||/m > 1 while margin(W~) > 0 (sufficient, not necessary)",
        f"||dW||/m = {r5['dW_over_m']:.3g}, margin(W~) = {r5['margin_quantized']:.3g}"
        if r5
        else "-",
        (r5["dW_over_m"] > 1 and bool(r5["certified_exact"])) if r5 else None,
    )
    # margin(W~) > 0 counts only where it is proved (the exact tier), never on a computed value
    gap = [r for r in ph if r["dW_over_m"] > 1 and bool(r["certified_exact"])]
    add(
        "some bit-width has ||dW||/m > 1 and still margin(W~) > 0 (the Weyl test is sufficient, "
        "not necessary)",
        "; ".join(
            f"{r['bits']} bits: ||dW||/m = {r['dW_over_m']:.3g}, margin(W~) = "
            f"{r['margin_quantized']:.3g}"
            for r in gap
        )
        or "no such bit-width",
        bool(gap),
    )
    certified = [r for r in ph if r["certified_weyl"]]
    add(
        "||dW|| < m guarantees convergence (Theorem 2)",
        f"{len(certified)} bit-widths certified by Weyl; all solves converged at "
        f"{sum(r['all_converged'] for r in certified)} of them",
        all(r["all_converged"] for r in certified) if certified else None,
    )
    disp = results["displacement"]["rows"]
    add(
        "Theorem 3 displacement bound holds on every sample (float64 + solver errors)",
        "; ".join(f"{r['bits']} bits: {_within(r)}" for r in disp),
        all(r["violations"] == 0 for r in disp) if disp else None,
    )
    qrows = results["qat_vs_ptq"]["rows"]
    q4, p4 = _row(qrows, 4, "QAT"), _row(qrows, 4, "PTQ")
    float_m = results["phase_transition"]["float"]["margin"]
    add(
        "QAT recovers provable convergence at 4 bits (margin(W~) > 0, proved)",
        (f"QAT 4 bits: margin(W~) = {q4['margin_quantized']:.3g} ({q4['tier']} tier), PR "
         f"converged {q4['converged_fraction']:.1%}") if q4 else "-",
        (bool(q4["certified_exact"]) and q4["all_converged"]) if q4 else None,
    )  # fmt: skip
    add(
        "... at a smaller margin m than the float model",
        f"QAT m = {q4['m']:.3g} vs float m = {float_m:.3g}" if q4 else "-",
        (q4["m"] < float_m) if q4 else None,
    )
    add(
        "at 4 bits PTQ fails while QAT converges (the paper's criterion: the margin test)",
        (f"margin test: PTQ {'pass' if p4['certified_exact'] else 'fail'}, QAT "
         f"{'pass' if q4['certified_exact'] else 'fail'}; PR solves converged: PTQ "
         f"{p4['converged_fraction']:.1%}, QAT {q4['converged_fraction']:.1%}")
        if (q4 and p4) else "-",
        (not p4["certified_exact"] and bool(q4["certified_exact"])) if (q4 and p4) else None,
    )  # fmt: skip
    n_test = results["phase_transition"]["samples"]
    for b in (6, 8):
        q, p = _row(qrows, b, "QAT"), _row(qrows, b, "PTQ")
        ok: bool | str | None = None
        text = "-"
        if q and p:
            noise = accuracy_noise(p["accuracy"], q["accuracy"], n_test)
            diff = p["accuracy"] - q["accuracy"]
            text = (f"PTQ {p['accuracy']:.4f} ({p['converged_fraction']:.1%} conv.) vs QAT "
                    f"{q['accuracy']:.4f} ({q['converged_fraction']:.1%} conv.): difference "
                    f"{diff:+.4f}, 95% noise level +-{noise:.4f} on {n_test} images")  # fmt: skip
            both = p["all_converged"] and q["all_converged"]
            if not both or diff < -noise:
                ok = False
            elif diff > noise:
                ok = True
            else:
                ok = "within noise: not decided"
        add(f"at {b} bits both converge and PTQ is slightly more accurate", text, ok)
    seeds = (results.get("seeds") or {}).get("seeds") or []
    if seeds:
        hits = [s["seed"] for s in seeds if transition_at_paper_bits(s["rows"]["paper"])]
        need = max(1, math.ceil(2 * len(seeds) / 3))
        add(
            "the phase transition lies at the paper's bits (margin(W~) < 0 at 3 and 4 bits, > 0 "
            f"with ||dW||/m > 1 at 5 bits) on at least {need} of {len(seeds)} training seeds",
            f"seeds {', '.join(map(str, hits)) or 'none'} of "
            f"{', '.join(str(s['seed']) for s in seeds)}; m = "
            + ", ".join(f"{s['m']:.3g}" for s in seeds)
            + "; kappa = " + ", ".join(f"{s['kappa']:.3g}" for s in seeds),
            len(hits) >= need,
        )
    itq = results["iterate_quant"]["curves"]
    fixed = [c for c in itq if c["kind"] == "fixed"]
    adapt = [c for c in itq if c["kind"] == "adaptive"]
    add(
        "Corollary 2: fixed cell width gives an error floor within e/(1-rho)",
        "; ".join(
            f"{c['name']}: final {c['final_error']:.2e} vs radius {c['predicted_radius']:.2e}"
            for c in fixed
        ),
        all(
            c["within_predicted_radius_at_end"] and c["bound_holds_every_iteration"] for c in fixed
        ),
    )
    add(
        "Corollary 2: geometrically shrinking cells converge to the exact equilibrium",
        "; ".join(f"{c['name']}: final error {c['final_error']:.2e}" for c in adapt),
        all(c["final_error"] < 1e-6 and c["bound_holds_every_iteration"] for c in adapt),
    )
    return claims


def _phase_table(phase: dict[str, Any]) -> str:
    h = certificate_headers(["converged", "mean it.", "max it.", "accuracy"])
    rows = [
        [
            *certificate_cells(r),
            f"{r['converged_fraction']:.1%}",
            r["mean_iterations"],
            r["max_iterations"],
            r["accuracy"],
        ]
        for r in phase["rows"]
    ]
    return markdown_table(h, rows)


def _paper_fb_table(phase: dict[str, Any]) -> str:
    rows = [r for r in phase["rows"] if "paper_fb_step" in r]
    if not rows:
        return ""
    pfb = phase["paper_fb"]
    h = ["bits", "||dW||/m", "margin(W~)", "FB step", "converged", "max it.", "final residual"]
    body = [[r["bits"], r["dW_over_m"], r["margin_quantized"], r["paper_fb_step"],
             f"{r['paper_fb_converged_fraction']:.1%}", r["paper_fb_max_iterations"],
             r["paper_fb_final_residual"]] for r in rows]  # fmt: skip
    return (
        f"Figure 1's solver as the paper ran it (experiments/margin_stability_certificate.py of "
        f"its code): forward-backward at step m~/L~^2 when margin(W~) > 0, else "
        f"{pfb['fallback_step']:g}; tol {pfb['tol']:g}; cap {pfb['max_iter']:g}; the first "
        f"{pfb['samples']} test images. monquant stops each image on its own relative residual, "
        "which is stricter than the paper's one residual over the batch.\n\n"
        + markdown_table(h, body)
    )


def _narrow_table(phase: dict[str, Any]) -> str:
    rows = phase.get("narrow_rows") or []
    if not rows:
        return ""
    wide = {r["bits"]: r for r in phase["rows"]}
    h = ["bits", "paper step 2w/(2^b-1): ||dW||/m", "margin(W~)", "tier",
         "narrow step w/(2^(b-1)-1): ||dW||/m", "margin(W~)", "tier"]  # fmt: skip
    body = [[r["bits"], wide[r["bits"]]["dW_over_m"], wide[r["bits"]]["margin_quantized"],
             wide[r["bits"]]["tier"], r["dW_over_m"], r["margin_quantized"], r["tier"]]
            for r in rows]  # fmt: skip
    return (
        "The phase transition under both step rules (certificates only): the paper's text uses "
        "D = 2 w_max/(2^b - 1), its code and the usual narrow-range convention "
        "D = w_max/(2^(b-1) - 1), a coarser grid by the factor (2^b - 1)/(2^b - 2).\n\n"
        + markdown_table(h, body)
    )


def transition_at_paper_bits(rows: list[dict[str, Any]]) -> bool:
    """The paper's Figure 1 picture: margin(W~) < 0 proved at 3 and 4 bits, and at 5 bits
    margin(W~) > 0 proved while ||dW||/m > 1."""
    by = {r["bits"]: r for r in rows}
    if not all(b in by for b in (3, 4, 5)):
        return False
    low = all(by[b]["verdict"] == "refuted" for b in (3, 4))
    five = by[5]["verdict"] == "certified" and by[5]["dW_over_m"] > 1
    return bool(low and five)


def _seeds_table(seeds: dict[str, Any] | None) -> str:
    if not seeds or not seeds.get("seeds"):
        return ""
    bits = seeds["bits"]
    h = ["seed", "accuracy", "m", "L", "kappa", "w_max", "rule"] + [f"{b} bits" for b in bits] + [
        "transition at the paper's bits"]  # fmt: skip
    body = []
    for s in seeds["seeds"]:
        for rule in ("paper", "narrow"):
            cells = [f"{r['dW_over_m']:.3g} / {r['margin_quantized']:+.3g}" for r in s["rows"][rule]]
            body.append([s["seed"], s["accuracy"], s["m"], s["L"], s["kappa"], s["w_max"], rule,
                         *cells, "yes" if transition_at_paper_bits(s["rows"][rule]) else "no"])  # fmt: skip
    return (
        "Each cell: ||dW||/m / margin(W~) of PTQ per tensor (certificates only, no solves). "
        "The paper's picture is margin(W~) < 0 at 3 and 4 bits and margin(W~) > 0 with "
        "||dW||/m > 1 at 5 bits.\n\n" + markdown_table(h, body)
    )


def _setup_table(cfg: dict[str, Any]) -> str:
    rows = [[what, source] for what, source, which in SETUP_SOURCES
            if which in ("all setups", cfg.get("setup", "paper"))]  # fmt: skip
    return markdown_table(["setting", "source"], rows)


def _fb_table(phase: dict[str, Any]) -> str:
    rows = [r for r in phase["rows"] if "fb_samples" in r]
    if not rows:
        return ""
    h = ["bits", "margin(W~)", "FB converged", "FB mean it.", "FB max it.", "FB accuracy"]
    body = [
        [
            r["bits"],
            r["margin_quantized"],
            f"{r['fb_converged_fraction']:.1%}",
            r["fb_mean_iterations"],
            r["fb_max_iterations"],
            r["fb_accuracy"],
        ]
        for r in rows
    ]
    return (
        f"Forward-backward at monquant's step on the first {rows[0]['fb_samples']} test images, "
        "same tolerance and cap as PR, step m~/L~^2 of the quantized operator (1/L~^2 when it is "
        "not monotone). The certified FB step contracts with rho = sqrt(1 - 1/kappa~^2), i.e. about "
        "1 - 1/(2 kappa~^2): for a small-margin model (kappa in the tens) that is tens of "
        "thousands of iterations in the worst case, beyond the cap, so FB at its certified step "
        "can stall where PR (rho = sqrt(1 - 1/kappa~)) converges; the uncertified fallback step "
        "used for non-monotone W~ is larger and may converge.\n\n" + markdown_table(h, body)
    )


def _within(row: dict[str, Any]) -> str:
    """A displacement row's share within the Theorem 3 bound; ``None`` when no sample's bound is
    finite (the quantized operator is not proved monotone, so its solve has no error bound)."""
    frac = row["fraction_within_bound"]
    return "not checkable (W~ not proved monotone)" if frac is None else f"{frac:.2%}"


def _disp_table(disp: dict[str, Any]) -> str:
    h = [
        "bits",
        "||dW||/m",
        "within bound",
        "violations",
        "within naive bound (no solver err.)",
        "mean bound/emp.",
        "median bound/emp.",
        "min bound/emp.",
        "Cor. 3 rel. bound",
        "max rel. displacement",
        "max solver error",
    ]
    rows = [
        [
            r["bits"],
            r["dW_over_m"],
            _within(r),
            r["violations"],
            f"{r['fraction_within_naive_bound']:.2%}",
            r["mean_ratio_bound_over_empirical"],
            r["median_ratio_bound_over_empirical"],
            r["min_ratio_bound_over_empirical"],
            r["corollary3_relative_bound"],
            r["max_relative_displacement"],
            r["max_solver_error_bound"],
        ]
        for r in disp["rows"]
    ]
    return markdown_table(h, rows)


def _qat_table(qvp: dict[str, Any]) -> str:
    h = [
        "bits",
        "method",
        "quantized",
        "accuracy",
        "m (float W)",
        "margin(W~)",
        "||dW||/m",
        "tier",
        "margin test (paper)",
        "converged (PR solve)",
        "mean it.",
    ]
    rows = [
        [
            r["bits"],
            r["method"],
            ",".join(r.get("quantized", ["W"])),
            r["accuracy"],
            r["m"],
            r["margin_quantized"],
            r["dW_over_m"],
            r["tier"],
            "pass" if r["certified_exact"] else "fail",
            f"{r['converged_fraction']:.1%}",
            r["mean_iterations"],
        ]
        for r in sorted(qvp["rows"], key=lambda r: (r["bits"], r["method"]))
    ]
    return markdown_table(h, rows)


def _iter_table(itq: dict[str, Any]) -> str:
    h = [
        "quantizer",
        "max step error e",
        "predicted radius e/(1-rho)",
        "final error",
        "Cor. 2 bound held every iteration",
    ]
    rows = [
        [
            c["name"],
            c["measured_step_errors_max"],
            c["predicted_radius"] if c["kind"] == "fixed" else "0 (summable)",
            c["final_error"],
            c["bound_holds_every_iteration"],
        ]
        for c in itq["curves"]
    ]
    return markdown_table(h, rows)


def _training_table(results: dict[str, Any]) -> str:
    hist = results["float"].get("history")
    if not hist:
        return f"Float model loaded from `{results['float']['model']}` (not trained in this run)."
    h = [
        "epoch",
        "loss",
        "train acc.",
        "test acc.",
        "m",
        "L",
        "kappa",
        "mean it.",
        "unconverged (train/backward/test)",
        "seconds",
    ]
    rows = [
        [
            e["epoch"],
            e["loss"],
            e["train_accuracy"],
            e["test_accuracy"],
            e["m"],
            e["L"],
            e["kappa"],
            e["mean_iterations"],
            f"{e['train_unconverged']}/{e['backward_unconverged']}/{e['test_unconverged']}",
            e["seconds"],
        ]
        for e in hist
    ]
    return markdown_table(h, rows)


def full_run_target_note(results: dict[str, Any]) -> str:
    """The report's sentence on the full-run target: judged by the invocation's wall time, and
    only for a full (not quick) run that reused no stage; the sum of the stage times is named
    apart when the stages overlapped on an executor."""
    cfg = results["config"]
    stage_sum = stage_seconds_sum(results)
    wall = results.get("wall_seconds_this_invocation")
    target_note = (f"Full-run target: <= {FULL_RUN_TARGET_S / 60:.0f} min of wall time on the 2-core "
                   "CPU machine; ")  # fmt: skip
    if wall is None:
        target_note += ("this run's wall time was not recorded (its stage times add up to "
                        f"{stage_sum / 60:.2f} min).")  # fmt: skip
    elif cfg["quick"]:
        target_note += f"this run took {wall / 60:.2f} min (quick mode: not comparable to the target)."
    elif results["resumed_stages"]:
        target_note += (f"this invocation took {wall / 60:.2f} min but reused stages of an earlier one, "
                        "so it is not compared with the target.")  # fmt: skip
    else:
        target_note += f"this run took {wall / 60:.2f} min -> " + (
            "target met." if wall <= FULL_RUN_TARGET_S else "target MISSED.")  # fmt: skip
    if wall is not None and not results["resumed_stages"] and stage_sum > 1.05 * wall:
        target_note += (f" Its stages' own times add up to {stage_sum / 60:.2f} min: stages ran in "
                        "parallel on the executor.")  # fmt: skip
    if results["resumed_stages"]:
        target_note += (
            f" Stages reused from an earlier invocation: {', '.join(results['resumed_stages'])}."
        )
    return target_note


def render_report(results: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write figures, ``results.json`` and ``report.md`` into ``out``; return the results."""
    out = Path(out)
    paper_fig = _fig_paper_solver(results["phase_transition"], out)
    figs = {
        "phase": _fig_phase(results["phase_transition"], out),
        "displacement": _fig_displacement(results["displacement"], out),
        "qat": _fig_qat(results["qat_vs_ptq"], out),
        "iterate": _fig_iterate(results["iterate_quant"], out),
    }
    if paper_fig:
        figs["paper_solver"] = paper_fig
    claims = judge_claims(results)
    results["claims"] = claims
    results["figures"] = {k: [v, v.replace(".png", ".pdf")] for k, v in figs.items()}
    cfg = results["config"]
    fl = results["phase_transition"]["float"]
    stage_sum = stage_seconds_sum(results)
    wall = results.get("wall_seconds_this_invocation")
    timing_rows = [[k, v] for k, v in results["stage_seconds"].items()]
    timing_rows.append(["sum of the stage times", stage_sum])
    if wall is not None:
        timing_rows.append(["wall time of this invocation", wall])
    target_note = full_run_target_note(results)
    mode = (
        "QUICK (small CI-sized variant: numbers are not the paper setup)"
        if cfg["quick"]
        else "full paper setup"
    )
    md = [
        "# monquant: reproduction of the MonDEQ quantization-robustness paper",
        "",
        f"Command: `{results['command']}`  ",
        f"Mode: {mode}  ",
        f"Seed: {cfg['seed']}; solver {cfg['solver'].upper()} tol {cfg['tol']:g}, cap {cfg['max_iter']} "
        f"iterations; test images: {results['phase_transition']['samples']}  ",
        f"Setup: `{cfg.get('setup', 'paper')}`; initial margin m0 = {cfg.get('margin_init', 1.0):g}"
        f", margin floor {cfg.get('margin_floor', 0.0):g}, rank of A {cfg.get('rank') or 'n'}, "
        f"init `{cfg.get('init', 'uniform')}`  ",
        f"Versions: {results['versions']}  ",
        f"Data: `{results['data']['source']}`",
        "",
        "## Setup and where each setting comes from",
        "",
        _setup_table(cfg),
        "",
        "## Float model",
        "",
        f"Test accuracy {fl['accuracy']:.4f}; m = margin(W) = {fl['margin']:.4g}, L = {fl['L']:.4g}, "
        f"kappa = {fl['kappa']:.4g}, ||W|| = {fl['norm_W']:.4g}; Theorem 4 relative condition "
        f"number ||W||/m = {fl['cond_relative']:.4g}.",
        "",
        _training_table(results),
        "",
        "## Figure 1: margin certificate and phase transition (PTQ of W, per-tensor)",
        "",
        "Certificates are computed from the weights alone (float64); convergence, iterations and "
        "accuracy are measured on the test set with the quantized W~ in the forward solve.",
        "",
        _phase_table(results["phase_transition"]),
        "",
        _fb_table(results["phase_transition"]),
        "",
        _paper_fb_table(results["phase_transition"]),
        "",
        (f"![Figure 1 with the paper's solver]({figs['paper_solver']})\n\n*Figure 1 (as the paper "
         "draws it): iterations and final residual of the paper's FB against ||dW||/m; the "
         "dashed line is the Weyl threshold ||dW|| = m; red crosses reached the cap.*"
         if "paper_solver" in figs else ""),
        "",
        f"![Figure 1]({figs['phase']})\n\n*Figure 1 (certificates): ||dW||/m and the exact "
        "margin of W~ against bits; markers give PR convergence on the full test set.*",
        "",
        _narrow_table(results["phase_transition"]),
        "",
        "## The phase transition across training seeds",
        "",
        _seeds_table(results.get("seeds")),
        "",
        "## Figure 2: displacement bound (Theorem 3) and Corollary 3",
        "",
        f"{results['displacement']['rows'][0]['samples']} test inputs drawn with seed {cfg['seed']}; "
        "both equilibria solved in float64 to relative residual 1e-12; the bound includes the "
        "a-posteriori solver errors so the comparison is rigorous. The paper reports the bound "
        "holding on 91-99% of samples; its code compares float32 equilibria from PR at tol 1e-6 "
        "(500 iterations) by relative error with a 1e-7 slack, so each side carries a solver "
        "error of up to rho/(1 - rho) times its last step and float32 rounding, which the bound "
        "does not account for (we did not rerun that float32 check; this is the likely reason, "
        "not a measured one).",
        "",
        _disp_table(results["displacement"]),
        "",
        f"![Figure 2]({figs['displacement']})",
        "",
        "## Figure 3: QAT against PTQ",
        "",
        _qat_table(results["qat_vs_ptq"]),
        "",
        f"![Figure 3]({figs['qat']})",
        "",
        "## Corollary 2: iterate quantization",
        "",
        f"{results['iterate_quant']['method'].upper()} map on {results['iterate_quant']['samples']} "
        f"test inputs, modulus rho = {results['iterate_quant']['rho']:.5f}; the state is rounded "
        "every iteration.",
        "",
        _iter_table(results["iterate_quant"]),
        "",
        f"![Corollary 2]({figs['iterate']})",
        "",
        "## Wall time per stage (seconds)",
        "",
        markdown_table(["stage", "seconds"], timing_rows),
        "",
        target_note,
        "",
        "## The paper's claims against this run",
        "",
        markdown_table(
            ["paper claim", "this run measured", "verdict"],
            [[c["claim"], c["measured"], c["verdict"]] for c in claims],
        ),
        "",
    ]
    atomic_write_text(out / "report.md", "\n".join(md))
    write_json(out / "results.json", results)
    return results
