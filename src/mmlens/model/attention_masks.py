"""Attention masks as explicit 4D tensors: causal + padding, optionally with image tokens that
see each other in both directions.

Hugging Face uses a 4D float mask as given (0 = attend, dtype minimum = blocked), so the same
tensor serves to train a model with bidirectional image attention, to run Hugging Face as the
reference for an edited model, and to show the effective mask.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def image_index_per_position(
    input_ids: Int[Tensor, "batch seq"], image_token_id: int, tokens_per_image: int
) -> Int[Tensor, "batch seq"]:
    """For every position, which image of its row it belongs to (0, 1, ...) or -1 for text."""
    is_image = input_ids == image_token_id
    order = torch.cumsum(is_image.long(), dim=1) - 1
    return torch.where(is_image, torch.div(order, tokens_per_image, rounding_mode="floor"), -1)


def allowed_edges(
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    image_token_id: int,
    tokens_per_image: int,
    bidirectional_images: bool,
) -> Bool[Tensor, "batch seq seq"]:
    """True where query (dim 1) may read key (dim 2)."""
    batch, seq = input_ids.shape
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril().expand(batch, seq, seq)
    if bidirectional_images:
        image = image_index_per_position(input_ids, image_token_id, tokens_per_image)
        same_image = (image[:, :, None] == image[:, None, :]) & (image[:, :, None] >= 0)
        allowed = allowed | same_image
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed


def image_attention_mask(
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    image_token_id: int,
    tokens_per_image: int,
    *,
    bidirectional_images: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch 1 seq seq"]:
    """The additive 4D mask Hugging Face takes as `attention_mask`."""
    allowed = allowed_edges(input_ids, attention_mask, image_token_id, tokens_per_image, bidirectional_images)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=input_ids.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
