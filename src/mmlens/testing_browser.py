"""Headless-browser checks that a report's plotly figures rendered; the code is in
`mmlens.testing.browser`, and this path stays for existing imports."""

from .testing.browser import BrowserError, drawn_fraction, dump_dom, find_chromium, rendered_figures, screenshot

__all__ = ["BrowserError", "drawn_fraction", "dump_dom", "find_chromium", "rendered_figures", "screenshot"]
