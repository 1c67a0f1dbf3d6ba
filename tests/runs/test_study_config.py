"""The study config: every problem reported at once with its key path, and a stable hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from mmlens.runs import DEMO_CONFIG, ConfigError, StudyConfig, config_from_dict, load_config
from mmlens.runs.config import schema_lines

EXAMPLES = Path(__file__).parents[2] / "examples" / "configs"
MINIMAL = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes"}}


def problems_of(data) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.problems


def test_every_problem_is_listed_with_its_key_path():
    problems = problems_of({
        "model": "tiny-shapes-llava",
        "dataset": {"name": "scenes", "n": -3, "imge_size": 64},
        "dtype": "float33",
        "seeds": [0, "one"],
        "probe": {"kind": "lasso", "test_fraction": 1.5, "controls": ["shuffled"]},
        "knockout": {"n_pairs": 0, "layers": [-1]},
        "batchsize": 8,
    })
    assert problems == [
        "batchsize: unknown key; did you mean 'batch_size'?",
        "dataset.imge_size: unknown key; did you mean 'image_size'?",
        "dataset.n: must be a positive integer, got -3",
        "dtype: must be one of 'float32', 'float16', 'bfloat16', got 'float33' (did you mean 'float32'?)",
        "seeds[1]: must be an integer, got 'one'",
        "probe.kind: must be one of 'ridge', 'logistic', 'sparse', got 'lasso'",
        "probe.controls[0]: must be one of 'shuffled_labels', 'control_task', 'random_llm', 'random_init', got 'shuffled' "
        "(did you mean 'shuffled_labels'?)",
        "probe.test_fraction: must be strictly between 0 and 1, got 1.5",
        "knockout.layers: item 0 must be zero or more, got -1",
        "knockout.n_pairs: must be a positive integer, got 0",
    ]


def test_the_error_message_counts_and_names_the_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": "many"}}))
    with pytest.raises(ConfigError, match=r"1 problem\(s\) in .*study.yaml:\n  - dataset.n: must be an integer, got 'many'"):
        load_config(path)


@pytest.mark.parametrize(("data", "expected"), [
    (None, "the config is empty"),
    ([1, 2], "the config: must be a mapping"),
    ({"dataset": {"name": "scenes"}}, "model: required, missing"),
    ({"model": "m"}, "dataset: required, missing"),
    ({"model": "m", "dataset": {"name": "imagenet"}}, "dataset.name: must be one of 'scenes', 'ade20k'"),
    ({"model": "m", "dataset": {"name": "ade20k"}}, "dataset.path: 'ade20k' is read from a folder"),
    ({"model": "m", "dataset": {"name": "scenes", "path": "/x"}}, "dataset.path: 'scenes' is generated"),
    ({**MINIMAL, "seeds": []}, "seeds: must not be empty"),
    ({**MINIMAL, "seeds": [1, 1]}, "seeds: must not repeat"),
    ({**MINIMAL, "knockout": {"enabled": "yes"}}, "knockout.enabled: must be true or false, got 'yes'"),
    ({**MINIMAL, "probe": {"sites": "vision"}}, "knockout.enabled: this stage reads the sweep's LLM probes"),
    ({**MINIMAL, "probe": {"sites": ["blocks.3.hook_resid_post"]}}, "knockout.reference: 'adapter.hook_out' must be"),
    ({**MINIMAL, "probe": {"sites": ["adapter.hook_out"]}, "recovery": {"readout": "blocks.3.hook_resid_post"}},
     "recovery.readout: 'blocks.3.hook_resid_post' must be one of probe.sites"),
    ({**MINIMAL, "recovery": {"corruption": "noise"}}, "recovery.corruption: must be one of 'recovery_blocked'"),
    ({**MINIMAL, "probe": {"sites": 3}}, "probe.sites: must be a string or a list of strings, got 3"),
    ({**MINIMAL, "position": "on"}, "position: must be a mapping"),
    ({**MINIMAL, "batch_size": True}, "batch_size: must be an integer, got True"),
])
def test_bad_configs_are_refused_with_a_clear_reason(data, expected):
    problems = problems_of(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_defaults_fill_in_and_the_hash_ignores_key_order_and_out():
    config = config_from_dict(MINIMAL)
    assert config.probe.controls == ["shuffled_labels", "control_task", "random_llm", "random_init"] and config.seeds == [0]
    assert (config.probe.kind, config.probe.alpha, config.probe.recovery_layer, config.n_boot) == ("ridge", "cv", "last", 2000)
    spelled_out = config_from_dict({"dataset": {"n": 200, "name": "scenes"}, "model": "tiny-shapes-llava",
                                    "probe": {"kind": "ridge"}, "out": "elsewhere"})
    assert spelled_out.sha256() == config.sha256()
    assert config_from_dict({**MINIMAL, "n_boot": 2001}).sha256() != config.sha256()
    assert config_from_dict({**MINIMAL, "probe": {"alpha": 0.02}}).sha256() != config.sha256()
    assert len(config.sha256()) == 64 and '"dataset":{"image_size":null' in config.canonical_json()


def test_a_config_survives_its_own_yaml(tmp_path):
    config = config_from_dict({**MINIMAL, "seeds": [0, 3], "probe": {"sites": ["adapter.hook_out"]},
                               "knockout": {"enabled": False}, "position": {"exclude": ["background", 2]}})
    path = tmp_path / "again.yaml"
    path.write_text(config.to_yaml())
    again = load_config(path)
    assert again == config and isinstance(again, StudyConfig)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*_study.yaml")) + [DEMO_CONFIG], ids=lambda p: p.name)
def test_shipped_study_configs_are_valid(path):
    config = load_config(path)
    assert config.out and config.model


def test_schema_lines_document_every_setting():
    lines = schema_lines()
    keys = [line.split(":")[0] for line in lines]
    assert "dataset.n" in keys and "probe.controls" in keys and "knockout.n_control" in keys
    assert 'seeds: a list of integers, default [0]' in "\n".join(lines)


def test_docs_list_every_setting():
    documented = (Path(__file__).parents[2] / "docs" / "cli.md").read_text()
    missing = [line.split(":")[0] for line in schema_lines() if f"| `{line.split(':')[0]}` |" not in documented]
    assert not missing, f"docs/cli.md lacks {missing}"


def test_an_llm_only_sweep_cannot_serve_an_adapter_reference():
    from mmlens.runs import ConfigError
    from mmlens.runs.config import config_from_dict

    with pytest.raises(ConfigError, match="knockout.reference: 'adapter.hook_out' is not probed when probe.sites is 'llm'"):
        config_from_dict({"model": "tiny-shapes-llava", "dataset": {"name": "scenes"}, "probe": {"sites": "llm"}})
    config_from_dict({"model": "tiny-shapes-llava", "dataset": {"name": "scenes"}, "probe": {"sites": "llm"},
                      "knockout": {"reference": "blocks.0.hook_resid_post"},
                      "recovery": {"reference": "blocks.0.hook_resid_post"}})


# ----------------------------------------------------------------- sae.path, checked before any stage
@pytest.fixture(scope="module")
def tiny_setup():
    from mmlens import HookedMLLM
    from mmlens.data import load_segmentation

    return HookedMLLM.from_pretrained("tiny-shapes-llava"), load_segmentation("scenes", n=24)


def _saved_sae(folder: Path, hook: str, d_in: int, seed: int = 0) -> str:
    import torch

    from mmlens.sae import SAE, SAEConfig

    torch.manual_seed(seed)
    SAE(SAEConfig("standard", d_in, 16, metadata={"hook_name": hook})).save(folder)
    return str(folder)


def _sae_config(path: str, hook: str = "adapter.hook_out"):
    return config_from_dict({**MINIMAL, "dataset": {"name": "scenes", "n": 24},
                             "sae": {"enabled": True, "hook": hook, "path": path}})


def test_a_missing_sae_path_stops_the_study_before_its_first_stage(tmp_path):
    from mmlens.runs import run_study
    from mmlens.runs.config_checks import device_problems

    config = _sae_config(str(tmp_path / "no_sae_here"))
    assert any(p.startswith("sae.path:") and "does not exist" in p for p in device_problems(config))
    with pytest.raises(ConfigError, match="sae.path"):
        run_study(config, tmp_path / "run", progress=False, report=False, echo=lambda text: None)
    assert not (tmp_path / "run" / "stages").exists()  # no probe sweep ran first


def test_a_relative_sae_path_is_read_from_the_working_directory_like_dataset_path(tmp_path, monkeypatch, tiny_setup):
    from mmlens.runs.config_checks import device_problems

    _saved_sae(tmp_path / "sae", "adapter.hook_out", tiny_setup[0].cfg.llm.d_model)
    monkeypatch.chdir(tmp_path)
    assert device_problems(_sae_config("sae")) == []


def test_the_sae_at_sae_path_must_read_sae_hook_at_its_width(tmp_path, tiny_setup):
    from mmlens.runs.config_checks import model_problems

    model, scenes = tiny_setup
    width = model.cfg.llm.d_model
    good = _saved_sae(tmp_path / "good", "adapter.hook_out", width)
    assert [p for p in model_problems(_sae_config(good), model, scenes) if p.startswith("sae")] == []
    elsewhere = _saved_sae(tmp_path / "elsewhere", "blocks.0.hook_resid_post", width)
    assert any("set sae.hook: blocks.0.hook_resid_post" in p for p in model_problems(_sae_config(elsewhere), model, scenes))
    narrow = _saved_sae(tmp_path / "narrow", "adapter.hook_out", width - 1)
    assert any(f"reads {width - 1} dimensions" in p for p in model_problems(_sae_config(narrow), model, scenes))


def test_replacing_the_sae_file_reruns_the_sae_stage(tmp_path, tiny_setup):
    import os

    from mmlens.runs import STAGES
    from mmlens.runs.stages import planned_units, unit_keys

    path = _saved_sae(tmp_path / "sae", "adapter.hook_out", tiny_setup[0].cfg.llm.d_model, seed=0)
    config = _sae_config(path)
    before = unit_keys(config, planned_units(config, STAGES))
    _saved_sae(tmp_path / "sae", "adapter.hook_out", tiny_setup[0].cfg.llm.d_model, seed=1)  # same path, other weights
    weights = Path(path) / "sae_weights.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    after = unit_keys(config, planned_units(config, STAGES))
    assert after["sae_features/seed-0"] != before["sae_features/seed-0"]
    assert after["probe_sweep/seed-0"] == before["probe_sweep/seed-0"]
