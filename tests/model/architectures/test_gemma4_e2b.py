"""Gemma 4 E2B / E4B-style LLMs: per-layer inputs (each block gates a per-layer embedding into its
residual after the MLP) and KV sharing (the last blocks attend with keys and values an earlier block
of their type stored; their MLP double-wide). The tier runs on them; the per-layer points mean what
Hugging Face computes, patching the storing block's keys is what the sharing blocks read, sweeps whose
copies join after a storing block equal one full forward per condition, and a run started past the
storing block is refused naming both blocks."""

from __future__ import annotations

import pytest
import torch

from mmlens.errors import HookNameError, UnsupportedModelError
from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.interventions import (CacheMetric, Patch, Run, TokenGroup, baseline, head_sweep, knockout, patch_conditions,
                                  recovery_blocked)
from mmlens.model.architectures.gemma4.per_layer import per_layer_ids
from mmlens.model.runtime.shared_keys import JoiningKeys, joining_keys
from mmlens.testing.families.gemma4 import tiny_gemma4

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

PER_LAYER = dict(llm_layers=5, per_layer_input=8, kv_shared_layers=2, double_wide_mlp=True)
STORES = {"sliding_attention": 1, "full_attention": 2}  # the last unshared block of each type in 5 layers
REUSES = {3: 1, 4: 2}

family, eager, builder = tier.fixtures({
    "per_layer_kv_shared": lambda attn: tiny_gemma4(attn_implementation=attn, **PER_LAYER),
    "per_layer_vision_bidirectional": lambda attn: tiny_gemma4(attn_implementation=attn, bidirectional_attention="vision",
                                                               **PER_LAYER),
}, eager_variants=["per_layer_kv_shared"])


