"""Every config under examples/configs is a valid `mmlens study` config, and docs/real_models.md's
configs and numbers hold without the weights.

The schema and the checks between fields run on every file (`load_config`, as `mmlens study
--check` does). Configs for the embedded model also pass the checks that need the model and the
data (`model_problems`). For the 7B configs, whose weights are not here, the dataset slice is read
from a small folder in ADE20K's release layout, and the memory arithmetic on the page is redone.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmlens.data import ADE20K_CLASSES, load_segmentation, segmentation_info
from mmlens.runs import load_config
from mmlens.runs.config_checks import model_problems
from mmlens.zoo import shipped_models

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))
REAL_MODELS_PAGE = ROOT / "docs" / "real_models.md"


def is_shipped(path: Path) -> bool:
    return load_config(path).model in shipped_models()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_the_study_schema(path):
    config = load_config(path)  # raises ConfigError listing every problem
    assert config.out, f"{path.name}: name the run folder (out) so the command in its header works as written"
    assert f"mmlens study examples/configs/{path.name}" in path.read_text(encoding="utf-8"), \
        f"{path.name}: its header should give the command that runs it"


@pytest.mark.parametrize("path", [p for p in CONFIGS if is_shipped(p)], ids=lambda p: p.name)
def test_embedded_model_config_passes_the_model_and_data_checks(path):
    from mmlens import HookedMLLM

    config = load_config(path)
    model = HookedMLLM.from_pretrained(config.model)
    data = config.dataset
    dataset = load_segmentation(data.name, split=data.split, n=data.n, seed=data.seed, image_size=data.image_size)
    assert model_problems(config, model, dataset) == []


def write_ade20k(root: Path, n: int = 3) -> Path:
    """A few images in the layout of the ADEChallengeData2016 release (0 = other, 1..150 = classes)."""
    rng = np.random.default_rng(0)
    for folder in ("images/validation", "annotations/validation"):
        (root / folder).mkdir(parents=True)
    for i in range(1, n + 1):
        stem = f"ADE_val_{i:08d}"
        Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(root / "images/validation" / f"{stem}.jpg")
        annotation = np.zeros((96, 128), dtype=np.uint8)
        annotation[:48] = 1      # wall
        annotation[48:, :64] = 3  # sky; the rest stays 0, "other"
        Image.fromarray(annotation).save(root / "annotations/validation" / f"{stem}.png")
    return root


@pytest.mark.parametrize("path", [p for p in CONFIGS if not is_shipped(p)], ids=lambda p: p.name)
def test_real_model_config_reads_its_ade20k_slice(path, tmp_path):
    config = load_config(path)
    assert (config.dataset.name, config.dataset.split) == ("ade20k", "validation")
    assert Path(config.dataset.path).name == "ADEChallengeData2016"
    data = dataclasses.replace(config.dataset, path=str(write_ade20k(tmp_path / "ADEChallengeData2016")))
    dataset = load_segmentation(data.name, path=data.path, split=data.split, n=None, image_size=data.image_size)
    assert len(dataset) == 3 and segmentation_info(dataset).class_names == ADE20K_CLASSES
    mask = np.asarray(dataset[0]["mask"])
    assert set(np.unique(mask).tolist()) == {0, 2, 255}  # wall and sky shifted down by one; "other" ignored


def test_real_models_page_names_every_real_config():
    text = REAL_MODELS_PAGE.read_text(encoding="utf-8")
    named = set(re.findall(r"examples/configs/([\w.]+\.yaml)", text))
    studies = {p.name for p in CONFIGS if p.name.endswith("_study.yaml") and not is_shipped(p)}
    assert studies <= named, f"configs missing from docs/real_models.md: {studies - named}"
    assert named <= {p.name for p in CONFIGS}, f"docs/real_models.md names configs that do not exist: {named}"
    assert {"llava15_7b_ade20k_study.yaml", "qwen25_vl_7b_ade20k_study.yaml", "gemma3_4b_ade20k_study.yaml"} <= studies


def test_real_models_page_arithmetic_holds():
    """bf16 weights are parameters x 2 bytes; every "a x b x ... = N GB" product is what it says."""
    text = REAL_MODELS_PAGE.read_text(encoding="utf-8")
    rows = re.findall(r"\| ([\d.]+) B \| ([\d.]+) GB \|", text)
    assert len(rows) == 4
    for params, gigabytes in rows:
        assert abs(float(params) * 2 - float(gigabytes)) < 0.051, (params, gigabytes)
    products = re.findall(r"((?:[\d,]+(?:\^2)?\s+x\s+)+[\d,]+(?:\^2)?) = ([\d.]+) GB", text)
    assert len(products) >= 6
    for expression, gigabytes in products:
        value = 1.0
        for factor in re.split(r"\s+x\s+", expression):
            base, _, power = factor.partition("^")
            value *= float(base.replace(",", "")) ** int(power or 1)
        assert abs(value / 1e9 - float(gigabytes)) <= 0.051 * max(1.0, float(gigabytes) / 10), (expression, gigabytes)
