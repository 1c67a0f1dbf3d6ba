"""Every Python snippet of the README, the docs home page and the quick start runs as written.

The snippets of one page are run in order in one namespace (a page may use a name an earlier
snippet defined, as a reader typing them in would), offline, on the embedded model, in a
scratch folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/quickstart.md"]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_snippets(page: Path) -> list[str]:
    return FENCE.findall(page.read_text(encoding="utf-8"))


def test_snippet_extraction_finds_every_fence(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n```python\na = 1\n```\n\n```bash\nls\n```\n```python\nb = a + 1\n\n```\n")
    assert python_snippets(page) == ["a = 1\n", "b = a + 1\n\n"]


@pytest.mark.parametrize("page", PAGES)
def test_page_snippets_run_as_written(page, tmp_path, monkeypatch):
    snippets = python_snippets(ROOT / page)
    assert snippets, f"{page} has no python snippet"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__snippet__"}
    with torch.no_grad():
        for i, code in enumerate(snippets):
            try:
                exec(compile(code, f"{page} snippet {i + 1}", "exec"), namespace)
            except Exception as error:  # name the snippet: the traceback alone points at <string>
                raise AssertionError(f"{page}, snippet {i + 1} fails as written:\n{code}") from error
