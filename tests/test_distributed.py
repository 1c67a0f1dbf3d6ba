"""Data-parallel studies on torch.distributed: 2 processes (gloo, CPU) against one process.

torchrun starts the ranks, as a researcher would. Batches go to ranks whole, so held-out
predictions are the same computation as in one process and must be equal exactly; ridge
statistics and logistic gradients are all-reduced sums, so probes (and mIoU) must agree within
1e-6. The experiment stages (anchor knockout, position study, recovery heads) gather per-image
results: from one sweep they are the same computation on 2 ranks as in one process, so equal
exactly. torchrun sets OMP_NUM_THREADS=1 in its workers; the single-process side runs on one thread
too, so both sides run the same kernels.
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
import pytest
import torch
import yaml

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.runs import RunFolder, load_config, run_study

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import sweeps  # noqa: E402

HERE = Path(__file__).parent
CONFIG = {
    "model": "tiny-shapes-llava",
    "batch_size": 4,  # 6 training and 2 held-out batches: both ranks take some of each
    "n_boot": 1000,
    "dataset": {"name": "scenes", "n": 32},
    "probe": {"kind": "ridge", "sites": ["adapter.hook_in", "adapter.hook_out", "blocks.1.hook_resid_post",
                                         "blocks.3.hook_resid_post"], "controls": ["shuffled_labels"]},
    "knockout": {"n_pairs": 2, "n_control": 1},
    "position": {"layers": [1, 2]},
    # 8 held-out images in batches of 4: each rank patches one batch
    "recovery": {"n_images": 8, "top_k": 2, "n_maps": 1, "window": [1, 2, 3]},
}


def torchrun(*args: str, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    src = str(Path(__import__("mmlens").__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    # its own session: on a timeout the whole group goes, workers included (not torchrun alone)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    yield
    torch.set_grad_enabled(True)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What the worker computed on 2 ranks (and, for the experiments, on rank 0 alone)."""
    out = tmp_path_factory.mktemp("ranks") / "ranks.pt"
    torchrun(str(HERE / "distributed_worker.py"), str(out))
    return torch.load(out, weights_only=False)


def test_probe_sweeps_on_two_ranks_equal_one_process(ranks, one_thread):
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    single = sweeps(model, load_segmentation("scenes", split="validation", n=24, seed=0))
    for kind, sweep in single.items():
        got = ranks[kind]
        assert (got["test_indices"] == sweep.test_indices).all()
        for key, probe in sweep.probes.items():
            for name in ("mean", "scale", "weight", "bias"):
                torch.testing.assert_close(getattr(got["probes"][key], name), getattr(probe, name), atol=1e-6, rtol=0)
        pd.testing.assert_frame_equal(got["table"], sweep.table, check_exact=False, atol=1e-6, rtol=0, obj=kind)
        if kind == "ridge":  # probes equal to 1e-7 and a held-out forward that is the same computation
            for key, predictions in sweep.predictions.items():
                assert torch.equal(got["predictions"][key], predictions), key


def test_experiments_on_two_ranks_equal_one_process(ranks):
    """Knockout, position study and recovery heads with the process group against the same
    functions in one process from the same sweep: per-image results and every table exactly."""
    shared, alone = ranks["experiments"], ranks["experiments_alone"]
    for study, found in shared.items():
        for name, table in found["tables"].items():
            pd.testing.assert_frame_equal(table, alone[study]["tables"][name], check_exact=True, obj=f"{study} {name}")
        for name, values in found.get("per_image", {}).items():
            np.testing.assert_array_equal(values, alone[study]["per_image"][name], err_msg=f"{study} {name}")
    assert shared["knockout"]["numbers"] == alone["knockout"]["numbers"]
    assert shared["heads"]["summary"] == alone["heads"]["summary"]
    maps, expected = shared["heads"]["maps"], alone["heads"]["maps"]
    assert [m[:3] for m in maps] == [m[:3] for m in expected] and len(maps) == 2
    for (*_, attention), (*_, reference) in zip(maps, expected):
        assert attention.keys() == reference.keys() and all(np.array_equal(attention[l], reference[l]) for l in attention)


