"""Resumable runs: atomic run folders, the stage driver, and a real `mmlens study` killed and resumed.

The folder and driver tests use small stages that compute real tables from seeded generators
(no model); the kill-and-resume test runs the command on the embedded model in subprocesses.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch
import yaml

from mmlens.runs import (
    ConfigError,
    FunctionStage,
    RunFolder,
    RunFolderError,
    StageFigure,
    StageOutput,
    config_from_dict,
    run_study,
)
from mmlens.runs.folder import TEMP_MARK, package_versions

TINY = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24}, "n_boot": 1000}


def tiny_config(**changes):
    data = json.loads(json.dumps(TINY))
    data.update(changes)
    return config_from_dict(data)


# ---------------------------------------------------------------------- toy stages (no model)
def draws_stage(context) -> StageOutput:
    """Seeded random draws through the global generators the driver reseeds per unit."""
    values = np.random.rand(5)
    weights = torch.randn(3, 2)
    figure = go.Figure(go.Scatter(y=values))
    return StageOutput(tables={"draws": pd.DataFrame({"i": range(5), "value": values})},
                       tensors={"weights": {"w": weights}}, data={"info": {"n": 5}},
                       figures={"draws": StageFigure(figure, "one point per draw", table="draws")},
                       summary=[f"mean {values.mean():.3f}"], result=values)


def total_stage(context) -> StageOutput:
    values = context.result("draws")
    return StageOutput(tables={"total": pd.DataFrame({"total": [float(np.sum(values))]})}, summary=["summed"])


def restore_draws(context, stored) -> np.ndarray:
    return stored.tables["draws"]["value"].to_numpy()


def toy_stages() -> dict:
    return {
        "draws": FunctionStage("draws", "Draws", draws_stage, restore_fn=restore_draws, config_sections=("probe",)),
        "total": FunctionStage("total", "Total", total_stage, depends_on=("draws",), config_sections=("knockout",)),
    }


def run_toy(config, out, **kw):
    return run_study(config, out, stages=toy_stages(), progress=False, report=False, echo=lambda text: None, **kw)


# ---------------------------------------------------------------------- folder and driver
def test_outputs_round_trip_through_the_folder(tmp_path):
    config = tiny_config()
    run_toy(config, tmp_path / "run")
    folder = RunFolder.open(tmp_path / "run")
    stored = folder.load("draws/seed-0")
    np.random.seed(0)
    expected = np.random.rand(5)
    np.testing.assert_array_equal(stored.tables["draws"]["value"].to_numpy(), expected)
    torch.manual_seed(0)
    assert torch.equal(stored.tensors["weights"]["w"], torch.randn(3, 2))
    assert stored.data["info"] == {"n": 5}
    assert stored.summary == [f"mean {expected.mean():.3f}"]
    assert list(folder.figure("draws/seed-0", "draws").data[0].y) == pytest.approx(list(expected))
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config_sha256"] == config.sha256()
    assert set(manifest["versions"]) >= {"python", "mmlens", "torch", "transformers", "transformer-lens"}
    assert manifest["stages"]["total/seed-0"]["status"] == "done"


def test_rerun_skips_finished_units_and_restores_dependencies(tmp_path):
    config = tiny_config(seeds=[0, 1])
    first = run_toy(config, tmp_path / "run")
    assert [u.ran for u in first.units] == [True, True, True, True]
    records = {u.unit: (tmp_path / "run" / "stages" / u.unit / "done.json").read_bytes() for u in first.units}

    again = run_toy(config, tmp_path / "run")
    assert [u.ran for u in again.units] == [False, False, False, False]
    assert again.units[0].summary == first.units[0].summary  # same versions: no note
    for unit, record in records.items():
        assert (tmp_path / "run" / "stages" / unit / "done.json").read_bytes() == record

    # Only the dependent stage unfinished: it must get the first stage's result back from disk.
    (tmp_path / "run" / "stages" / "total" / "seed-1" / "done.json").unlink()
    resumed = run_toy(config, tmp_path / "run")
    assert [u.ran for u in resumed.units] == [False, False, False, True]
    folder = RunFolder.open(tmp_path / "run")
    draws = folder.load("draws/seed-1").tables["draws"]["value"].sum()
    assert folder.load("total/seed-1").tables["total"]["total"].iloc[0] == pytest.approx(draws, abs=0)


def test_a_failing_stage_is_recorded_and_rerun_next_time(tmp_path):
    def broken(context):
        raise ValueError("no pairs to knock out")

    stages = toy_stages()
    stages["total"] = FunctionStage("total", "Total", broken, depends_on=("draws",))
    with pytest.raises(ValueError, match="no pairs"):
        run_study(tiny_config(), tmp_path / "run", stages=stages, progress=False, report=False, echo=lambda t: None)
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["total/seed-0"]
    assert entry["status"] == "failed" and entry["error"] == "ValueError: no pairs to knock out"
    again = run_toy(tiny_config(), tmp_path / "run")
    assert [u.ran for u in again.units] == [False, True]
    entry = json.loads((tmp_path / "run" / "manifest.json").read_text())["stages"]["total/seed-0"]
    assert entry["status"] == "done" and entry["attempts"] == 2 and "error" not in entry


def test_a_finished_stage_from_other_package_versions_is_flagged(tmp_path, monkeypatch):
    import mmlens.runs.folder

    # the first run records an older torch (a hand-edited done.json would be refused as damaged)
    monkeypatch.setattr(mmlens.runs.folder, "package_versions", lambda: {**package_versions(), "torch": "1.0.0"})
    run_toy(tiny_config(), tmp_path / "run")
    monkeypatch.undo()
    again = run_toy(tiny_config(), tmp_path / "run")
    # the version the run records is the installed distribution's (a CUDA wheel's metadata may
    # lack the "+cu130" that torch.__version__ carries)
    assert f"note: finished with torch 1.0.0, now {package_versions()['torch']}" in again.units[0].summary


def test_changed_config_is_refused_and_overwrite_starts_afresh(tmp_path):
    run_toy(tiny_config(), tmp_path / "run")
    changed = tiny_config(n_boot=1001)
    with pytest.raises(RunFolderError, match=r"n_boot: 1000 -> 1001.*--rerun draws --rerun total.*--overwrite.*new --out"):
        run_toy(changed, tmp_path / "run")
    # the old results are untouched by the refusal
    assert RunFolder.open(tmp_path / "run").config_sha256 == tiny_config().sha256()
    assert RunFolder.open(tmp_path / "run").is_done("draws/seed-0")
    run_toy(changed, tmp_path / "run", overwrite=True)
    assert RunFolder.open(tmp_path / "run").config_sha256 == changed.sha256()


def test_fixing_one_section_reruns_only_the_stages_that_read_it(tmp_path):
    run_toy(tiny_config(), tmp_path / "run")
    draws = (tmp_path / "run/stages/draws/seed-0/done.json").read_bytes()
    fixed = tiny_config(knockout={"n_pairs": 2})  # read by "total" only
    with pytest.raises(RunFolderError, match=r"knockout.n_pairs: 4 -> 2.*total/seed-0.*--rerun total .*kept: draws/seed-0"):
        run_toy(fixed, tmp_path / "run")
    again = run_toy(fixed, tmp_path / "run", rerun=("total",))
    assert [u.ran for u in again.units] == [False, True]
    assert (tmp_path / "run/stages/draws/seed-0/done.json").read_bytes() == draws
    assert RunFolder.open(tmp_path / "run").config_sha256 == fixed.sha256()
    # A stage that never finished (it failed, say) needs no flag: nothing finished is replaced.
    (tmp_path / "run/stages/total/seed-0/done.json").unlink()
    third = run_toy(tiny_config(knockout={"n_pairs": 3}), tmp_path / "run")
    assert [u.ran for u in third.units] == [False, True]
    # The folder now describes the config it was last run with.
    assert RunFolder.open(tmp_path / "run").manifest["config"]["knockout"]["n_pairs"] == 3


def test_rerun_a_stage_alone_and_its_dependents(tmp_path):
    run_toy(tiny_config(), tmp_path / "run")
    only_total = run_toy(tiny_config(), tmp_path / "run", rerun=("total/seed-0",))
    assert [u.ran for u in only_total.units] == [False, True]
    both = run_toy(tiny_config(), tmp_path / "run", rerun=("draws",))
    assert [u.ran for u in both.units] == [True, True]  # total reads draws' result
    with pytest.raises(ConfigError, match="--rerun drwas: not a stage or unit of this study"):
        run_toy(tiny_config(), tmp_path / "run", rerun=("drwas",))


def test_a_folder_that_is_not_a_run_is_never_overwritten(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="not an mmlens run folder"):
        run_toy(tiny_config(), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_half_written_files_are_never_results(tmp_path):
    config = tiny_config()
    run_toy(config, tmp_path / "run")
    unit_dir = tmp_path / "run" / "stages" / "total" / "seed-0"
    # What a kill mid-stage leaves: the completion record missing, a temporary beside a result.
    (unit_dir / "done.json").unlink()
    (unit_dir / "tables" / f"extra.parquet{TEMP_MARK}999").write_bytes(b"PAR1 half")
    folder = RunFolder.open(tmp_path / "run")
    assert not folder.is_done("total/seed-0")
    with pytest.raises(RunFolderError, match="has not finished"):
        folder.load("total/seed-0")
    rerun = run_toy(config, tmp_path / "run")
    assert [u.ran for u in rerun.units] == [False, True]
    assert not list((tmp_path / "run").rglob(f"*{TEMP_MARK}*"))


def test_a_changed_result_file_is_detected(tmp_path):
    run_toy(tiny_config(), tmp_path / "run")
    table = tmp_path / "run" / "stages" / "draws" / "seed-0" / "tables" / "draws.parquet"
    pd.DataFrame({"i": [0], "value": [0.5]}).to_parquet(table)
    with pytest.raises(RunFolderError, match="missing or changed"):
        RunFolder.open(tmp_path / "run").load("draws/seed-0")


# ---------------------------------------------------------------------- the real command, killed
KILL_CONFIG = {
    "model": "tiny-shapes-llava",
    "batch_size": 16,
    "n_boot": 1000,
    "dataset": {"name": "scenes", "n": 32},
    "probe": {"kind": "ridge", "sites": ["adapter.hook_in", "adapter.hook_out", "blocks.1.hook_resid_post",
                                         "blocks.3.hook_resid_post"], "controls": ["shuffled_labels"]},
    "knockout": {"n_pairs": 2, "n_control": 1},
    "position": {"enabled": False},  # the slowest stage, kept out to stay quick; the machinery is the same
    # runs after the kill, in the resumed process, on the sweep rebuilt from disk
    "recovery": {"corruption": "counterfactual", "n_images": 8, "n_maps": 1, "top_k": 2},
}


def _mmlens(args, env_extra=None, check=True):
    env = dict(os.environ, **(env_extra or {}))
    result = subprocess.run([sys.executable, "-m", "mmlens.cli", *args], capture_output=True, text=True, env=env,
                            timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"mmlens {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def _tables(run: Path) -> dict[str, pd.DataFrame]:
    return {str(p.relative_to(run)): pd.read_parquet(p) for p in sorted(run.glob("stages/*/*/tables/*.parquet"))}


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    config = root / "study.yaml"
    config.write_text(yaml.safe_dump(KILL_CONFIG))
    straight, killed = root / "straight", root / "killed"
    _mmlens(["study", str(config), "--out", str(straight), "--quiet", "--no-report"])
    # SIGKILL during the second file write of the knockout stage: its first table is on disk,
    # the second is a temporary, no completion record.
    crash = _mmlens(["study", str(config), "--out", str(killed), "--quiet", "--no-report"],
                    env_extra={"MMLENS_KILL_AT": "anchor_knockout/seed-0:2"}, check=False)
    after_kill = {
        "returncode": crash.returncode,
        "manifest": json.loads((killed / "manifest.json").read_text()),
        "probe_record": (killed / "stages/probe_sweep/seed-0/done.json").read_bytes(),
        "probe_mtimes": {p: p.stat().st_mtime_ns for p in (killed / "stages/probe_sweep").rglob("*") if p.is_file()},
        "knockout_files": sorted(str(p.relative_to(killed)) for p in (killed / "stages/anchor_knockout").rglob("*")
                                 if p.is_file()),
    }
    resumed = _mmlens(["study", str(config), "--out", str(killed)])
    return straight, killed, after_kill, resumed


def test_killed_run_resumes_without_redoing_finished_work(killed_and_resumed):
    straight, killed, after_kill, resumed = killed_and_resumed
    assert after_kill["returncode"] == -signal.SIGKILL
    assert after_kill["manifest"]["stages"]["anchor_knockout/seed-0"]["status"] == "running"
    files = after_kill["knockout_files"]
    assert len([f for f in files if f.endswith(".parquet")]) == 1, files
    assert any(TEMP_MARK in f for f in files) and not any(f.endswith("done.json") for f in files)

    # The finished probe sweep was neither rerun nor rewritten.
    assert (killed / "stages/probe_sweep/seed-0/done.json").read_bytes() == after_kill["probe_record"]
    assert {p: p.stat().st_mtime_ns for p in after_kill["probe_mtimes"]} == after_kill["probe_mtimes"]
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stages"]["probe_sweep/seed-0"]["attempts"] == 1
    assert manifest["stages"]["anchor_knockout/seed-0"]["attempts"] == 2
    assert all(entry["status"] == "done" for entry in manifest["stages"].values())
    assert "probe_sweep/seed-0: done earlier" in resumed.stdout
    assert "anchor_knockout/seed-0: ran" in resumed.stdout
    assert not list(killed.rglob(f"*{TEMP_MARK}*"))


def test_resumed_results_equal_an_uninterrupted_run(killed_and_resumed):
    straight, killed, _, _ = killed_and_resumed
    expected, got = _tables(straight), _tables(killed)
    assert set(got) == set(expected) and any("anchor_knockout" in k for k in got)
    assert any("recovery_heads" in k for k in got)
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=True, obj=name)
    for name in ("probes", "predictions"):
        a = RunFolder.open(straight).load("probe_sweep/seed-0").tensors[name]
        b = RunFolder.open(killed).load("probe_sweep/seed-0").tensors[name]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_report_is_rebuilt_from_the_run_folder(killed_and_resumed, capsys):
    from mmlens.cli import main

    straight, killed, _, resumed = killed_and_resumed
    report = killed / "report.html"
    assert f"report: {report}" in resumed.stdout
    assert not (straight / "report.html").exists()  # --no-report
    assert main(["report", str(straight)]) == 0
    assert f"report written to {straight / 'report.html'}" in capsys.readouterr().out
    page = (straight / "report.html").read_text()
    for title in ("Drop-off and recovery", "What the probes see", "Anchor knockout: are anchors"):
        assert title in page
    assert KILL_CONFIG["model"] in page and RunFolder.open(straight).config_sha256 in page


def test_sweep_rebuilt_from_disk_equals_the_fitted_one(tmp_path):
    """The probe stage's save/restore on a real sweep: every field later stages read comes back."""
    from mmlens import HookedMLLM
    from mmlens.data import load_segmentation
    from mmlens.probing import probe_sweep
    from mmlens.runs import sweep_from_stored
    from mmlens.runs.probe_stage import sweep_output

    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=16)
    with torch.no_grad():
        sweep = probe_sweep(model, scenes, sites=["adapter.hook_in", "adapter.hook_out", "blocks.3.hook_resid_post"],
                            probe="ridge", control="shuffled_labels", n_boot=1000, progress=False)
    config = tiny_config()
    with RunFolder.create(tmp_path / "run", config, {"probe_sweep/seed-0": "key"}) as folder:
        folder.begin("probe_sweep/seed-0")
        folder.save("probe_sweep/seed-0", sweep_output(sweep), started="now", seconds=0.0)
        back = sweep_from_stored(folder.load("probe_sweep/seed-0"), scenes)
    pd.testing.assert_frame_equal(back.table, sweep.table, check_exact=True)
    pd.testing.assert_frame_equal(back.per_class_iou, sweep.per_class_iou, check_exact=True)
    pd.testing.assert_frame_equal(back.summary(), sweep.summary(), check_exact=True)
    assert back.probes.keys() == sweep.probes.keys()
    for key, probe in sweep.probes.items():
        assert all(torch.equal(getattr(back.probes[key], f), getattr(probe, f)) for f in ("mean", "scale", "weight", "bias"))
        assert torch.equal(back.predictions[key], sweep.predictions[key])
        np.testing.assert_array_equal(back.confusion[key], sweep.confusion[key])
    np.testing.assert_array_equal(back.test_indices, sweep.test_indices)
    np.testing.assert_array_equal(back.test_masks, sweep.test_masks)
    assert back.sites == sweep.sites and back.grids == sweep.grids and back.settings == sweep.settings
    assert back.class_names == sweep.class_names and back.ignore_index == sweep.ignore_index
