"""Mllama's cross-attention blocks: the LLM reads the images here, and only here.

A cross-attention block takes its queries from the text and its keys and values from
`cross_attention_states` (the projector's output for every tile's CLS and patches), with per-head
RMSNorms on queries and keys and no rotary. Both branches are tanh-gated:
`x + tanh(attn_gate) * attn(ln1(x))`, then `+ tanh(mlp_gate) * rows * mlp(ln2(.))`, where `rows` is 0
at text tokens whose `cross_attention_mask` row is empty (they see no tile) and 1 elsewhere.
`hook_attn_gate` / `hook_mlp_gate` hold those factors per token ([batch, pos, 1], the MLP's with `rows`
in it), so a hook can ablate or patch what a layer reads from the images at any token.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ...hook_tree import BlockHooks, fire
from ...runtime.devices import bare_forward
from ...runtime.instrument import AttentionSpec, _argument_names, _override_forward, instrument_attention, instrument_mlp
from ...runtime.norms import instrument_norm

CROSS_ATTENTION = AttentionSpec(rotary=False, q_norm="q_norm", k_norm="k_norm", key_source="cross_attention_states")


def instrument_cross_attention_block(layer: nn.Module, hooks: BlockHooks, use_result: Callable[[], bool]) -> None:
    """Give `hooks` cross-attention points and hook the block's norms, attention, MLP and gates."""
    hooks.mix_with_cross_attention(qk_norm=True)
    ln1, ln2, attn = layer.input_layernorm, layer.post_attention_layernorm, layer.cross_attn
    instrument_norm(ln1, hooks.ln1, "RMS")
    instrument_norm(ln2, hooks.ln2, "RMS")
    instrument_attention(attn, hooks.cross_attn, CROSS_ATTENTION, use_result, "RMS")
    instrument_mlp(layer.mlp, hooks.mlp, gated=True)
    original = bare_forward(layer)
    names = _argument_names(layer)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if not hooks.residual_hooked():
            return original(hidden_states, *args, **kwargs)
        kwargs.update(zip(names, args))
        batch, seq = hidden_states.shape[:2]
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        # after the first generated token the images' features are None and the keys come from the cache
        attended = attn(hidden_states=ln1(resid_pre), attention_mask=kwargs["cross_attention_mask"],
                        cross_attention_states=kwargs.get("cross_attention_states"),
                        past_key_values=kwargs.get("past_key_values"))[0]
        attn_gate = fire(hooks.hook_attn_gate, layer.cross_attn_attn_gate.tanh().expand(batch, seq, 1))
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + fire(hooks.hook_attn_out, attn_gate * attended))
        mlp_gate = layer.cross_attn_mlp_gate.tanh().expand(batch, seq, 1)
        rows = kwargs.get("full_text_row_masked_out_mask")
        if rows is not None:  # 0 or 1, so folding it into the gate leaves Hugging Face's products exact
            mlp_gate = mlp_gate * rows[:, 0]
        mlp_out = fire(hooks.hook_mlp_out, fire(hooks.hook_mlp_gate, mlp_gate) * layer.mlp(ln2(resid_mid)))
        return fire(hooks.hook_resid_post, resid_mid + mlp_out)

    _override_forward(layer, forward)
