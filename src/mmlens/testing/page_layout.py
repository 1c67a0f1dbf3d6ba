"""Where a page's boxes land at a given window width, measured in headless Chromium.

A copy of the page (beside it, so files it loads from its folder still resolve) is opened in an
iframe exactly `width` CSS pixels wide (headless Chromium will not make a window narrower than
500 px, a phone is 390), with a script that, once the page has loaded and its figures have
drawn, posts the bounding box of every element matching a selector and the document's scroll
width to the host page, which writes them into its DOM as JSON for `--dump-dom`. This tells a
layout that reflows from one whose boxes overlap or overflow the window, which a screenshot
alone does not say.
"""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .browser import BrowserError, dump_dom

_RESULT_ID = "mmlens-page-layout"
# after `load` and a pause, so that plotly has drawn (and resized) every figure
_PROBE = """<script>
window.addEventListener("load", function () { setTimeout(function () {
  var boxes = Array.prototype.map.call(document.querySelectorAll(%(selector)s), function (e) {
    var r = e.getBoundingClientRect();
    return {id: e.id || "", left: r.left + window.scrollX, top: r.top + window.scrollY, width: r.width, height: r.height};
  });
  var root = document.documentElement;
  parent.postMessage(JSON.stringify({viewport: root.clientWidth, scroll_width: root.scrollWidth, boxes: boxes}), "*");
}, 1500); });
</script>"""
_HOST = """<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">
<script>window.addEventListener("message", function (event) {
  var out = document.createElement("pre"); out.id = %(result_id)s; out.textContent = event.data; document.body.appendChild(out);
});</script>
<iframe src="%(page)s" style="border:0; width:%(width)dpx; height:%(height)dpx"></iframe>
</body></html>"""


@dataclass(frozen=True)
class Box:
    """An element's bounding box in CSS pixels, relative to the page's top left."""

    id: str
    left: float
    top: float
    width: float
    height: float

    @property
    def right(self) -> float:
        return self.left + self.width

    @property
    def bottom(self) -> float:
        return self.top + self.height

    def overlap(self, other: Box) -> float:
        """Area shared with `other`, in square pixels (0 when they only touch)."""
        wide = min(self.right, other.right) - max(self.left, other.left)
        high = min(self.bottom, other.bottom) - max(self.top, other.top)
        return max(wide, 0.0) * max(high, 0.0)


@dataclass(frozen=True)
class PageLayout:
    viewport: float  # the window's layout width, without a scroll bar
    scroll_width: float  # the page's width: larger than `viewport` when it scrolls sideways
    boxes: list[Box]

    @property
    def overflows(self) -> bool:
        """True when the page scrolls sideways at this width."""
        return self.scroll_width > self.viewport + 0.5

    def overlapping(self) -> list[tuple[str, str, float]]:
        """Every pair of boxes that overlap, with the shared area."""
        return [(a.id, b.id, a.overlap(b)) for i, a in enumerate(self.boxes) for b in self.boxes[i + 1:] if a.overlap(b) > 0]


def measure_layout(html_path: str | os.PathLike, width: int, *, selector: str = ".plotly-graph-div",
                   height: int = 900, virtual_time_ms: int = 10_000) -> PageLayout:
    """The boxes of the elements matching `selector` and the page's scroll width, with the page
    open in a window `width` CSS pixels wide."""
    page = Path(html_path)
    text = page.read_text(encoding="utf-8")
    if "</body>" not in text:
        raise BrowserError(f"{page} has no </body>: cannot add the measuring script")
    probe = _PROBE % {"selector": json.dumps(selector)}
    copies = []
    try:
        copies.append(_sibling(page, text.replace("</body>", probe + "</body>", 1)))
        host = _HOST % {"result_id": json.dumps(_RESULT_ID), "page": copies[0].name, "width": width, "height": height}
        copies.append(_sibling(page, host))
        dom = dump_dom(copies[1], virtual_time_ms=virtual_time_ms, window=(width + 200, height + 100))
    finally:
        for copy in copies:
            copy.unlink(missing_ok=True)
    found = re.search(rf'<pre id="{_RESULT_ID}">(.*?)</pre>', dom, re.S)
    if found is None:
        raise BrowserError(f"the measuring script did not report from {page} (its scripts failed or took too long)")
    measured = json.loads(html.unescape(found.group(1)))
    return PageLayout(measured["viewport"], measured["scroll_width"], [Box(**box) for box in measured["boxes"]])


def _sibling(page: Path, text: str) -> Path:
    descriptor, path = tempfile.mkstemp(prefix=".mmlens-layout-", suffix=".html", dir=page.parent)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    return Path(path)


__all__ = ["Box", "PageLayout", "measure_layout"]
