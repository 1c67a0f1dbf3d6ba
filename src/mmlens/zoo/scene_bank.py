"""Synthetic scenes held in memory as arrays, for training and evaluating the embedded model.

The scenes are exactly those of `load_segmentation("scenes", split=, seed=)` (same generator per
index), rendered straight to numpy because training reads tens of thousands of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, UInt8

from ..data.scenes import render_scene, scene_classes, scene_rng


@dataclass
class SceneBank:
    images: UInt8[np.ndarray, "n height width 3"]
    masks: UInt8[np.ndarray, "n height width"]
    objects: list[list[dict]]
    k: int

    @classmethod
    def render(cls, n: int, *, split: str, seed: int, image_size: int = 64, k: int = 8, start: int = 0) -> "SceneBank":
        rendered = [render_scene(scene_rng(seed, split, i), image_size, k=k) for i in range(start, start + n)]
        return cls(
            images=np.stack([r[0] for r in rendered]),
            masks=np.stack([r[1] for r in rendered]),
            objects=[r[2] for r in rendered],
            k=k,
        )

    def __len__(self) -> int:
        return len(self.objects)

    @property
    def classes(self) -> list[tuple[str, str]]:
        return [(c.colour, c.shape) for c in scene_classes(self.k)]

    def presence(self, index: np.ndarray) -> Float[torch.Tensor, "batch k"]:
        """Multi-hot of which object classes each scene shows (an image-level label)."""
        target = torch.zeros(len(index), self.k)
        for row, i in enumerate(index):
            for obj in self.objects[i]:
                target[row, obj["class_id"] - 1] = 1.0
        return target
