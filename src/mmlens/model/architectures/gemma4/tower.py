"""Hooks for Gemma 4's vision encoder and its soft-token embedder.

The encoder takes each image as a row of patchified pixels `[n_images, max_patches, 3 p^2]`, its
real patches first and padding patches (position (-1, -1)) after them, which a bidirectional mask
keeps out of every key set. Its blocks are Gemma-style sandwich blocks (q/k norms, an unweighted
v norm) whose 2-D rotary splits each head between the x and the y position, applied to q and k
before the head transpose; every linear sits in a `Gemma4ClippableLinear` (`.linear`). After the
last block the tower pools each image's patches k x k by position, scales and (optionally)
standardises them and strips the padding: `adapter.hook_in` is that flat `[n_tokens, d]` row of
pooled tokens, `hook_hidden` the unweighted RMSNorm of the embedder, `hook_out` what the LLM gets.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers.models.gemma4.modeling_gemma4 import apply_multidimensional_rope

from ....errors import UnsupportedModelError
from ...hook_tree import AdapterHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import AttentionSpec, BlockSpec, _override_forward


def rotate_by_patch_position(_attn: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The tower's 2-D rotary on q and k: half of each head turned by x, half by y."""
    cos, sin = kwargs["position_embeddings"]
    positions = kwargs["position_ids"]
    return apply_multidimensional_rope(q, cos, sin, positions), apply_multidimensional_rope(k, cos, sin, positions)


GEMMA4_VISION_BLOCK = BlockSpec(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="pre_feedforward_layernorm",
    mlp="mlp",
    gated_mlp=True,
    attention=AttentionSpec(q="q_proj.linear", k="k_proj.linear", v="v_proj.linear", o="o_proj.linear",
                            q_norm="q_norm", k_norm="k_norm", v_norm="v_norm", position_step=rotate_by_patch_position),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)


def refuse_clipping(tower: nn.Module) -> None:
    """Refuse clipped linears with a finite bound: the step-by-step path computes each head's share of
    `o_proj` from its weight (`hook_result`), which a clamp on the sum cannot be split into."""
    for name, module in tower.named_modules():
        bounds = [getattr(module, b, None) for b in ("input_min", "input_max", "output_min", "output_max")]
        if getattr(module, "use_clipped_linears", False) and any(torch.isfinite(b).any() for b in bounds if b is not None):
            raise UnsupportedModelError(
                f"Gemma 4's vision tower clips {name} (use_clipped_linears with finite bounds): its clamped "
                "outputs cannot be split into per-head results; mmlens supports towers whose clip bounds are infinite"
            )


def hook_patch_embeddings(embedder: nn.Module, point: Any) -> torch.utils.hooks.RemovableHandle:
    """`vision.hook_embed`: the patch embeddings plus their 2-D position table, `[n_images, max_patches, d]`."""
    return embedder.register_forward_hook(lambda _m, _i, out: fire(point, out) if is_hooked(point) else None)


def instrument_embedder(embedder: nn.Module, hooks: AdapterHooks) -> None:
    """Hugging Face's embedder while nothing listens; else the pooled tokens (`hook_in`), their
    unweighted RMSNorm (`hook_hidden`) and the projection into the LLM (`hook_out`), `[n_tokens, d]`."""
    original = bare_forward(embedder)

    def forward(inputs_embeds: Tensor) -> Tensor:
        if not hooks.any_hooked():
            return original(inputs_embeds)
        pooled = fire(hooks.hook_in, inputs_embeds)
        normed = fire(hooks.hook_hidden, embedder.embedding_pre_projection_norm(pooled))
        return fire(hooks.hook_out, embedder.embedding_projection(normed))

    _override_forward(embedder, forward)
