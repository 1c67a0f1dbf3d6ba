"""Every cell of docs/tl_compat.md: each of the 63 demo calls runs as written on each family's
setting; a "works" or "differs" cell returns what tests/model/tl_compat_settings.py's check for its row
expects, a "refused" cell raises the error and phrase its notes quote; the page's counts are the
table's."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

import mmlens.errors
from tl_compat_settings import (
    CHECKED_BY, CHECKS, FAMILIES, GRAD_ROWS, REFUSAL, SLOW_ROWS, STATUSES, Row, RowRun, page, rows, setting,
)

TABLE = rows()
ROOT = Path(__file__).resolve().parents[2]


def counts_sentence(table: list[Row]) -> str:
    everywhere = sum(all(s != "refused" for s in row.statuses.values()) for row in table)
    as_tl = sum(all(s == "works" for s in row.statuses.values()) for row in table)
    per_family = "; ".join(
        f"{family}: " + ", ".join(f"{sum(row.statuses[family] == s for row in table)} {s}" for s in STATUSES)
        for family in FAMILIES
    )
    return (f"Of the {len(table)} calls, {everywhere} work on every family ({as_tl} as in TransformerLens on every "
            f"family, {everywhere - as_tl} with a stated difference on some); {len(table) - everywhere} "
            f"{'is' if len(table) - everywhere == 1 else 'are'} refused with a reason. Per family: {per_family}.")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run thousands of forwards here (the patching sweeps); threads only add
    synchronisation to each, and on a busy machine make them many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> tuple[str, dict]:
    scope: dict = {}
    with torch.no_grad():
        exec(setting(request.param), scope)
    return request.param, scope


def test_the_page_lists_the_63_demo_calls_with_their_counts():
    assert [row.number for row in TABLE] == list(range(1, 64))
    assert counts_sentence(TABLE) in " ".join(page().split()), counts_sentence(TABLE)
    assert sum(all(s != "refused" for s in row.statuses.values()) for row in TABLE) >= 60, "the issue's bar"
    assert set(CHECKS) == {row.number for row in TABLE}, "every row has a check of what it returns"


@pytest.mark.parametrize("row", TABLE, ids=[f"row{row.number}" for row in TABLE])
def test_notes_back_every_cell(row: Row):
    """A "differs" cell states the difference, a "refused" one quotes its error, and every
    "checked by" test exists."""
    statuses = set(row.statuses.values())
    if "differs" in statuses:
        assert len(row.notes.strip()) > 40, "the notes state the difference"
    if "refused" in statuses:
        assert REFUSAL.search(row.notes), 'a refusal is quoted as: raises `Error` saying "phrase"'
    for path, name in CHECKED_BY.findall(row.notes):
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"{path}::{name} does not exist"


def split_last_expression(code: str) -> ast.Module:
    """The row's statements, its last expression (if it ends with one) assigned to `__result__`."""
    tree = ast.parse(code)
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        tree.body[-1] = ast.Assign(targets=[ast.Name("__result__", ast.Store())], value=tree.body[-1].value)
    return ast.fix_missing_locations(tree)


def restore(model) -> None:
    model.reset_hooks(including_permanent=True)
    model.set_use_attn_result(False)
    for param in model.parameters():
        param.requires_grad_(True)
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("row", [pytest.param(row, marks=[pytest.mark.slow] if row.number in SLOW_ROWS else [])
                                 for row in TABLE], ids=[f"row{row.number}" for row in TABLE])
def test_cell(family, row: Row):
    name, scope = family
    status = row.statuses[name]
    scope["grads"].clear()
    scope.pop("__result__", None)
    code = compile(split_last_expression(row.code), f"<row {row.number}>", "exec")
    try:
        with torch.set_grad_enabled(row.number in GRAD_ROWS), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if status == "refused":
                error_name, phrase = REFUSAL.search(row.notes).groups()
                with pytest.raises(getattr(mmlens.errors, error_name), match=re.escape(phrase)):
                    exec(code, scope)
                return
            exec(code, scope)
            CHECKS[row.number](RowRun(name, scope, scope.get("__result__"), list(caught)))
    finally:
        restore(scope["model"])
