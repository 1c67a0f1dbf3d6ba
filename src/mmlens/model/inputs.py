"""A batch of multimodal inputs together with the layout of its image tokens."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .layout import ImageTokenLayout


@dataclass(frozen=True)
class MultimodalInputs:
    """What `HookedMLLM.prepare` returns and every forward accepts.

    `pixel_values` holds the batch's images in order of appearance (row by row), so an image's
    index there is its `ImageSpan.image_index` in `layout`.
    """

    input_ids: Int[Tensor, "batch seq"]
    pixel_values: Float[Tensor, "n_images 3 height width"]
    attention_mask: Int[Tensor, "batch seq"]
    layout: ImageTokenLayout
    prompts: tuple[str, ...] = ()

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "MultimodalInputs":
        """Move the tensors; `dtype` applies to `pixel_values` only."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            pixel_values=self.pixel_values.to(device=device, dtype=dtype),
            attention_mask=self.attention_mask.to(device),
        )

    def hf_kwargs(self) -> dict[str, Tensor]:
        """The keywords a Hugging Face LLaVA forward takes."""
        return {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "attention_mask": self.attention_mask,
        }
