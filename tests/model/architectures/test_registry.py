"""The registry is the one list of families, and each registered family is whole: its folder, its
tiny builder, its test file, its tables of module paths and bridge aliases; no two classes of the
architectures package share a name."""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest
import transformers
from torch import nn

import mmlens
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures import ARCHITECTURES, FAMILIES, NOT_YET_SUPPORTED, architecture_for, family_folder
from mmlens.model.architectures.bridge_aliases import BridgeAlias
from mmlens.model.architectures.module_paths import ModulePaths

SRC = Path(mmlens.__file__).parent
ARCHITECTURES_DIR = SRC / "model" / "architectures"
TESTS = Path(__file__).parent


def test_every_registered_family_has_its_folder_builder_and_test_file():
    for family in FAMILIES:
        folder = family_folder(family)
        assert (ARCHITECTURES_DIR / folder / "family.py").is_file(), f"{family.__name__}: architectures/{folder}/family.py"
        assert (SRC / "testing" / "families" / f"{folder}.py").is_file(), f"{family.__name__}: testing/families/{folder}.py"
        assert (TESTS / f"test_{folder}.py").is_file(), f"{family.__name__}: tests/model/architectures/test_{folder}.py"
    assert set(ARCHITECTURES.values()) == set(FAMILIES)


def test_every_family_declares_its_tables():
    for family in FAMILIES:
        assert isinstance(getattr(family, "module_paths", None), ModulePaths), f"{family.__name__}: no module_paths table"
        assert all(isinstance(entry, BridgeAlias) for entry in family.bridge_aliases), family.__name__


def test_every_family_folder_is_registered():
    folders = {p.name for p in ARCHITECTURES_DIR.iterdir() if (p / "family.py").is_file()}
    assert folders == {family_folder(f) for f in FAMILIES}, "a family folder without an entry in FAMILIES"


def test_class_names_are_unique_across_the_architectures_package():
    names = Counter(
        node.name
        for path in ARCHITECTURES_DIR.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
    )
    assert not [name for name, n in names.items() if n > 1], f"classes defined twice: {[n for n, c in names.items() if c > 1]}"


def test_classes_not_built_yet_are_refused_with_what_they_need():
    for name, reason in NOT_YET_SUPPORTED.items():
        assert hasattr(transformers, name), f"{name} is not a transformers class"
        assert name not in ARCHITECTURES, f"{name} is registered and listed as not supported"
        stand_in = type(name, (nn.Module,), {})()  # the registry reads only the class name
        with pytest.raises(UnsupportedModelError, match="supported: ") as refusal:
            architecture_for(stand_in)
        assert reason in str(refusal.value)


def test_docs_list_every_class_not_built_yet():
    models = (Path(mmlens.__file__).parents[2] / "docs" / "models.md").read_text(encoding="utf-8")
    section = models[models.index("### Not built yet"):]
    section = section[:section.index("\n### ")]
    for name in NOT_YET_SUPPORTED:
        assert f"`{name}`" in section, f"docs/models.md 'Not built yet' does not list {name}"
