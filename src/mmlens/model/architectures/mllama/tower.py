"""Mllama's tiled vision tower: a local encoder over every tile's patches, then a gated global
encoder, as one stack of hooked blocks (`vision.blocks.{i}`: the local blocks first, then the global).

Each image is cut into up to `max_num_tiles` tiles; every tile's patches get a CLS token, tile and
position embeddings (gated by aspect ratio) and `ln_pre`, and both encoders run over all of an image's
tiles at once, each tile padded to a multiple of 8 tokens. The global blocks scale each branch by
the tanh of a learned gate (`layer_scale_tanh`). The projector (one linear) reads the global
encoder's output concatenated with the local blocks `intermediate_layers_indices`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...hook_tree import fire
from ...runtime.instrument import AttentionSpec, BlockSpec, instrument_block
from ...runtime.norms import instrument_norm

LOCAL_BLOCK = BlockSpec(ln1="input_layernorm", attn="self_attn", ln2="post_attention_layernorm", mlp="mlp",
                        gated_mlp=False, attention=AttentionSpec(rotary=False))
GLOBAL_BLOCK = BlockSpec(ln1="input_layernorm", attn="self_attn", ln2="post_attention_layernorm", mlp="mlp",
                         gated_mlp=False, attention=AttentionSpec(rotary=False), layer_scale=("gate_attn", "gate_ffn"),
                         layer_scale_tanh=True)


def tower_blocks(tower: nn.Module) -> nn.ModuleList:
    """The local encoder's blocks, then the global encoder's: the order a forward runs them."""
    return nn.ModuleList([*tower.transformer.layers, *tower.global_transformer.layers])


def instrument_tower(tower: nn.Module, projector: nn.Module, root: Any) -> list[Any]:
    """Hook the tower's blocks, its pre- and post-norms (`ln_post` is the norm between the local and
    the global encoder, the only one after a block) and the projector; `vision.hook_embed` is what
    `ln_pre` receives: patches, CLS, tile and position embeddings, [image, tile, token, d]."""
    use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
    n_local = len(tower.transformer.layers)
    for index, (layer, hooks) in enumerate(zip(tower_blocks(tower), root.vision.blocks)):
        instrument_block(layer, hooks, LOCAL_BLOCK if index < n_local else GLOBAL_BLOCK, use_result, "LN")
    instrument_norm(tower.layernorm_pre, root.vision.ln_pre, "LN")
    instrument_norm(tower.layernorm_post, root.vision.ln_post, "LN")
    adapter = root.adapter
    return [
        tower.layernorm_pre.register_forward_pre_hook(lambda _m, args: (fire(root.vision.hook_embed, args[0]),)),
        projector.register_forward_pre_hook(lambda _m, args: (fire(adapter.hook_in, args[0]),)),
        projector.register_forward_hook(lambda _m, _args, out: fire(adapter.hook_out, out)),
    ]
