"""End-to-end: `monquant reproduce --quick` on real MNIST (the CI run of the main job)."""

import json

import pytest

from monquant.cli import main


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, mnist_dir):
    out = tmp_path_factory.mktemp("reproduce")
    rc = main(
        [
            "reproduce",
            "--quick",
            "--out",
            str(out),
            "--data-dir",
            str(mnist_dir),
            "--no-progress",
            "--no-download",
            "--threads",
            "1",
        ]
    )
    assert rc == 0
    return out


def test_process_executor_retrains_to_the_same_stages(quick_run, tmp_path, mnist_dir):
    """The independent trainings (QAT, extra seeds) rerun in two worker processes, from the
    serial run's other stages (--resume), give the same stage results."""
    import shutil

    out = tmp_path / "proc"
    shutil.copytree(quick_run, out)
    trained = [p for p in (out / "stages").glob("*.json")
               if p.stem.startswith("float_seed_") or p.stem[4:].isdigit()]  # qat_<bits>  # fmt: skip
    assert trained
    serial = {p.stem: json.loads(p.read_text())["result"] for p in trained}
    for p in trained:
        p.unlink()
    for name in ("qat_vs_ptq", "seeds"):
        (out / "stages" / f"{name}.json").unlink()
    rc = main(["reproduce", "--quick", "--out", str(out), "--data-dir", str(mnist_dir),
               "--no-progress", "--no-download", "--threads", "1", "--resume",
               "--executor", "process", "--workers", "2"])  # fmt: skip
    assert rc == 0
    again = {p.stem: json.loads((out / "stages" / f"{p.stem}.json").read_text())["result"]
             for p in trained}  # fmt: skip
    drop = ("train_seconds", "model")
    for name, r in serial.items():
        a = {k: v for k, v in r.items() if k not in drop}
        b = {k: v for k, v in again[name].items() if k not in drop}
        for h1, h2 in zip(a.pop("history"), b.pop("history"), strict=True):
            for k in ("seconds", "eval_seconds"):
                h1.pop(k, None), h2.pop(k, None)
            assert h1 == h2
        assert a == b


def test_outputs_exist(quick_run):
    for name in ("report.md", "results.json"):
        assert (quick_run / name).stat().st_size > 0
    for fig in (
        "fig1_phase_transition",
        "fig2_displacement",
        "fig3_qat_vs_ptq",
        "fig4_iterate_quantization",
    ):
        for ext in ("png", "pdf"):
            assert (quick_run / f"{fig}.{ext}").stat().st_size > 1000
    for stage in (
        "float",
        "phase_transition",
        "displacement",
        "qat_4",
        "qat_vs_ptq",
        "iterate_quant",
    ):
        assert (quick_run / "stages" / f"{stage}.json").exists()


def test_report_times_the_invocation_by_its_wall_clock(quick_run):
    """The report's target line reads the invocation's wall time, and the timing table names the
    sum of the stage times apart from it (under an executor the stages overlap)."""
    res = json.loads((quick_run / "results.json").read_text())
    assert res["stage_seconds_sum"] == pytest.approx(sum(res["stage_seconds"].values()))
    assert 0 < res["wall_seconds_this_invocation"]
    report = (quick_run / "report.md").read_text()
    assert "| sum of the stage times |" in report and "| wall time of this invocation |" in report
    assert f"this run took {res['wall_seconds_this_invocation'] / 60:.2f} min (quick mode" in report


def test_full_run_target_is_judged_by_wall_time() -> None:
    """A full run in parallel stages whose times add up past the target but whose wall time is
    within it meets the target; a resumed run is never judged; a slow one misses."""
    from monquant.experiments.paper.report import full_run_target_note

    base = {"config": {"quick": False}, "stage_seconds": {"float": 96.0, "qat_4": 110.5},
            "stage_seconds_sum": 626.4, "wall_seconds_this_invocation": 171.6,
            "resumed_stages": []}  # fmt: skip
    note = full_run_target_note(base)
    assert "target: <= 3 min of wall time" in note
    assert "this run took 2.86 min -> target met." in note and "add up to 10.44 min" in note
    slow = full_run_target_note({**base, "wall_seconds_this_invocation": 181.0})
    assert "target MISSED" in slow
    resumed = full_run_target_note({**base, "resumed_stages": ["float"]})
    assert "not compared with the target" in resumed and "target m" not in resumed
    old = {k: v for k, v in base.items() if k not in ("stage_seconds_sum", "wall_seconds_this_invocation")}
    assert "not recorded" in full_run_target_note({**old, "wall_seconds_all_stages": 626.4})


