"""Every row of docs/tl_compat.md runs as written: "works" rows run, "not applicable" rows raise
an error that says why, and the page's counts match its rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

PAGE = Path(__file__).resolve().parents[1] / "docs" / "tl_compat.md"
ROW = re.compile(r"^\| (\d+) \| `(.+)` \| (works|works with a difference|not applicable) \|(.*)\|$")


def rows() -> list[tuple[int, str, str]]:
    found = [ROW.match(line) for line in PAGE.read_text().splitlines()]
    return [(int(m[1]), m[2], m[3]) for m in found if m]


def setting() -> str:
    return PAGE.read_text().split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def namespace():
    scope: dict = {}
    with torch.no_grad():
        exec(setting(), scope)
    return scope


def test_rows_are_numbered_and_counted():
    table = rows()
    assert [n for n, _, _ in table] == list(range(1, len(table) + 1))
    statuses = [s for _, _, s in table]
    counts = (len(table), statuses.count("works"), statuses.count("works with a difference"), statuses.count("not applicable"))
    text = PAGE.read_text()
    assert f"Of the {counts[0]} rows, {counts[1]} work, {counts[2]} work with a stated difference and {counts[3]} are" in text
    assert counts[1] + counts[2] >= 44


@pytest.mark.parametrize("number,code,status", rows(), ids=[f"row{n}" for n, _, _ in rows()])
def test_row(namespace, number, code, status):
    scope = dict(namespace)
    with torch.no_grad():
        if status == "not applicable":
            with pytest.raises((TypeError, AttributeError, ValueError)) as error:
                exec(code, scope)
            assert str(error.value), "the error says why"
            return
        exec(f"__result__ = ({code})" if ";" not in code else code, scope)
    namespace["model"].reset_hooks()