@torch.no_grad()
def test_llm_keywords_reach_every_run_from_merged_embeddings(eager, monkeypatch):
    """The tier's test, with the per-layer embeddings' ids given to Hugging Face as `per_layer_inputs`:
    started from embeddings, Hugging Face would invert the embedding to find them, which image
    features are not rows of. Runs from the merged embeddings (ours) carry them themselves."""
    model, inputs = eager.model, eager.inputs
    ids = per_layer_ids(model.hf_model.config, inputs.input_ids)
    looked_up = eager.reference.model.language_model.get_per_layer_inputs(ids)
    zero = torch.zeros_like(inputs.input_ids)
    _, cache = model.run_with_cache(inputs, names_filter=["hook_multimodal_embed", "blocks.1.hook_resid_pre"])
    embeds = cache["hook_multimodal_embed"]
    torch.testing.assert_close(model(inputs, llm_inputs_embeds=embeds), model(inputs), atol=1e-5, rtol=0)
    own = model.architecture.llm_keywords
    monkeypatch.setattr(model.architecture, "llm_keywords", lambda hf, kw: {**own(hf, kw), "position_ids": zero})
    moved = model(inputs, llm_inputs_embeds=embeds)
    rules = {k: inputs.extra[k] for k in model.architecture.llm_input_names}
    theirs = eager.reference(inputs_embeds=embeds, attention_mask=inputs.attention_mask, **rules, position_ids=zero,
                             per_layer_inputs=looked_up).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(moved[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (moved - model(inputs))[valid].abs().max() > 1e-4, "the positions were used"


@torch.no_grad()
def test_per_layer_points_are_hugging_faces_per_layer_branch(eager):
    """`hook_per_layer_input` is Hugging Face's per-layer input (image tokens looked up as the pad
    token, plus the projection of the merged embeddings); the gate, product and output follow it."""
    model, inputs = eager.model, eager.inputs
    layer = 1
    names = [f"blocks.{layer}.hook_{p}" for p in ("resid_mid", "mlp_out", "per_layer_input", "per_layer_gate",
                                                   "per_layer_post", "per_layer_out", "resid_post", "multimodal_embed")]
    names[-1] = "hook_multimodal_embed"
    _, cache = model.run_with_cache(inputs, names_filter=names)
    lm = eager.reference.model.language_model
    ids = per_layer_ids(model.hf_model.config, inputs.input_ids)
    image = inputs.input_ids == model.cfg.image_token_id
    assert (ids[image] == model.hf_model.config.text_config.pad_token_id).all() and torch.equal(ids[~image], inputs.input_ids[~image])
    expected = lm.project_per_layer_inputs(cache["hook_multimodal_embed"], lm.get_per_layer_inputs(ids))[:, :, layer]
    torch.testing.assert_close(cache[names[2]], expected, atol=1e-6, rtol=0)
    hf_layer = lm.layers[layer]
    x = cache[names[0]] + cache[names[1]]
    torch.testing.assert_close(cache[names[3]], hf_layer.per_layer_input_gate(x))
    torch.testing.assert_close(cache[names[4]], hf_layer.act_fn(cache[names[3]]) * cache[names[2]])
    torch.testing.assert_close(cache[names[5]], hf_layer.post_per_layer_input_norm(hf_layer.per_layer_projection(cache[names[4]])))
    torch.testing.assert_close(cache[names[6]], (x + cache[names[5]]) * hf_layer.layer_scalar)


@torch.no_grad()
def test_zeroing_the_per_layer_input_equals_hugging_face_without_it(eager):
    """Patching `hook_per_layer_input` is patching Hugging Face's `per_layer_inputs[:, :, l]`."""
    model, inputs = eager.model, eager.inputs
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    ours = model.run_with_hooks(inputs, fwd_hooks=[("blocks.2.hook_per_layer_input", zero)])
    lm = eager.reference.model.language_model
    original = lm.project_per_layer_inputs

    def without_layer_2(embeds, per_layer_inputs=None):
        out = original(embeds, per_layer_inputs).clone()
        out[:, :, 2] = 0
        return out

    lm.project_per_layer_inputs = without_layer_2
    try:
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    finally:
        del lm.project_per_layer_inputs
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4


@torch.no_grad()
def test_sharing_blocks_have_no_key_points_and_read_the_storing_blocks_keys(eager):
    model, inputs = eager.model, eager.inputs
    names = set(model.hook_names())
    for layer, source in REUSES.items():
        assert f"blocks.{layer}.attn.hook_q" in names and f"blocks.{source}.attn.hook_k" in names
        for point in ("hook_k", "hook_v", "hook_rot_k", "k_ln.hook_scale"):
            assert f"blocks.{layer}.attn.{point}" not in names
        with pytest.raises(HookNameError, match=rf"block {layer} has no keys or values of its own, it reuses block "
                                                rf"{source}'s.*blocks\.{source}\.attn\.hook_v"):
            model.run_with_hooks(inputs, fwd_hooks=[(f"blocks.{layer}.attn.hook_v", lambda x, hook: x)])
    # zeroing the storing block's values changes the sharing block's z exactly as Hugging Face would
    zero = lambda x, hook: torch.zeros_like(x)  # noqa: E731
    source, layer = STORES["full_attention"], 4
    with model.hooks(fwd_hooks=[(f"blocks.{source}.attn.hook_v", zero)]):
        _, cache = model.run_with_cache(inputs, names_filter=[f"blocks.{source}.attn.hook_z", f"blocks.{layer}.attn.hook_z"])
    assert cache[f"blocks.{source}.attn.hook_z"].abs().max() == 0
    assert cache[f"blocks.{layer}.attn.hook_z"].abs().max() == 0, "block 4 attends with block 2's values"
    hf_v = eager.reference.model.language_model.layers[source].self_attn.v_norm
    calls = []
    handle = hf_v.register_forward_hook(lambda m, i, out: (calls.append(1), torch.zeros_like(out))[1])
    try:
        theirs = eager.reference(**inputs.hf_kwargs()).logits
    finally:
        handle.remove()
    with model.hooks(fwd_hooks=[(f"blocks.{source}.attn.hook_v", zero)]):
        ours = model(inputs)
    valid = inputs.attention_mask.bool()
    assert calls and torch.allclose(ours[valid], theirs[valid], atol=1e-5, rtol=0)


def test_sharing_blocks_have_no_key_weights_and_say_where_they_are(eager):
    """The TL weight views of a sharing block: its own W_Q and W_O, and no W_K / W_V / QK / OV, each
    refused naming where the keys live rather than falling through as a missing attribute."""
    model = eager.model
    layer = next(iter(REUSES))
    attn = model.blocks[layer].attn
    assert attn.W_Q.shape[0] == model.cfg.llm.n_heads and attn.W_O.shape[0] == model.cfg.llm.n_heads
    for view in ("W_K", "W_V", "b_K", "QK", "OV", "repeat_kv_heads"):
        with pytest.raises(UnsupportedModelError, match="KV sharing.*key_value_layer"):
            getattr(attn, view)
    with pytest.raises(UnsupportedModelError, match="KV sharing|per layer|differ"):
        model.W_K


@torch.no_grad()
def test_knockout_reaches_the_sharing_blocks(eager):
    """A knockout on a sharing block alone edits its mask, not its (borrowed) keys: equal to Hugging
    Face with the 4D mask applied there only is what the tier checks for all layers; here one block."""
    model, inputs = eager.model, eager.inputs
    corner = TokenGroup.box(0, 0, 2, 2)
    ko = knockout(model, inputs, queries=TokenGroup.image() - corner, keys=corner, layers=[4], verify=True)
    with ko:
        ours = model(inputs)
    assert ko.n_blocked_edges > 0 and ko.blocked_mass == {4: 0.0}
    assert (ours - model(inputs))[inputs.attention_mask.bool()].abs().max() > 1e-5


@torch.no_grad()
def test_runs_past_the_storing_block_are_refused_naming_it(eager):
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs, names_filter=["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"])
    torch.testing.assert_close(model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, tokens=inputs), model(inputs))
    with pytest.raises(UnsupportedModelError, match=r"block 3 reuses the keys and values of block 1.*start_at_layer > 1"):
        model(cache["blocks.2.hook_resid_pre"], start_at_layer=2, tokens=inputs)


