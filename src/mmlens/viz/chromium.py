"""Where a Chrome or Chromium lives, for the browser checks and for static image export.

Debian names its binary /usr/bin/chromium, which neither plotly's exporter (kaleido) nor most
tools look for, so one lookup serves both: `$MMLENS_CHROMIUM`, then the usual names on PATH.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """Path of a Chromium binary: `$MMLENS_CHROMIUM`, Debian's /usr/bin/chromium, or one on PATH."""
    explicit = os.environ.get("MMLENS_CHROMIUM")
    if explicit:
        return explicit if Path(explicit).exists() else None
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


__all__ = ["CHROMIUM_CANDIDATES", "find_chromium"]
