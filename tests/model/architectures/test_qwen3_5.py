"""Qwen3.5: Qwen3-VL's tower without deepstack, a hybrid LLM of linear-attention (gated delta rule)
and gated full-attention layers. The tier runs on a tiny model whose layers are full, linear,
linear, full; the tier's attention edits, which cover every layer, run here on the full-attention
layers, and covering a linear one is refused (the linear layers' own points are tested in
`tests/model/test_linear_attention.py`, with the refusals)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, UnsupportedModelError
from mmlens.experiments import anchor_knockout, conflicting_pairs, find_recovery_heads, position_study
from mmlens.interventions import CacheMetric, Run, TokenGroup, bidirectional_image_attention, head_sweep, knockout, recovery_blocked
from mmlens.model.architectures.qwen3_5 import QWEN3_5_BLOCK, Qwen3_5
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.probing import probe_sweep
from mmlens.testing.families.qwen3_5 import tiny_qwen3_5

import family_tier as tier
import test_qwen2_vl as qwen2
import test_qwen3_vl as qwen3
from family_tier import assert_bridge_aliases
from family_tier import *  # noqa: F403 - the family tier's tests, run on this file's fixtures

# Qwen2-VL's own checks on this file's fixtures; Qwen3-VL's raster check (its position grid), and a
# hybrid version of the every-analysis run below
_OWN = {"test_vision_gather_reads_raster_patches", "test_every_analysis_runs"}
globals().update({test.__name__: test for test in qwen2.QWEN_TESTS if test.__name__ not in _OWN})
test_vision_gather_reads_raster_patches = qwen3.test_vision_gather_reads_raster_patches
family, eager, builder = tier.fixtures({"qwen3.5": lambda attn: tiny_qwen3_5(attn_implementation=attn)})
FULL, LINEAR = [0, 3], [1, 2]  # tiny_qwen3_5's layer types


def _valid_close(ours, theirs, inputs):
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)


def test_the_config_names_the_linear_layers(eager):
    assert eager.model.cfg.llm.linear_attention_layers == tuple(LINEAR)
    names = eager.model.hook_names()
    assert "blocks.1.linear_attn.hook_beta" in names and "blocks.1.attn.hook_pattern" not in names
    assert "blocks.0.attn.hook_q_gate" in names and "blocks.0.linear_attn.hook_beta" not in names
    with pytest.raises(AttributeError, match="linear attention .* no `attn`"):
        eager.model.blocks[1].attn


@torch.no_grad()
def test_knockout_equals_hf_with_its_mask(eager):
    """(The tier's test, on the full-attention layers.) Hugging Face takes one mask per layer type:
    the 4D mask for attention, the padding mask for the linear layers, as a 2-D mask would give."""
    model, inputs = eager.model, eager.inputs
    corner = TokenGroup.box(0, 0, 2, 2)
    ko = knockout(model, inputs, queries=TokenGroup.image() - corner, keys=corner, layers=FULL, verify=True)
    with ko:
        ours = model(inputs)
    assert ko.n_blocked_edges > 0 and set(ko.blocked_mass) == set(FULL) and not any(ko.blocked_mass.values())
    allowed = model.attention_edges(inputs) & ~ko.blocked.cpu()
    plain = {k: v for k, v in inputs.hf_kwargs().items() if k != "attention_mask"}
    plain.update(model.architecture.llm_keywords(model.hf_model, inputs.hf_kwargs()))
    theirs = eager.reference(**plain, attention_mask=model.architecture.hf_attention_mask(allowed)).logits
    _valid_close(ours, theirs, inputs)
    assert (ours - model(inputs))[inputs.attention_mask.bool()].abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_bidirectional_edit_equals_the_bidirectional_mode(eager):
    """(The tier's test, on the full-attention layers: the bidirectional mode opens image blocks
    in those only; the linear layers' recurrence stays causal.)"""
    model, inputs = eager.model, eager.inputs
    with model.using_image_attention("bidirectional"):
        native = model(inputs)
    causal = model(inputs)
    with bidirectional_image_attention(model, inputs, layers=FULL):
        edited = model(inputs)
    _valid_close(edited, native, inputs)
    assert (edited - causal)[inputs.attention_mask.bool()].abs().max() > 1e-4


@torch.no_grad()
def test_the_output_gate_is_applied_before_hook_z(eager):
    """`attn.hook_q_gate` is the second half of each head's q_proj output; `hook_z` is the heads'
    output (pattern times values) times its sigmoid, and o_proj of it is the attention output."""
    model, inputs = eager.model, eager.inputs
    point = "blocks.3.attn.hook_{}"
    names = [point.format(p) for p in ("q_gate", "pattern", "v", "z")] + ["blocks.3.ln1.hook_normalized", "blocks.3.hook_attn_out"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    attn = model.hf_model.model.language_model.layers[3].self_attn
    projected = attn.q_proj(cache["blocks.3.ln1.hook_normalized"]).unflatten(-1, (model.cfg.n_heads, -1))
    gate = cache[point.format("q_gate")]
    assert torch.equal(gate, projected[..., model.cfg.d_head:])
    values = cache[point.format("v")].repeat_interleave(model.cfg.n_heads // model.cfg.n_key_value_heads, dim=2)
    ungated = torch.einsum("bhqk,bkhd->bqhd", cache[point.format("pattern")], values)
    torch.testing.assert_close(cache[point.format("z")], ungated * torch.sigmoid(gate), atol=1e-6, rtol=0)
    torch.testing.assert_close(attn.o_proj(cache[point.format("z")].flatten(-2)), cache["blocks.3.hook_attn_out"], atol=1e-6, rtol=0)


@torch.no_grad()
def test_w_q_reads_the_query_rows_of_the_gated_projection(eager):
    """`W_Q` skips the gate rows q_proj interleaves with each head's queries: the normalised input
    times it is `hook_q`; the heads are the attention's, not twice as many."""
    model, inputs = eager.model, eager.inputs
    names = ["blocks.0.ln1.hook_normalized", "blocks.0.attn.hook_q"]
    _, cache = model.run_with_cache(inputs, names_filter=names)
    attn = model.blocks[0].attn
    assert attn.W_Q.shape == (model.cfg.n_heads, model.cfg.d_model, model.cfg.d_head)
    assert attn.repeat_kv_heads == model.cfg.n_heads // model.cfg.n_key_value_heads
    torch.testing.assert_close(torch.einsum("bpm,hmd->bphd", cache[names[0]], attn.W_Q), cache[names[1]], atol=1e-5, rtol=0)


def test_a_spec_without_rotary_is_refused(builder, monkeypatch):
    """(The tier's test_wrong_spec_is_refused, which drops the output gate too, runs as well: the
    gate check below refuses it.) Keeping the gate and ignoring the rotary embedding leaves plain
    logits exact; the probe run refuses it at the first attention layer."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3_5, "llm_block", replace(QWEN3_5_BLOCK, attention=replace(QWEN3_5_BLOCK.attention, rotary=False)))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec: with hooks active"):
        HookedMLLM.from_hf(hf_model, processor)


def test_a_spec_without_the_output_gate_is_refused_naming_the_gate(builder, monkeypatch):
    """Forgetting the gate would read q_proj's query-and-gate rows as twice the heads: loading
    refuses it naming the block, q_proj and the missing gate, before any forward."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3_5, "llm_block", replace(QWEN3_5_BLOCK, attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm")))
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 \(Qwen3_5DecoderLayer\) does not match its block spec: "
                                                    r"its attention's q_proj emits 128 rows \(each head's queries and its "
                                                    r"output gate; 4 heads of 16\).*output_gate=False\. Set output_gate=True"):
        HookedMLLM.from_hf(hf_model, processor)


