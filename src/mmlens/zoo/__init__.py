"""Models shipped inside the package, loadable offline by name (`HookedMLLM.from_pretrained(name)`)."""

from __future__ import annotations

from pathlib import Path

from ..model.loading import register_checkpoint_source

WEIGHTS_DIR = Path(__file__).parent / "weights"


def shipped_models() -> dict[str, Path]:
    """Name -> directory of every Hugging Face checkpoint that ships with mmlens."""
    if not WEIGHTS_DIR.is_dir():
        return {}
    return {
        path.name: path
        for path in sorted(WEIGHTS_DIR.iterdir())
        if (path / "config.json").is_file()
    }


register_checkpoint_source(shipped_models)
