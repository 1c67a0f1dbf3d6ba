"""The `mmlens` command: hook listing, config checks, clear errors, the demo (slow)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mmlens import HookedMLLM
from mmlens.cli import main
from mmlens.runs import DEMO_CONFIG, RunFolder, load_config


def test_hooks_lists_every_hook_with_its_shape(capsys):
    assert main(["hooks", "tiny-shapes-llava"]) == 0
    out = capsys.readouterr().out
    shapes = dict(re.findall(r"^  (\S+)\s+(\[[\d, ]+\])$", out, flags=re.M))
    header = re.search(r"(\d+) tokens \((\d+) image tokens\)", out)
    seq, n_image = int(header.group(1)), int(header.group(2))
    assert n_image == 64  # the 8 x 8 token grid of the 64 px model
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    assert set(shapes) == set(model.hook_names())  # every hook fires once attention results are on
    assert shapes["vision.blocks.0.hook_resid_post"] == "[1, 65, 128]"  # 64 patches + CLS
    assert shapes["adapter.hook_out"] == "[1, 64, 128]"
    assert shapes["blocks.3.attn.hook_pattern"] == f"[1, 4, {seq}, {seq}]"
    assert shapes["blocks.0.attn.hook_result"] == f"[1, {seq}, 4, 128]"
    sections = [line for line in out.splitlines() if line.startswith("[")]
    assert [s.split("]")[0] for s in sections] == ["[vision", "[adapter", "[llm"]
    assert out.index("[adapter]") < out.index("  adapter.hook_out") < out.index("[llm]")


def test_unknown_model_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable here; do not wait for it
    assert main(["hooks", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mmlens hooks: error: cannot load 'no-such-model'") and "tiny-shapes-llava" in err
    assert "Traceback" not in err


def test_study_refuses_a_bad_config_before_doing_anything(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": -3},
                                      "probe": {"knd": "ridge"}}))
    assert main(["study", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "2 problem(s)" in err and "dataset.n: must be a positive integer, got -3" in err
    assert "probe.knd: unknown key; did you mean 'kind'?" in err
    assert not (tmp_path / "run").exists()


def test_study_check_prints_the_config_and_its_hash(capsys):
    assert main(["study", str(DEMO_CONFIG), "--check"]) == 0
    out = capsys.readouterr().out
    config = load_config(DEMO_CONFIG)
    assert out.rstrip().endswith(f"# config sha256 {config.sha256()}")
    assert yaml.safe_load(out)["dataset"]["name"] == "scenes"


def test_study_needs_a_run_folder(tmp_path, capsys):
    config = tmp_path / "study.yaml"
    config.write_text(yaml.safe_dump({"model": "tiny-shapes-llava", "dataset": {"name": "scenes"}}))
    assert main(["study", str(config)]) == 2
    assert "pass --out DIR or set `out:`" in capsys.readouterr().err


def test_report_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not an mmlens run folder" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "study", "hooks", "report"):
        assert re.search(rf"^\s+{command}\s+\S", out, flags=re.M), out


QUOTED_STARTS = ("Segmentation improves across the adapter", "Segmentation drops at the adapter", "No drop at the adapter",
                 "No recovery in the LLM", "The LLM recovers", "The trained LLM's gain", "Across the 4 probed LLM layers",
                 "The drop at the adapter reads", "The recovery in the LLM depends", "The recovery in the LLM reads",
                 "The penalty chosen at")


@pytest.mark.slow
def test_demo_runs_every_stage_and_writes_the_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--quiet"]) == 0
    out = capsys.readouterr().out
    folder = RunFolder.open(tmp_path / "demo")
    assert folder.done_units() == ["probe_sweep/seed-0", "anchor_knockout/seed-0", "position_study/seed-0",
                                   "recovery_heads/seed-0"]
    assert f"open {tmp_path / 'demo' / 'report.html'}" in out
    probe_table = folder.load("probe_sweep/seed-0").tables["probe_table"]
    assert set(probe_table.condition) == {"model", "shuffled_labels", "control_task", "random_llm", "random_init", "penalty/10",
                                          "penalty*10"}
    # the findings the README and docs quote are the ones a fresh demo writes, to every digit shown
    found = folder.record("probe_sweep/seed-0")["summary"]
    root = Path(__file__).parent.parent
    for page in ("README.md", "docs/index.md", "docs/probing.md", "docs/statistics.md"):
        quoted = [line[2:] for line in (root / page).read_text().splitlines()
                  if line.startswith("- ") and line[2:].startswith(QUOTED_STARTS)]
        assert quoted, f"{page} quotes no demo finding"
        assert not set(quoted) - set(found), (page, sorted(set(quoted) - set(found)))
    # docs/statistics.md: the control task's and the real task's token accuracy, last vision and last LLM layer
    accuracy = probe_table.set_index(["condition", "site"]).token_accuracy.round(2)
    assert [accuracy[("control_task", "V3")], accuracy[("control_task", "L3")]] == [0.82, 0.76]
    assert [accuracy[("model", "V3")], accuracy[("model", "L3")]] == [0.91, 0.92]


def test_version_flag(capsys):
    import mmlens

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"mmlens {mmlens.__version__}"