def test_a_hooked_forward_that_fails_names_its_block(builder, monkeypatch):
    """Without the gate check, the same spec's maths fails on the block's tensors: the spec check
    names the block it failed in."""
    hf_model, processor = builder()
    monkeypatch.setattr(Qwen3_5, "llm_block", replace(QWEN3_5_BLOCK, attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm")))
    monkeypatch.setattr(Qwen3_5, "check_output_gate", lambda self, hf_model, cfg: None)
    with pytest.raises(UnsupportedModelError, match=r"the forward fails in blocks\.0 \(Qwen3_5DecoderLayer\) "):
        HookedMLLM.from_hf(hf_model, processor)


def test_unknown_layer_types_are_refused():
    hf_model, processor = tiny_qwen3_5(layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(UnsupportedModelError, match=r"layer_types \['sliding_attention'\] are not supported"):
        HookedMLLM.from_hf(hf_model, processor)


# a mixer's names resolve only in blocks of its kind (layers 0 and 3 attend, 1 and 2 are linear)
WITHHELD_BRIDGE_NAMES = (
    *(f"blocks.{l}.linear_attn.{p}" for l in FULL for p in ("hook_out", "hook_linear_attn_out", "hook_ssm_out")),
    *(f"blocks.{l}.attn.hook_out" for l in LINEAR),
)
BRIDGE_NAMES = {
    "vision_encoder.blocks.1.hook_out": "vision.blocks.1.hook_resid_post",
    "vision_encoder.blocks.0.mlp.linear_fc1.hook_out": "vision.blocks.0.mlp.hook_pre",
    "vision_projector.hook_out": "adapter.hook_out",
    "blocks.1.hook_in": "blocks.1.hook_resid_pre",
    "blocks.0.attn.q_norm.hook_out": "blocks.0.attn.q_ln.hook_normalized",
    "blocks.0.attn.hook_out": "blocks.0.hook_attn_out",
    "blocks.1.linear_attn.hook_out": "blocks.1.hook_attn_out",
    "blocks.2.linear_attn.hook_ssm_C": "blocks.2.linear_attn.hook_q",
    "blocks.2.linear_attn.hook_ssm_decay": "blocks.2.linear_attn.hook_log_decay",
    "blocks.2.linear_attn.hook_ssm_write": "blocks.2.linear_attn.hook_beta",
}


def test_bridge_hook_names_are_aliases(eager):
    assert_bridge_aliases(eager.model, eager.inputs, BRIDGE_NAMES)
    for name in WITHHELD_BRIDGE_NAMES:
        with pytest.raises(Exception, match="unknown hook name"):
            eager.model.resolve_hook_name(name)


def test_every_analysis_runs(eager):
    """The tier's analyses on a hybrid model: probes and vision knockouts as everywhere; LLM
    knockouts, head sweeps (= one head at a time = patched by hand), the anchor knockout, the
    position study's bidirectional condition and the recovery-head search (its heads and its
    blocked window) on the full-attention layers; covering a linear layer is refused by name
    (`tests/model/test_linear_attention.py`)."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=12, seed=0, image_size=32)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    sites = ["vision.blocks.0.hook_resid_post", "adapter.hook_out", "blocks.1.hook_resid_post", last]
    sweep = probe_sweep(model, scenes, sites=sites, probe="ridge", progress=False, alpha=1e-2)
    assert set(sweep.table.hook) >= set(sites)
    inputs = model.prepare([scenes[i]["image"] for i in range(2)], "")
    for stage, layers in (("llm", FULL), ("vision", range(model.cfg.vision.n_layers))):
        ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.box(0, 0, 1, 1), layers=layers,
                      stage=stage, verify=True)
        with ko:
            model(inputs)
        assert ko.n_blocked_edges > 0 and not any(ko.blocked_mass.values())
    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    blocked = recovery_blocked(model, inputs, layers=FULL)
    effects = head_sweep(model, Run(inputs), blocked, metric, layers=FULL)
    assert effects.shape == (len(FULL), model.cfg.n_heads, len(inputs))
    torch.testing.assert_close(effects, head_sweep(model, Run(inputs), blocked, metric, layers=FULL, chunk_size=1),
                               atol=1e-5, rtol=1e-5)
    _, clean = model.run_with_cache(inputs, names_filter="blocks.3.attn.hook_z")

    def put_head(z, hook):
        z = z.clone()
        z[:, :, 1] = clean[hook.name][:, :, 1]
        return z

    read = {}
    model.run_with_hooks(inputs, fwd_hooks=[*blocked.edit(inputs).hooks, ("blocks.3.attn.hook_z", put_head),
                                            (last, lambda x, hook: read.__setitem__(last, x))])
    torch.testing.assert_close(effects[1, 1], metric(read, inputs), atol=1e-5, rtol=1e-5)
    result = anchor_knockout(model, sweep, n_control=1, images=range(len(scenes)), layers=FULL,
                             pairs=conflicting_pairs(sweep, "adapter.hook_out", 4))
    assert result.blocked_mass == 0.0
    study = position_study(model, scenes, layers=FULL, probe="ridge", sites=[last], exclude=[])
    assert len(study.per_position) and set(study.gains.tokens) == {"early", "late"}
    # the heads chosen on the probes' training images (the plumbing is the point), scored on the held-out ones
    chosen_on = dict(selection_images=sweep.train_indices, n_images=None, tokens="all")
    heads = find_recovery_heads(model, sweep, layers=FULL, window=FULL, n_maps=1, top_k=2, **chosen_on)
    assert sorted(set(heads.table.layer)) == FULL and len(heads.table) == len(FULL) * model.cfg.n_heads
    assert heads.attribution.shape[:2] == (len(FULL), model.cfg.n_heads) and set(heads.layers) <= set(FULL)
    assert len(heads.maps) == 1 and set(heads.maps[0].attention) <= set(FULL)
    with pytest.raises(InputError, match=r"head patching .*LLM layers \[1, 2\].* are linear-attention layers"):
        find_recovery_heads(model, sweep, window=FULL, **chosen_on)
