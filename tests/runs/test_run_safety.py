"""Run folders are never written by two processes, never fail late on a config value the model
could have refused up front, and never render a file that changed after its stage finished."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from mmlens.cli import main
from mmlens.errors import RunFolderError
from mmlens.runs import RunFolder

from test_runs import run_toy, tiny_config, toy_stages  # noqa: F401  (the toy stages: real tables, no model)

HOLD_LOCK = """
import sys, time
from mmlens.runs import RunFolder, config_from_dict
config = config_from_dict({"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24}})
folder = RunFolder.create(sys.argv[1], config, {"x/seed-0": "k"})
print("locked", flush=True)
time.sleep(600)
"""


def _study(args, **kw):
    return subprocess.run([sys.executable, "-m", "mmlens.cli", "study", *args, "--quiet", "--no-report"],
                          capture_output=True, text=True, timeout=600, **kw)


def test_a_second_process_is_refused_and_a_killed_holder_releases_the_folder(tmp_path):
    run, config = tmp_path / "run", tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24},
                                      "probe": {"kind": "ridge", "sites": ["adapter.hook_out"], "controls": []},
                                      "knockout": {"enabled": False}, "position": {"enabled": False},
                                      "recovery": {"enabled": False}}))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        manifest = (run / "manifest.json").read_bytes()
        second = _study([str(config), "--out", str(run), "--overwrite"])
        assert second.returncode == 2, second.stderr
        assert f"in use by another mmlens process (pid {holder.pid}" in second.stderr
        assert (run / "manifest.json").read_bytes() == manifest  # --overwrite deleted nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel dropped the dead holder's lock: the next run goes ahead.
    third = _study([str(config), "--out", str(run), "--overwrite"])
    assert third.returncode == 0, third.stderr
    assert RunFolder.open(run).is_done("probe_sweep/seed-0")


def test_the_lock_is_released_when_a_run_ends_or_fails(tmp_path):
    run_toy(tiny_config(), tmp_path / "run")
    run_toy(tiny_config(), tmp_path / "run")  # would be refused if the first run kept the lock
    with pytest.raises(RunFolderError, match="another config"):
        run_toy(tiny_config(n_boot=1001), tmp_path / "run")
    run_toy(tiny_config(), tmp_path / "run")


@pytest.mark.parametrize("change, message", [
    ({"knockout": {"layers": [99]}}, r"knockout.layers: layer\(s\) \[99\] do not exist; tiny-shapes-llava's LLM has layers 0..3"),
    ({"recovery": {"window": [1, 42]}}, r"recovery.window: layer\(s\) \[42\] do not exist"),
    ({"dataset": {"name": "scenes", "n": 3}}, r"dataset.n: the dataset has 3 images; .*each side needs at least 2"),
    ({"probe": {"sites": ["adapter.hook_outt", "adapter.hook_out"]}}, r"probe.sites\[0\]: 'adapter.hook_outt' is not a hook .*adapter.hook_out"),
    ({"device": "cuda:7"}, r"device: 'cuda:7'"),
])
def test_model_dependent_config_values_are_refused_before_any_stage(tmp_path, capsys, change, message):
    data = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24}, **change}
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump(data))
    assert main(["study", str(config), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not list((tmp_path / "run").glob("stages/*/*/done.json"))  # nothing ran, nothing to redo


def test_recovery_needs_four_images_by_the_schema():
    from mmlens.errors import ConfigError
    from mmlens.runs import config_from_dict

    with pytest.raises(ConfigError, match=r"recovery.n_images: must be at least 4 \(2 images choose the heads"):
        config_from_dict({"model": "m", "dataset": {"name": "scenes"}, "recovery": {"n_images": 3}})


def _toy_run_with_report(tmp_path):
    from mmlens.runs import run_study

    run_study(tiny_config(), tmp_path / "run", stages=toy_stages(), progress=False, echo=lambda t: None)
    return tmp_path / "run"


@pytest.mark.parametrize("damaged", ["stages/draws/seed-0/tables/draws.parquet", "stages/draws/seed-0/figures/draws.json"])
def test_report_refuses_a_file_changed_after_its_stage_and_names_the_rerun(tmp_path, capsys, damaged):
    run = _toy_run_with_report(tmp_path)
    assert main(["report", str(run)]) == 0
    target = run / damaged
    if target.suffix == ".parquet":
        pd.DataFrame({"i": [0], "value": [123.0]}).to_parquet(target)
    else:
        target.write_text(target.read_text().replace("one point", "one point"))
        figure = json.loads(target.read_text())
        figure["data"][0]["y"] = [1, 2, 3]
        target.write_text(json.dumps(figure))
    capsys.readouterr()
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{target} is missing or changed" in err
    assert f"--out {run} --rerun draws" in err


def test_a_damaged_completion_record_is_named_with_its_remedy(tmp_path, capsys):
    run = _toy_run_with_report(tmp_path)
    (run / "stages/total/seed-0/done.json").write_text("{not json")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert "done.json is damaged" in err and "--rerun total" in err and "Traceback" not in err
    # the remedy works: rerunning that stage alone repairs the folder and keeps the rest
    again = run_toy(tiny_config(), run, rerun=("total",))
    assert [u.ran for u in again.units] == [False, True]
    assert main(["report", str(run)]) == 0
