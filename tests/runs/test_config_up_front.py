"""Every config error is reported before the first stage, as one list naming each key.

`BAD_VALUES` holds a bad value for every key the schema accepts (a test fails when a key is added
without one). Values the schema can judge alone are refused by `config_from_dict`; the rest
(hooks, layers, classes, devices, folders) are refused by `run_study` after the model loads and
before any stage folder exists. Those runs use stages that fail the test if they ever run, and
every model-dependent value goes into one config, so the embedded model loads once.
"""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

from mmlens.cli import main
from mmlens.errors import ConfigError
from mmlens.runs import StudyConfig, config_from_dict, load_config, run_study
from mmlens.runs.stages import STAGES

MINIMAL = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 24}}
# every site the model-dependent values below name, so the schema's own "must be one of probe.sites"
# passes and the checks against the model are what refuses them
PROBED = ["adapter.hook_out", "blocks.3.hook_resid_post", "vision.blocks.0.hook_resid_post",
          "vision.blocks.1.hook_resid_post", "blocks.9.hook_resid_post"]
MACHINE = "machine"  # refused by the checks of this machine (devices, folders), before the model loads
MODEL = "model"  # refused by the checks against the loaded model and dataset

BAD_VALUES = {  # key -> (bad value, who refuses it: None for the schema)
    "model": (3, None),
    "dataset.name": ("imagenet", None),
    "dataset.path": ("/data/scenes", None),
    "dataset.split": ("vall", None),
    "dataset.n": (0, None),
    "dataset.image_size": (8, None),
    "dataset.seed": (-1, None),
    "device": ("gpu", MACHINE),
    "dtype": ("float8", None),
    "device_map": ("everywhere", None),
    "seeds": ([2**64], None),
    "batch_size": (0, None),
    "prompt": (7, None),
    "n_boot": (10**9, None),
    "probe.sites": (PROBED, MODEL),
    "probe.kind": ("lasso", None),
    "probe.controls": (["random"], None),
    "probe.test_fraction": (float("nan"), None),
    "probe.alpha": (float("inf"), None),
    "probe.l2": (-1.0, None),
    "probe.alphas": ([1.0, float("inf")], None),
    "probe.l2s": ([], None),
    "probe.cv_folds": (30, MODEL),
    "probe.recovery_layer": (9, MODEL),
    "probe.sensitivity": ("yes", None),
    "probe.max_iter": (0, None),
    "probe.min_valid_fraction": (1.5, None),
    "probe.max_train_tokens_per_image": (-5, None),
    "probe.logistic_memory_mb": (float("inf"), None),
    "probe.stats_device": ("gpu0", MACHINE),
    "probe.store_dir": ("<a file>", MACHINE),
    "knockout.enabled": ("no", None),
    "knockout.reference": ("blocks.3.hook_resid_post", MODEL),  # the last layer: nothing after it to knock out
    "knockout.layers": ([], None),
    "knockout.n_pairs": (0, None),
    "knockout.n_control": (-1, None),
    "position.enabled": (1, None),
    "position.layers": ([-1], None),
    "position.early_fraction": (0.75, None),
    "position.exclude": (["backgroud"], MODEL),
    "recovery.enabled": (None, None),
    "recovery.corruption": ("noise", None),
    "recovery.reference": ("vision.blocks.0.hook_resid_post", MODEL),
    "recovery.readout": ("vision.blocks.1.hook_resid_post", MODEL),
    "recovery.window": ([99], MODEL),
    "recovery.tokens": ("some", None),
    "recovery.hook": ("q", None),
    "recovery.n_images": (3, None),
    "recovery.top_k": (0, None),
    "recovery.attribution": ("sometimes", None),
    "recovery.n_maps": (-1, None),
    "recovery.chunk_size": (0, None),
    "sae.enabled": ("no", None),
    "sae.hook": ("adapter.hook_nope", MODEL),
    "sae.path": ("/no/such/sae", MACHINE),
    "sae.architecture": ("relu6", None),
    "sae.d_sae": (0, None),
    "sae.k": (0, None),
    "sae.steps": (0, None),
    "sae.lr": (-1.0, None),
    "sae.n_features": (0, None),
    "sae.n_images": (0, None),
    "sae.n_crops": (0, None),
    "lens.enabled": ("no", None),
    "lens.n_images": (0, None),
    "lens.tuned": ("no", None),
    "collective_timeout_s": (float("inf"), None),
    "out": (5, None),
}


