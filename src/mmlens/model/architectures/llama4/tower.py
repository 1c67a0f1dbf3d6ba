"""Hooks for Llama 4's vision tower and its adapter (pixel shuffle, a two-layer GELU MLP, a linear).

The tower unfolds each frame (a tile or the global image) into patches, appends a CLS token at the
end, adds learned positions and runs `layernorm_pre`, then pre-norm LayerNorm blocks whose attention
is bidirectional with a 2-D complex rotary over the patches (the CLS token unrotated); their layer
takes `hidden_state` and returns a one-tuple, so the blocks keep Hugging Face's calling convention
around `instrument_block`. `layernorm_post` is `vision.ln_post`; the model then drops the CLS token.
`adapter.hook_in` is what the adapter reads (the normalised patches, `[frames, patches, d]`),
`adapter.hook_hidden` the pixel-shuffled features after the MLP (`[frames, tokens, d]`, Hugging
Face's `image_hidden_states`) and `adapter.hook_out` the linear projection the LLM receives, per
frame (`[frames, tokens, d_model]`; Hugging Face flattens the frames).
"""

from __future__ import annotations

import sys
from typing import Any, Callable

from torch import Tensor, nn

from ...hook_tree import AdapterHooks, VisionHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import AttentionSpec, BlockSpec, _override_forward, instrument_block
from ...runtime.norms import instrument_norm
from .attention import vision_position_step

LLAMA4_VISION_BLOCK = BlockSpec(ln1="input_layernorm", attn="self_attn", ln2="post_attention_layernorm", mlp="mlp",
                                gated_mlp=False,
                                attention=AttentionSpec(position_step=vision_position_step, softmax_in_float32=False))


def instrument_tower(tower: nn.Module, hooks: VisionHooks, spec: BlockSpec, use_result: Callable[[], bool]) -> list[Any]:
    """Hook the tower's embeddings (`vision.hook_embed`: patches, CLS and positions as `layernorm_pre`
    receives them, `[frames, patches + 1, d]`), its norms and its blocks."""
    for layer, block in zip(tower.model.layers, hooks.blocks):
        instrument_block(layer, block, spec, use_result, "LN")
        _keep_layer_convention(layer)
    instrument_norm(tower.layernorm_pre, hooks.ln_pre, "LN")
    instrument_norm(tower.layernorm_post, hooks.ln_post, "LN")

    def embeddings(_module: nn.Module, args: tuple):
        if not is_hooked(hooks.hook_embed):
            return None
        x = args[0]  # [frames, 1, patches + 1, d]: Hugging Face's chunk dim of one
        return (fire(hooks.hook_embed, x.flatten(1, 2)).view_as(x), *args[1:])

    return [tower.layernorm_pre.register_forward_pre_hook(embeddings)]


def _keep_layer_convention(layer: nn.Module) -> None:
    """Let the instrumented block be called as Hugging Face's encoder calls it (`hidden_state=`,
    `freqs_ci=`) and return its one-tuple."""
    block = bare_forward(layer)

    def forward(hidden_state: Tensor, freqs_ci: Tensor, attention_mask: Tensor | None = None,
                output_attentions: bool | None = None) -> tuple[Tensor, ...]:
        out = block(hidden_state, freqs_ci=freqs_ci, attention_mask=attention_mask)
        return out if isinstance(out, tuple) else (out,)

    _override_forward(layer, forward)


def instrument_adapter(vision_adapter: nn.Module, projector: nn.Module, hooks: AdapterHooks, tokens_per_frame: int) -> None:
    """Hugging Face's pixel shuffle and MLP (`hook_in`, `hook_hidden`) and its projector (`hook_out`),
    each its own code while its points are quiet."""
    shuffle = sys.modules[type(vision_adapter).__module__].pixel_shuffle
    adapt, project = bare_forward(vision_adapter), bare_forward(projector)

    def adapter_forward(encoded_patches: Tensor) -> Tensor:
        if not (is_hooked(hooks.hook_in) or is_hooked(hooks.hook_hidden)):
            return adapt(encoded_patches)
        x = fire(hooks.hook_in, encoded_patches)
        return fire(hooks.hook_hidden, vision_adapter.mlp(shuffle(x, vision_adapter.pixel_shuffle_ratio)))

    def projector_forward(image_features: Tensor) -> Tensor:
        out = project(image_features)  # [frames * tokens, d_model]
        if not is_hooked(hooks.hook_out):
            return out
        return fire(hooks.hook_out, out.view(-1, tokens_per_frame, out.shape[-1])).flatten(0, 1)

    _override_forward(vision_adapter, adapter_forward)
    _override_forward(projector, projector_forward)
