"""A batch of multimodal inputs together with the layout of its image tokens."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .images.layout import ImageTokenLayout


@dataclass(frozen=True)
class MultimodalInputs:
    """What `HookedMLLM.prepare` returns and every forward accepts.

    `pixel_values` holds the batch's images in order of appearance (row by row), so an image's
    index there is its `ImageSpan.image_index` in `layout`. `extra` holds the keywords the
    family's own forward takes (PaliGemma's `token_type_ids`, LLaVA-NeXT's `image_sizes` ...):
    tensors whose first dimension is the batch row or the image, carried through every forward.
    `layout_inputs` holds the keywords only mmlens reads (`Architecture.layout_input_names`, e.g.
    InternVL's original image sizes, per image): they travel with the batch like `extra` but are
    never given to Hugging Face (`hf_kwargs` leaves them out, `keywords` has both).
    """

    input_ids: Int[Tensor, "batch seq"]
    pixel_values: Float[Tensor, "n_images ..."]
    attention_mask: Int[Tensor, "batch seq"]
    layout: ImageTokenLayout
    prompts: tuple[str, ...] = ()
    extra: Mapping[str, Tensor] = field(default_factory=dict)
    layout_inputs: Mapping[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def shape(self) -> torch.Size:
        """`[batch, seq]` of the ids: what TransformerLens's `patching.get_act_patch_*` read off
        the tokens they are given, so a batch with its images can stand in for the ids there."""
        return self.input_ids.shape

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "MultimodalInputs":
        """Move the tensors; `dtype` applies to `pixel_values` only."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            pixel_values=self.pixel_values.to(device=device, dtype=dtype),
            attention_mask=self.attention_mask.to(device),
            extra={k: v.to(device) for k, v in self.extra.items()},
            layout_inputs={k: v.to(device) for k, v in self.layout_inputs.items()},
        )

    def hf_kwargs(self) -> dict[str, Tensor]:
        """The keywords the Hugging Face model's forward takes."""
        return {
            "input_ids": self.input_ids,
            "pixel_values": self.pixel_values,
            "attention_mask": self.attention_mask,
            **self.extra,
        }

    def keywords(self) -> dict[str, Tensor]:
        """The Hugging Face keywords plus the layout-only ones: what mmlens's own forwards take."""
        return {**self.hf_kwargs(), **self.layout_inputs}

    def repeat(self, k: int) -> "MultimodalInputs":
        """The batch repeated `k` times along the batch dimension, replica-major (rows r*B..r*B+B-1
        are replica r), with images, the family's keywords and layout rows renumbered to match."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")

        def rep(x: Tensor) -> Tensor:
            return x.repeat(k, *([1] * (x.ndim - 1)))  # rows or images, replica-major either way

        return replace(
            self,
            input_ids=rep(self.input_ids),
            pixel_values=rep(self.pixel_values),
            attention_mask=rep(self.attention_mask),
            layout=self.layout.repeat(k),
            prompts=tuple(self.prompts) * k,
            extra={name: rep(v) for name, v in self.extra.items()},
            layout_inputs={name: rep(v) for name, v in self.layout_inputs.items()},
        )