def schema_keys(cls: type = StudyConfig, path: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{path}.{f.name}" if path else f.name
        keys += schema_keys(hints[f.name], key) if dataclasses.is_dataclass(hints[f.name]) else [key]
    return keys


def with_values(values: dict[str, object], base: dict | None = None) -> dict:
    data = yaml.safe_load(yaml.safe_dump(base or MINIMAL))  # a deep copy
    for key, value in values.items():
        *sections, name = key.split(".")
        where = data
        for section in sections:
            where = where.setdefault(section, {})
        where[name] = value
    return data


def names(problems: list[str], key: str) -> bool:
    return any(p.startswith((f"{key}:", f"{key}[")) for p in problems)


def guarded_stages() -> dict:
    """The real stages (names, dependencies, enabled rules), each failing the test if it runs."""
    def ran(context):
        raise AssertionError(f"stage {context.stage.name} ran: a config check let a bad value through")

    return {name: dataclasses.replace(stage, run_fn=ran) for name, stage in STAGES.items()}


def refused_before_any_stage(data: dict, out) -> list[str]:
    config = config_from_dict(data)  # valid on paper: the schema alone cannot judge these values
    with pytest.raises(ConfigError) as caught:
        run_study(config, out, stages=guarded_stages(), progress=False, report=False, echo=lambda text: None)
    assert not (out / "stages").exists()
    return caught.value.problems


def test_every_schema_key_has_a_bad_value():
    assert sorted(BAD_VALUES) == sorted(schema_keys())


@pytest.mark.parametrize("key", [k for k, (_, by) in BAD_VALUES.items() if by is None])
def test_the_schema_refuses_a_bad_value_of(key):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(with_values({key: BAD_VALUES[key][0]}))
    assert names(caught.value.problems, key), caught.value.problems


def test_values_this_machine_cannot_serve_are_listed_before_the_model_loads(tmp_path):
    store_file = tmp_path / "store"
    store_file.write_text("not a folder")
    keys = [k for k, (_, by) in BAD_VALUES.items() if by == MACHINE]
    values = {k: str(store_file) if k == "probe.store_dir" else BAD_VALUES[k][0] for k in keys}
    problems = refused_before_any_stage(with_values({**values, "sae.enabled": True}), tmp_path / "run")
    assert [k for k in keys if not names(problems, k)] == [], problems


def test_values_the_model_and_dataset_refuse_are_one_list_before_stage_one(tmp_path):
    keys = [k for k, (_, by) in BAD_VALUES.items() if by == MODEL]
    # the SAE section is checked only when it is on
    problems = refused_before_any_stage(with_values({**{k: BAD_VALUES[k][0] for k in keys}, "sae.enabled": True}),
                                        tmp_path / "run")
    assert [k for k in keys if not names(problems, k)] == [], problems
    text = "\n".join(problems)
    assert "no LLM layer comes after 'blocks.3.hook_resid_post'" in text
    assert "'backgroud' is not a class of this dataset; did you mean 'background'?" in text
    assert "recovery.readout: 'vision.blocks.1.hook_resid_post' is a vision site" in text


@pytest.mark.parametrize(("text", "expected"), [
    ("probe: {kind: ridge}\nprobe: {sites: all}\n", "probe: given twice (lines 3 and 4)"),
    ("probe:\n  kind: ridge\n  kind: logistic\n", "probe.kind: given twice (lines 4 and 5)"),
    ("seeds: [0]\nprobe:\n  controls:\n    - {a: 1, a: 2}\n", "probe.controls[0].a: given twice (lines 6 and 6)"),
])
def test_a_repeated_yaml_key_is_refused_with_its_path_and_lines(tmp_path, text, expected):
    path = tmp_path / "study.yaml"
    path.write_text("model: tiny-shapes-llava\ndataset: {name: scenes}\n" + text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert [p for p in caught.value.problems if p.startswith(expected)], caught.value.problems


def test_mmlens_study_reports_a_repeated_key_as_an_error_not_a_merge(tmp_path, capsys):
    path = tmp_path / "study.yaml"
    path.write_text("model: tiny-shapes-llava\ndataset: {name: scenes}\nprobe: {kind: ridge}\nprobe: {sites: all}\n")
    assert main(["study", str(path), "--check"]) == 2
    assert "probe: given twice (lines 3 and 4)" in capsys.readouterr().err


def test_merge_keys_and_aliases_are_not_repeats(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text("model: tiny-shapes-llava\ndataset: {name: scenes}\nknockout: &ko {n_pairs: 2}\n"
                    "position: {<<: {enabled: false}, enabled: true}\n")
    config = load_config(path)
    assert config.knockout.n_pairs == 2 and config.position.enabled is True
