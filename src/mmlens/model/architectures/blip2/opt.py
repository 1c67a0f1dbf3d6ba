"""OPT's decoder blocks (BLIP-2's LLM), hooked with TransformerLens's names.

An OPT block with `do_layer_norm_before` is a pre-norm block like Llama's, with three differences
its hooks follow: LayerNorms with a bias (`self_attn_layer_norm`, `final_layer_norm`), an ungated
MLP whose `fc1` / `fc2` sit on the block itself (no `mlp` module), and no rotary embedding (learned
positions, offset by 2, are added to the embeddings before block 0). OPT scales its queries before
the product with the keys; the hooked maths scales the scores, as TransformerLens does (`hook_q` is
the unscaled query).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...hook_tree import BlockHooks, fire
from ...runtime.devices import bare_forward
from ...runtime.instrument import (
    AttentionSpec, BlockSpec, _argument_names, _override_forward, instrument_attention,
)
from ...runtime.norms import NormKind, instrument_norm

# `mlp` names the block itself: OPT keeps fc1, fc2 and activation_fn on it
OPT_BLOCK = BlockSpec(
    ln1="self_attn_layer_norm",
    attn="self_attn",
    ln2="final_layer_norm",
    mlp="",
    gated_mlp=False,
    attention=AttentionSpec(o="out_proj", rotary=False),
)


def instrument_opt_block(layer: nn.Module, hooks: BlockHooks, spec: BlockSpec, use_result: Callable[[], bool],
                         norm: NormKind, linear_attention: bool = False) -> None:
    """Hook one pre-norm `OPTDecoderLayer` (the family refuses post-norm OPT at load)."""
    ln1, ln2, attn = (layer.get_submodule(name) for name in (spec.ln1, spec.ln2, spec.attn))
    mlp = layer.get_submodule(spec.mlp)
    instrument_norm(ln1, hooks.ln1, norm)
    instrument_norm(ln2, hooks.ln2, norm)
    instrument_attention(attn, hooks.attn, spec.attention, use_result, norm)
    hooks.mlp.bind_mlp(mlp, gated=False)
    hooks.bind_outputs(layer, None)
    original = bare_forward(layer)
    names = _argument_names(layer)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not (hooks.residual_hooked() or hooks.mlp.any_hooked()):
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        attn_out = fire(hooks.hook_attn_out, attn(hidden_states=ln1(resid_pre), **kwargs)[0])
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + attn_out)
        pre = fire(hooks.mlp.hook_pre, mlp.fc1(ln2(resid_mid)))
        mlp_out = fire(hooks.hook_mlp_out, mlp.fc2(fire(hooks.mlp.hook_post, mlp.activation_fn(pre))))
        return fire(hooks.hook_resid_post, resid_mid + mlp_out)

    _override_forward(layer, forward)