def test_results_structure_and_theorems(quick_run):
    res = json.loads((quick_run / "results.json").read_text())
    bits = [r["bits"] for r in res["phase_transition"]["rows"]]
    assert bits == [3, 4, 5, 6, 7, 8, 10, 12, 16, 32]
    for r in res["phase_transition"]["rows"]:
        for key in (
            "dW_norm",
            "margin_quantized",
            "weyl_bound",
            "a_priori_bound",
            "certified_exact",
            "converged_fraction",
            "accuracy",
        ):
            assert key in r
        # Theorem 2 on the trained model
        assert r["margin_quantized"] >= r["weyl_bound"] - 1e-9
        # the Weyl certificate implies convergence of every solve
        if r["certified_weyl"]:
            assert r["all_converged"]
    # Theorem 3: the displacement bound held on every sample
    for r in res["displacement"]["rows"]:
        assert r["samples"] == 256
        assert r["violations"] == 0 and r["fraction_within_bound"] == 1.0
    assert {r["method"] for r in res["qat_vs_ptq"]["rows"]} == {"PTQ", "QAT"}
    verdicts = {c["verdict"] for c in res["claims"]}
    assert verdicts <= {"reproduced", "NOT reproduced", "not run", "within noise: not decided"}
    report = (quick_run / "report.md").read_text()
    assert "The paper's claims against this run" in report
    assert "fig1_phase_transition.png" in report and "fig1_paper_solver.png" in report
    # the paper's setup by default, each setting with its source
    cfg = res["config"]
    assert (cfg["setup"], cfg["seed"], cfg["rank"], cfg["init"]) == ("paper", 42, 25, "paper")
    assert cfg["margin_floor"] == 1e-4 and cfg["tol"] == 1e-5
    assert "## Setup and where each setting comes from" in report and "paper code (" in report
    # Figure 1's solver as the paper ran it, and the narrow step rule's table
    pt = res["phase_transition"]
    assert pt["paper_fb"]["samples"] == 64 and pt["paper_fb"]["tol"] == 1e-5
    for r, nr in zip(pt["rows"], pt["narrow_rows"], strict=True):
        assert r["paper_fb_samples"] == 64 and r["paper_fb_step"] > 0
        if r["margin_quantized"] <= 0:
            assert r["paper_fb_step"] == 0.01
        assert nr["bits"] == r["bits"] and nr["step"] >= r["step"]  # narrow is coarser
    assert (quick_run / "fig1_paper_solver.png").stat().st_size > 1000


def test_accuracy_noise_level() -> None:
    from monquant.experiments.paper.report import accuracy_noise

    assert accuracy_noise(0.98, 0.98, 10_000) == pytest.approx(1.96 * (2 * 0.98 * 0.02 / 1e4) ** 0.5)
    assert accuracy_noise(0.98, 0.9797, 10_000) > 0.0003  # 3 images of 10,000 is noise


def test_resume_skips_finished_stages(quick_run, mnist_dir, capsys):
    rc = main(
        [
            "reproduce",
            "--quick",
            "--out",
            str(quick_run),
            "--data-dir",
            str(mnist_dir),
            "--no-progress",
            "--resume",
            "--no-download",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("skipped") >= 6
    res = json.loads((quick_run / "results.json").read_text())
    assert set(res["resumed_stages"]) >= {"float", "phase_transition", "displacement"}
    # a resumed invocation's wall time leaves the reused stages out (their stored times stay in
    # the sum), and the report says which were reused
    report = (quick_run / "report.md").read_text()
    assert "Stages reused from an earlier invocation: float" in report
    assert res["wall_seconds_this_invocation"] < res["stage_seconds_sum"]


@pytest.mark.parametrize("executor", ["serial", "process"])
def test_trainings_start_longest_first_on_a_pool(executor, monkeypatch, tmp_path):
    """Serially the float model trains first; on a pool the QAT trainings start first, fewest bits
    first (they take longest), so that the last training to finish is a short one."""
    from monquant.experiments.paper import reproduce as rp
    from monquant.experiments.stages import StageRunner

    seen: list[str] = []
    def record(runner, spec, tasks, data):
        seen.extend(t.name for t in tasks)
        return {}

    monkeypatch.setattr("monquant.experiments.stages.run_task_stages", record)
    cfg = rp.ReproduceConfig(out=tmp_path, qat_bits=(8, 4, 6), extra_seeds=(43, 44), executor=executor)
    rp._independent_trainings(cfg, None, tmp_path, StageRunner(tmp_path, False, None), None)
    if executor == "serial":
        assert seen == ["float", "qat_8", "qat_4", "qat_6", "float_seed_43", "float_seed_44"]
    else:
        assert seen == ["qat_4", "qat_6", "qat_8", "float", "float_seed_43", "float_seed_44"]