def test_a_killed_two_process_study_resumes_and_equals_one_process(tmp_path, one_thread):
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(CONFIG))
    single = run_study(load_config(config_path), tmp_path / "single", progress=False, report=False, echo=lambda _: None)
    killed = tmp_path / "killed"
    crash = torchrun("-m", "mmlens", "study", str(config_path), "--out", str(killed), "--quiet", "--no-report",
                     env_extra={"MMLENS_KILL_AT": "anchor_knockout/seed-0:2"}, check=False)
    assert crash.returncode != 0
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["stages"]["probe_sweep/seed-0"]["status"] == "done"
    assert manifest["stages"]["anchor_knockout/seed-0"]["status"] == "running"
    # rank 0 alone wrote the folder: no rank-suffixed or second copy of anything
    assert not [p for p in killed.rglob("*") if "rank1" in p.name]
    # resumed: rank 1 rebuilds the sweep from what rank 0 read back, and the three experiment
    # stages share their images over both ranks
    resumed = torchrun("-m", "mmlens", "study", str(config_path), "--out", str(killed), "--no-report")
    assert "probe_sweep/seed-0: done earlier" in resumed.stdout
    experiments = ("anchor_knockout", "position_study", "recovery_heads")
    assert all(f"{stage}/seed-0: ran" in resumed.stdout for stage in experiments)
    records = RunFolder.open(killed)
    assert all(records.record(f"{stage}/seed-0")["processes"] == 2 for stage in ("probe_sweep", *experiments))
    tables = {run: {str(p.relative_to(run)): pd.read_parquet(p) for p in sorted(run.glob("stages/*/*/tables/*.parquet"))}
              for run in (single.folder.path, killed)}
    expected, got = tables[single.folder.path], tables[killed]
    assert set(got) == set(expected)
    assert all(any(stage in name for name in got) for stage in experiments)
    for name in expected:
        pd.testing.assert_frame_equal(got[name], expected[name], check_exact=False, atol=1e-6, rtol=0, obj=name)
    a = RunFolder.open(single.folder.path).load("probe_sweep/seed-0").tensors["predictions"]
    b = RunFolder.open(killed).load("probe_sweep/seed-0").tensors["predictions"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quick_collectives_time_out_and_waits_for_rank_0_do_not(tmp_path):
    """`collective_timeout_s` bounds collectives between ranks working in step (a lost rank is
    reported in seconds, not 12 hours); the wait while rank 0 works alone has its own long limit."""
    torchrun(str(HERE / "distributed_waits_worker.py"), str(tmp_path), check=False)
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["wait_for_main"] == "passed" and rank1["wait_for_main_seconds"] > 3  # 4 s, past the 2 s limit
    assert rank1["barrier"].startswith("failed") and rank1["barrier_seconds"] < 3.5


def test_a_killed_rank_leaves_its_logistic_store_and_the_resumed_run_removes_it(tmp_path, one_thread):
    config = {"model": "tiny-shapes-llava", "batch_size": 4, "n_boot": 1000, "dataset": {"name": "scenes", "n": 16},
              "probe": {"kind": "logistic", "sites": ["adapter.hook_out"], "controls": [], "l2": 1e-3,
                        "max_iter": 10, "sensitivity": False, "store_dir": str(tmp_path / "stores")},
              "knockout": {"enabled": False}, "position": {"enabled": False}, "recovery": {"enabled": False}}
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    # rank 1 is SIGKILLed after its first append: its store stays; torchrun then stops rank 0,
    # whose store goes with it (SIGTERM or the broken collective, both through Python's cleanup)
    crash = torchrun("-m", "mmlens", "study", str(config_path), "--out", str(run), "--quiet", "--no-report",
                     env_extra={"MMLENS_KILL_STORE_AT": "1:1"}, check=False)
    assert crash.returncode != 0
    left = sorted(p.relative_to(tmp_path / "stores") for p in (tmp_path / "stores").rglob("*") if p.is_file())
    assert left and all(p.parts[0].startswith("mmlens-run-") and p.parts[1] == "rank-1" for p in left), left
    resumed = run_study(load_config(config_path), run, progress=False, report=False, echo=lambda _: None)
    assert [u.ran for u in resumed.units] == [True]
    assert not [p for p in (tmp_path / "stores").rglob("*") if p.is_file()]
    assert not (run / "scratch").exists()