def test_double_wide_mlps_keep_their_own_width_in_the_decomposition(eager):
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    widths = [block.mlp.W_out.shape[0] for block in model.blocks]
    assert widths[3] == widths[4] == 2 * widths[0] == 2 * model.cfg.d_mlp
    full, labels = cache.get_full_resid_decomposition(5, expand_neurons=True, return_labels=True)
    assert len(labels) == full.shape[0] and f"L4N{widths[4] - 1}" in labels
    torch.testing.assert_close(full.sum(0), cache["blocks.4.hook_resid_post"], atol=1e-4, rtol=1e-4)
    parts, part_labels = cache.decompose_resid(5, return_labels=True)
    assert [l for l in part_labels if l.endswith("_per_layer")] == [f"{l}_per_layer" for l in range(5)]
    torch.testing.assert_close(parts.sum(0), cache["blocks.4.hook_resid_post"], atol=1e-4, rtol=1e-4)


def test_bridge_names_of_the_per_layer_input(eager):
    """TransformerBridge wraps the per-layer input's linears and norm as parts of each block."""
    tier.assert_bridge_aliases(eager.model, eager.inputs, {
        "blocks.3.per_layer_input_gate.hook_out": "blocks.3.hook_per_layer_gate",
        "blocks.3.per_layer_projection.hook_in": "blocks.3.hook_per_layer_post",
        "blocks.3.post_per_layer_input_norm.hook_out": "blocks.3.hook_per_layer_out",
        "blocks.0.mlp.gate.hook_out": "blocks.0.mlp.hook_pre",
    })


LAST = "blocks.4.hook_resid_post"
FINAL_NORM_OF_LAST_TOKEN = CacheMetric(lambda acts, inp: acts[LAST][:, -1].norm(dim=-1), [LAST])


def by_hand(model, inputs, target_edit, hooks):
    """The metric of one full forward of the target (its edit's hooks first) with `hooks` added,
    as a TransformerLens user patches: no copies, no batch that grows."""
    read = {}
    model.run_with_hooks(inputs, fwd_hooks=[*target_edit.hooks, *hooks, (LAST, lambda x, hook: read.__setitem__(LAST, x))])
    return FINAL_NORM_OF_LAST_TOKEN(read, inputs)


