"""Gemma 4's LLM block with per-layer inputs and KV sharing (E2B, E4B) or experts (26B-A4B), hooked.

Per-layer inputs: every block l also reads a small vector per token, Hugging Face's
`per_layer_inputs[:, :, l]`: the token's row of `embed_tokens_per_layer` (image tokens read the
pad token's row: Hugging Face swaps their ids for the pad id) plus a normed projection of the LLM's
input embeddings (image features in place), the two summed and divided by sqrt 2. After its MLP the
block gates that vector by its residual and adds the result back, before `layer_scalar`:
`resid_post = s * (x + norm(W_proj(act(W_gate x) * per_layer_input)))` with `x = resid_mid + mlp_out`.
Its points: `hook_per_layer_input` (the vector, [batch, pos, d_per_layer]), `hook_per_layer_gate`
(`W_gate x`, before the activation), `hook_per_layer_post` (what `W_proj` reads) and
`hook_per_layer_out` (what the block adds, [batch, pos, d_model]); the decompositions count the last
as one component per block (`{l}_per_layer`).

KV sharing: the last `num_kv_shared_layers` blocks have no key or value projections; each attends
with the keys and values the last earlier block of its layer type stored (rotated, normed). Their
attention has no `hook_k` / `hook_v` / `hook_rot_k` points: patching the keys they read means
patching the storing block's, exactly as in Hugging Face. Patching copies that join a sweep's batch
after the storing block equal their target there, so they read the target's stored keys and values
(`runtime/shared_keys.py`); a run started past the storing block (`start_at_layer`) has none and is
refused, naming both blocks.

Experts: the MLP's place holds the dense MLP and the routed experts side by side (`experts.py`).
"""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from ....errors import UnsupportedModelError
from ...hook_tree import BlockHooks, MoEHooks, fire
from ...runtime.devices import bare_forward
from ...runtime.instrument import BlockSpec, _argument_names, _override_forward, instrument_block
from ...runtime.norms import NormKind
from ...runtime.shared_keys import JOINING_KEYS, SHARED_KV, rows_with_joining_keys
from .experts import bind_experts, routed_branch

PER_LAYER_POINTS = ("hook_per_layer_input", "hook_per_layer_gate", "hook_per_layer_post", "hook_per_layer_out")


def storing_layers(text_config: Any) -> dict[int, int]:
    """For each block that reuses keys and values, the block that stores them."""
    modes, types = text_config.kv_sharing_modes, text_config.layer_types
    store = {types[i]: i for i, mode in enumerate(modes) if mode == "store"}
    return {i: store[types[i]] for i, mode in enumerate(modes) if mode == "reuse"}


def keys_for_rows(layer: nn.Module, source: int, kwargs: dict[str, Any], rows: int) -> None:
    """Give a reusing block the storing block's keys and values for each of its `rows` rows (in
    `kwargs`): those the storing block computed, then, for rows that joined the batch after it
    (`joining_keys`), the ones given; without those, refuse, naming both blocks."""
    index, layer_type = layer.self_attn.layer_idx, layer.self_attn.layer_type
    shared = kwargs.get(SHARED_KV) or {}
    stored = shared.get(layer_type)
    joining = getattr(layer, JOINING_KEYS, None)
    if joining is not None:
        kwargs[SHARED_KV] = {**shared, layer_type: rows_with_joining_keys(stored, joining, source, layer_type, rows)}
    elif stored is None:
        raise UnsupportedModelError(
            f"LLM block {index} reuses the keys and values of block {source} (Gemma 4's KV sharing), but block {source} "
            f"did not run: a run that starts after it (start_at_layer > {source}) has no keys there. Start at block "
            f"{source} or earlier (patching and head sweeps over later blocks do this for you)")
    elif stored[0].shape[0] != rows:
        raise UnsupportedModelError(
            f"LLM block {index} computes {rows} rows but block {source}, whose keys and values it reuses (Gemma 4's KV "
            f"sharing), computed {stored[0].shape[0]}: rows that join a batch after block {source} (rows_joining) read "
            f"the keys of the input they copy, which only patching's own schedule knows; let a patching function "
            f"join them, or start every row at block {source} or earlier")


def instrument_gemma4_block(
    layer: nn.Module, hooks: BlockHooks, spec: BlockSpec, use_result: Callable[[], bool], norm: NormKind,
    linear_attention: bool = False, *, source: int | None = None,
) -> None:
    """`instrument_block`, then, for a block with a per-layer input or reused keys, Gemma 4's own
    residual path (see the module docstring); `source` is the block whose keys this one reuses."""
    hf_forward = bare_forward(layer)
    moe = isinstance(hooks.mlp, MoEHooks)
    if moe:  # the dense MLP is hooked as the expert every token goes through (`experts.py`)
        experts, hooks.mlp = hooks.mlp, hooks.mlp.shared_expert
    instrument_block(layer, hooks, spec, use_result, norm, linear_attention)
    if moe:
        hooks.mlp = experts
        bind_experts(layer, experts)
    per_layer = bool(getattr(layer, "hidden_size_per_layer_input", 0))
    if not (per_layer or moe or source is not None):
        return
    if per_layer:
        hooks.add_points(*PER_LAYER_POINTS)
    names = _argument_names(layer)
    attn, ln1, post1, ln2, post2 = (getattr(layer, n) for n in (spec.attn, spec.ln1, spec.post_norms[0], spec.ln2,
                                                                 spec.post_norms[1]))

    def per_layer_branch(x: Tensor, per_layer_input: Tensor) -> Tensor:
        given = fire(hooks.hook_per_layer_input, per_layer_input)
        gate = fire(hooks.hook_per_layer_gate, layer.per_layer_input_gate(x))
        post = fire(hooks.hook_per_layer_post, layer.act_fn(gate) * given)
        return fire(hooks.hook_per_layer_out, layer.post_per_layer_input_norm(layer.per_layer_projection(post)))

    def feed_forward(resid_mid: Tensor) -> Tensor:
        dense = layer.mlp(ln2(resid_mid))
        if not moe:
            return post2(dense)
        dense = fire(hooks.mlp.shared_expert.hook_out, dense)
        routed = layer.post_feedforward_layernorm_2(routed_branch(layer, hooks.mlp, resid_mid))
        return post2(layer.post_feedforward_layernorm_1(dense) + routed)

    def forward(hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        kwargs.update(zip(names, args))
        if source is not None:
            keys_for_rows(layer, source, kwargs, hidden_states.shape[0])
        if not (hooks.residual_hooked() or moe and hooks.mlp.any_hooked()):
            return hf_forward(hidden_states, **kwargs)
        per_layer_input = kwargs.pop("per_layer_input", None)
        resid_pre = fire(hooks.hook_resid_pre, hidden_states)
        attn_out = fire(hooks.hook_attn_out, post1(attn(hidden_states=ln1(resid_pre), **kwargs)[0]))
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + attn_out)
        mlp_out = fire(hooks.hook_mlp_out, feed_forward(resid_mid))
        x = resid_mid + mlp_out
        if per_layer:
            x = x + per_layer_branch(x, per_layer_input)
        return fire(hooks.hook_resid_post, x * getattr(layer, spec.output_scalar))

    _override_forward(layer, forward)
