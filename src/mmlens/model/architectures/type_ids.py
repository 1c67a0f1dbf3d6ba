"""Token type ids: a per-token flag some families' forwards read beside the ids (Gemma 3's and
Gemma 4's 1 at image tokens, from which Hugging Face opens each image's attention block; PaliGemma's
prefix / suffix). They travel with the inputs, so a causal run drops them, a bidirectional one
derives them when a caller left them out, and each generated token gets its own."""

from __future__ import annotations

import torch
from torch import Tensor


def type_ids_rule(mode: str, kwargs: dict[str, Tensor], key: str, image_token_id: int) -> dict[str, Tensor]:
    """The forward's keywords under `mode` for a model that opens its image blocks itself from the
    type ids under `key` (1 at image tokens): without them for "causal", derived from the ids when a
    caller left them out for "bidirectional"."""
    if mode == "causal":
        return {k: v for k, v in kwargs.items() if k != key}
    if kwargs.get(key) is None:
        kwargs = {**kwargs, key: (kwargs["input_ids"] == image_token_id).long()}
    return kwargs


def type_ids_extended(extra: dict[str, Tensor], key: str, generated: int = 0) -> dict[str, Tensor]:
    """The family keywords for the same rows with one more generated token, whose type id is
    `generated` (0: text; PaliGemma's suffix is 1)."""
    types = extra.get(key)
    if types is None:
        return extra
    return {**extra, key: torch.cat([types, torch.full_like(types[:, :1], generated)], dim=1)}