@torch.no_grad()
def test_head_sweep_over_every_layer_equals_one_forward_per_head(eager):
    """Every head of every block, sharing blocks included: copies that join the batch after a storing
    block read the target's stored keys there, as a full forward of the target patched at that head
    does. The default chunks mix layers (copies join after the leading target replica computed the
    storing blocks); four heads a chunk start each forward at its layer, past the storing blocks."""
    model, inputs = eager.model, eager.inputs
    target = recovery_blocked(model, inputs)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.llm.n_heads
    mixed = head_sweep(model, Run(inputs), target, FINAL_NORM_OF_LAST_TOKEN)
    one_layer_each = head_sweep(model, Run(inputs), target, FINAL_NORM_OF_LAST_TOKEN, chunk_size=n_heads)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    _, clean = model.run_with_cache(inputs, names_filter=names)
    blocked = target.edit(inputs)
    for layer in range(n_layers):
        for head in range(n_heads):
            def put_head(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = clean[hook.name][:, :, head]
                return z

            expected = by_hand(model, inputs, blocked, [(names[layer], put_head)])
            torch.testing.assert_close(mixed[layer, head], expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(one_layer_each[layer, head], expected, atol=1e-5, rtol=1e-5)
    # the sharing blocks' keys come from the blocked target, not from the clean source
    assert (mixed[max(REUSES)] - baseline(model, target, FINAL_NORM_OF_LAST_TOKEN)).abs().max() > 1e-4


@torch.no_grad()
def test_patching_past_the_storing_blocks_equals_hand_hooks(eager):
    """Residual patches at the last token and head patches at and after the storing blocks, batched
    in one forward whose copies join at different blocks, each equal to a full forward with a hand
    hook."""
    model, inputs = eager.model, eager.inputs
    target = recovery_blocked(model, inputs)
    last_token = torch.zeros(inputs.input_ids.shape, dtype=torch.bool)
    last_token[:, -1] = True
    layers = sorted({*STORES.values(), *REUSES})
    conditions = [Patch(f"blocks.{l}.hook_resid_pre", last_token) for l in layers]
    conditions += [Patch(f"blocks.{l}.attn.hook_z", heads=(l % model.cfg.llm.n_heads,)) for l in layers]
    effects = patch_conditions(model, Run(inputs), target, FINAL_NORM_OF_LAST_TOKEN, conditions)
    _, clean = model.run_with_cache(inputs, names_filter=[p.hook for p in conditions])
    blocked = target.edit(inputs)
    for condition, effect in zip(conditions, effects):
        def patch(x, hook, condition=condition):
            x = x.clone()
            if condition.heads is None:
                x[condition.positions] = clean[hook.name][condition.positions]
            else:
                x[:, :, condition.heads] = clean[hook.name][:, :, condition.heads]
            return x

        torch.testing.assert_close(effect, by_hand(model, inputs, blocked, [(condition.hook, patch)]), atol=1e-5, rtol=1e-5)
    assert (effects[0] - effects[len(layers) - 1]).abs().max() > 1e-4, "the patches change the metric"


@torch.no_grad()
def test_rows_joining_with_other_keys_than_planned_stop_the_run(eager):
    """The invariant behind reusing the target's keys: a storing block computes exactly the rows that
    joined at or before its attention. A plan that disagrees stops the run instead of giving a row
    keys that are not its own."""
    model, inputs = eager.model, eager.inputs
    layers = model.architecture.llm_layers(model.hf_model)
    planned = JoiningKeys(stored={}, computed={source: 2 * len(inputs) for source in STORES.values()})
    with joining_keys(layers, planned), pytest.raises(RuntimeError, match=r"internal error.*block 1 computed 3 rows where 6"):
        model(inputs)
    assert model(inputs).isfinite().all(), "the plan is gone after the block"


def test_every_analysis_runs():
    """The studies end to end, the head sweep and find_recovery_heads over every block, sharing ones
    included (a seed whose random probe confuses some classes, which the anchor study needs)."""
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    model = HookedMLLM.from_hf(*tiny_gemma4(**PER_LAYER, seed=2))
    heads = tier.every_analysis_runs(model, scenes)
    assert set(heads.table.layer) == set(range(model.cfg.n_layers))
