"""Attention masks as explicit 4D tensors: causal + padding, optionally with image tokens that
see each other in both directions.

Hugging Face uses a 4D float mask as given (0 = attend, dtype minimum = blocked), so the same
tensor serves to train a model with bidirectional image attention, to run Hugging Face as the
reference for an edited model, and to show the effective mask. Which image each position belongs
to comes from the layout (`ImageTokenLayout.image_of_position`), or, for a fixed-grid model whose
tokens per image are known, from `image_index_per_position`.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor


def image_index_per_position(
    input_ids: Int[Tensor, "batch seq"], image_token_id: int, tokens_per_image: int
) -> Int[Tensor, "batch seq"]:
    """For every position, which image of its row it belongs to (0, 1, ...) or -1 for text,
    when every image is `tokens_per_image` consecutive placeholders."""
    is_image = input_ids == image_token_id
    order = torch.cumsum(is_image.long(), dim=1) - 1
    return torch.where(is_image, torch.div(order, tokens_per_image, rounding_mode="floor"), -1)


def allowed_edges(
    image_of: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    bidirectional_images: bool,
) -> Bool[Tensor, "batch seq seq"]:
    """True where query (dim 1) may read key (dim 2); `image_of` numbers each position's image
    in its row (-1 for text)."""
    batch, seq = image_of.shape
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=image_of.device).tril().expand(batch, seq, seq)
    if bidirectional_images:
        same_image = (image_of[:, :, None] == image_of[:, None, :]) & (image_of[:, :, None] >= 0)
        allowed = allowed | same_image
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool().to(image_of.device)[:, None, :]
    return allowed


def additive_mask(allowed: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Float[Tensor, "batch 1 seq seq"]:
    """The additive 4D mask Hugging Face takes as `attention_mask` for these edges."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def image_attention_mask(
    input_ids: Int[Tensor, "batch seq"],
    attention_mask: Int[Tensor, "batch seq"] | None,
    image_token_id: int,
    tokens_per_image: int,
    *,
    bidirectional_images: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Float[Tensor, "batch 1 seq seq"]:
    """The 4D mask of a fixed-grid model (e.g. for training one with bidirectional image attention)."""
    image_of = image_index_per_position(input_ids, image_token_id, tokens_per_image)
    return additive_mask(allowed_edges(image_of, attention_mask, bidirectional_images), dtype)
