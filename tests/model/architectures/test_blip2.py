"""BLIP-2 and InstructBLIP: BLIP's tower -> a Q-Former (learned queries cross-attending to the
image; InstructBLIP's also reading the instruction) -> OPT (BLIP-2) or Llama (InstructBLIP).

The tier's tests that apply run on the tiny model; the others are replaced by BLIP-2's versions
below, each saying why: the queries have no pixel grid (the layout contract, the knockout's token
box, probes at the adapter and LLM), and Hugging Face's BLIP-2 returns no `image_hidden_states`
and cannot run from `inputs_embeds` alone (the cache and LLM-keyword checks).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import (
    Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, InstructBlipConfig, InstructBlipForConditionalGeneration,
    LlamaConfig, T5Config,
)

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import InputError, LayoutMismatchError, UnsupportedModelError
from mmlens.interventions import CacheMetric, Run, TokenGroup, head_sweep, knockout
from mmlens.model.architectures import architecture_for
from mmlens.model.architectures.blip2 import Blip2PromptProcessor
from mmlens.model.architectures.blip2.instructblip import InstructBlipOpt
from mmlens.model.architectures.blip2.t5 import Blip2T5, InstructBlipT5
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.model.images.layout import LEARNED_QUERY_KIND, LearnedQueryLayout
from mmlens.probing import probe_sweep
from mmlens.testing.families.blip2 import tiny_blip2, tiny_instructblip, tiny_instructblip_opt
from mmlens.testing.families.common import text_kwargs

import family_tier as tier
from conftest import random_images
from family_tier import (  # noqa: F401 - the family tier's tests that apply, run on this file's fixtures
    test_bidirectional_edit_equals_the_bidirectional_mode, test_bridge_aliases_resolve_to_real_hook_points,
    test_family_keywords_travel_everywhere, test_hooks_off_equal_hf_bit_for_bit, test_identity_hooks_everywhere_equal_hf,
    test_mask_geometry_is_a_mask_geometry,
)

# InstructBLIP over OPT is Hugging Face's own test configuration (the released ones are Vicuna and Flan-T5)
family, eager, builder = tier.fixtures({"blip2": lambda attn: tiny_blip2(attn_implementation=attn),
                                        "instructblip": lambda attn: tiny_instructblip(attn_implementation=attn),
                                        "instructblip_opt": lambda attn: tiny_instructblip_opt(attn_implementation=attn)})


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def queries_of(inputs) -> torch.Tensor:
    return inputs.layout.special_positions(LEARNED_QUERY_KIND)


@torch.no_grad()
def test_cache_equals_hf_at_every_stage(eager):
    """Tower, Q-Former (each block's output and each cross-attention pattern), adapter output and
    LLM residuals equal Hugging Face's own outputs; the queries' LLM positions hold the projection."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    _, cache = model.run_with_cache(inputs)
    pixels = inputs.pixel_values
    tower = reference.vision_model(pixels, output_hidden_states=True)
    for layer in range(model.cfg.vision.n_layers):
        close(cache[f"vision.blocks.{layer}.hook_resid_post"], tower.hidden_states[layer + 1])
    torch.testing.assert_close(cache["adapter.hook_in"], tower.last_hidden_state, atol=1e-5, rtol=0)
    queries = reference.query_tokens.expand(len(pixels), -1, -1)
    instruction = {}  # InstructBLIP's Q-Former reads the prompt after the queries, as Hugging Face's forward gives it
    if "qformer_input_ids" in inputs.extra:
        text_mask = inputs.extra["qformer_attention_mask"]
        instruction = {"input_ids": inputs.extra["qformer_input_ids"],
                       "attention_mask": torch.cat([torch.ones(queries.shape[:2], dtype=text_mask.dtype), text_mask], 1)}
    qformer = reference.qformer(query_embeds=queries, encoder_hidden_states=tower.last_hidden_state,
                                output_hidden_states=True, output_attentions=True, **instruction)
    crossing = [i for i, layer in enumerate(reference.qformer.encoder.layer) if layer.has_cross_attention]
    assert crossing == [0, 2] and len(qformer.cross_attentions) == 2
    for i, layer in enumerate(crossing):
        close(cache[f"adapter.blocks.{layer}.cross_attn.hook_pattern"], qformer.cross_attentions[i])
    n_queries = queries.shape[1]
    for layer in range(len(reference.qformer.encoder.layer)):  # the queries' rows, then the instruction's
        out = qformer.hidden_states[layer + 1]
        close(cache[f"adapter.blocks.{layer}.ln2.hook_normalized"], out[:, :n_queries])
        if instruction:
            close(cache[f"adapter.blocks.{layer}.ln2_text.hook_normalized"], out[:, n_queries:])
    torch.testing.assert_close(cache["adapter.hook_hidden"], qformer.last_hidden_state[:, :n_queries], atol=1e-5, rtol=0)
    projected = reference.language_projection(qformer.last_hidden_state[:, :n_queries])
    torch.testing.assert_close(cache["adapter.hook_out"], projected, atol=1e-5, rtol=0)
    assert torch.equal(cache["hook_multimodal_embed"][queries_of(inputs)], cache["adapter.hook_out"].flatten(0, 1))
    ref = reference(**inputs.hf_kwargs(), output_hidden_states=True).language_model_outputs
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)


def test_learned_query_layout(eager):
    """Every placeholder is one query of one image, in its attention block; each image's segment
    holds its tower's patch grid (tiling the image, CLS left out) and no token; the vision stage
    reads as in any family, and reading the adapter or LLM at pixel boxes is refused by name."""
    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    assert isinstance(layout, LearnedQueryLayout) and layout.vision_shape == (3, 17) and layout.adapter_shape == (3, 6)
    placeholders = inputs.input_ids.cpu() == model.cfg.image_token_id
    assert torch.equal(queries_of(inputs), placeholders) and placeholders.sum() == 3 * 6
    assert torch.equal(layout.image_of_position() >= 0, placeholders)
    assert not layout.image_token_mask().any(), "queries are no grid tokens"
    for span in layout.spans:
        (segment,) = span.segments
        assert len(segment.tokens) == 0 and (segment.patch_to_token == -1).all()
        cover = torch.zeros(span.canvas, dtype=torch.long)
        for y0, x0, y1, x1 in segment.patches.boxes.tolist():
            cover[y0:y1, x0:x1] += 1
        assert (cover == 1).all()
        assert torch.equal(segment.vision_index[1], torch.arange(1, 17))
    _, cache = model.run_with_cache(inputs, names_filter=["vision.blocks.1.hook_resid_post", "blocks.0.hook_resid_post"])
    vision = cache["vision.blocks.1.hook_resid_post"]
    assert torch.equal(layout.gather("vision", vision), vision[:, 1:])
    with pytest.raises(LayoutMismatchError, match="learned queries .* no pixel grid"):
        layout.gather("llm", cache["blocks.0.hook_resid_post"])
    assert isinstance(layout.repeat(2), LearnedQueryLayout)


def text_cut_off_from_the_last_queries(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits with text reading the last three queries of its image blocked in every LLM layer
    (verified: no attention left on them), and the attention edges that leaves."""
    late = queries_of(inputs) & (torch.arange(inputs.input_ids.shape[1]) >= 3)
    ko = knockout(model, inputs, queries=TokenGroup.text(), keys=TokenGroup.from_mask(late, "the last 3 queries"),
                  layers=range(model.cfg.n_layers), verify=True)
    with ko:
        ours = model(inputs)
    assert ko.n_blocked_edges > 0 and all(mass == 0.0 for mass in ko.blocked_mass.values())
    return ours, model.attention_edges(inputs) & ~ko.blocked.cpu()


@torch.no_grad()
def test_knockout_of_the_queries_equals_hf_with_its_mask(eager):
    """Text reading the last three queries of its image, blocked in every LLM layer, equals Hugging
    Face run with the same 4D mask (and OPT's positions, which it reads off the 2-D mask)."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    ours, allowed = text_cut_off_from_the_last_queries(model, inputs)
    plain = {k: v for k, v in inputs.hf_kwargs().items() if k != "attention_mask"}
    positions = model.architecture.llm_keywords(model.hf_model, inputs.hf_kwargs())  # OPT's, read off the 2-D mask
    theirs = reference(**plain, attention_mask=model.architecture.hf_attention_mask(allowed), **positions).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_runs_from_merged_embeddings_take_opts_positions(eager, monkeypatch):
    """Runs that start from the merged embeddings give the LLM its positions (OPT reads them off the
    2-D mask): the shortcut and runs resumed at a block equal the full forward; positions moved to 0
    equal Hugging Face's LLM given them."""
    model, inputs, reference = eager.model, eager.inputs, eager.reference
    names = ["hook_multimodal_embed", "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    full, cache = model.run_with_cache(inputs, names_filter=names)
    embeds = cache["hook_multimodal_embed"]
    torch.testing.assert_close(model(inputs, llm_inputs_embeds=embeds), full, atol=1e-5, rtol=0)
    for layer in (0, 1):  # the residual entering the block, which holds OPT's positions already
        resumed = model(cache[f"blocks.{layer}.hook_resid_pre"], start_at_layer=layer, tokens=inputs)
        torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)
    zero = torch.zeros_like(inputs.input_ids)
    monkeypatch.setattr(model.architecture, "llm_keywords", lambda hf_model, keywords: {"position_ids": zero})
    moved = model(inputs, llm_inputs_embeds=embeds)
    theirs = reference.language_model(inputs_embeds=embeds, attention_mask=inputs.attention_mask, position_ids=zero).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(moved[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (moved - model(inputs))[valid].abs().max() > 1e-4, "the positions were used"


@torch.no_grad()
def test_without_cross_attention_the_queries_do_not_see_the_image(eager):
    """Zeroing every Q-Former cross-attention output leaves the queries nothing of the image: two
    different images give the same adapter output, which then differs from the clean run's."""
    model = eager.model
    inputs = model.prepare(random_images(2, seed=3, sizes=((32, 32), (32, 32))), "")
    names = [f"adapter.blocks.{i}.hook_cross_attn_out" for i in (0, 2)]
    read = {}
    hooks = [(name, lambda x, hook: torch.zeros_like(x)) for name in names]
    model.run_with_hooks(inputs, fwd_hooks=[*hooks, ("adapter.hook_out", lambda x, hook: read.__setitem__("out", x))])
    _, clean = model.run_with_cache(inputs, names_filter="adapter.hook_out")
    torch.testing.assert_close(read["out"][0], read["out"][1], atol=1e-6, rtol=0)
    assert (clean["adapter.hook_out"][0] - clean["adapter.hook_out"][1]).abs().max() > 1e-3


def test_wrong_spec_is_refused(builder, monkeypatch):
    """OPT's LayerNorms swapped (the tier's check drops the rotary embedding, which OPT has none of),
    Llama's rotary dropped: plain logits stay exact, loading refuses."""
    import mmlens.model.hooked_mllm as hooked

    hf_model, processor = builder()
    right = hooked.architecture_for(hf_model)

    class SwappedNorms(type(right)):
        llm_block = replace(right.llm_block, ln1=right.llm_block.ln2, ln2=right.llm_block.ln1) \
            if right.llm_type == "opt" else replace(right.llm_block, attention=AttentionSpec(rotary=False))

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: SwappedNorms())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_unsupported_llms_are_refused_by_name():
    """A post-norm OPT (OPT-350m) is refused, naming what; a Flan-T5 LLM (BLIP-2's and InstructBLIP's)
    goes to the encoder-decoder variant (test_blip2_t5.py), an LLM of neither kind is refused."""
    hf_model, processor = tiny_blip2()
    config = hf_model.config
    t5 = Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
                     text_config=T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8).to_dict(),
                     num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_id)
    assert type(architecture_for(Blip2ForConditionalGeneration(t5))) is Blip2T5
    post_norm = Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
                            text_config={**config.text_config.to_dict(), "do_layer_norm_before": False},
                            num_query_tokens=config.num_query_tokens, image_token_index=config.image_token_id)
    with pytest.raises(UnsupportedModelError, match="do_layer_norm_before = False"):
        HookedMLLM.from_hf(Blip2ForConditionalGeneration(post_norm), processor)
    instruct, instruct_processor = tiny_instructblip()
    flan = InstructBlipConfig(vision_config=instruct.config.vision_config.to_dict(),
                              qformer_config=instruct.config.qformer_config.to_dict(), text_config=t5.text_config.to_dict(),
                              num_query_tokens=6, image_token_index=instruct.config.image_token_id)
    assert type(architecture_for(InstructBlipForConditionalGeneration(flan))) is InstructBlipT5
    opt = InstructBlipConfig(vision_config=instruct.config.vision_config.to_dict(),
                             qformer_config=instruct.config.qformer_config.to_dict(),
                             text_config={**config.text_config.to_dict(), "do_layer_norm_before": False},
                             num_query_tokens=6, image_token_index=instruct.config.image_token_id)
    assert type(architecture_for(InstructBlipForConditionalGeneration(opt))) is InstructBlipOpt
    with pytest.raises(UnsupportedModelError, match="InstructBlipForConditionalGeneration: its OPT LLM has do_layer_norm_before"):
        HookedMLLM.from_hf(InstructBlipForConditionalGeneration(opt), instruct_processor)
    mistral = InstructBlipConfig(vision_config=instruct.config.vision_config.to_dict(),
                                 qformer_config=instruct.config.qformer_config.to_dict(),
                                 text_config={"model_type": "mistral", **LlamaConfig(**text_kwargs(
                                     instruct_processor.tokenizer, 64, 1, 4, 2)).to_dict(), "model_type": "mistral"},
                                 num_query_tokens=6, image_token_index=instruct.config.image_token_id)
    with pytest.raises(UnsupportedModelError, match=r"model_type = 'mistral'.*supported: \['llama', 'opt', 't5'\]"):
        HookedMLLM.from_hf(InstructBlipForConditionalGeneration(mistral), instruct_processor)


def test_probes_read_the_tower_and_refuse_the_queries(eager):
    """A probe sweep at tower sites runs end to end; one at an LLM site is refused by name: the
    queries have no pixel boxes to paint."""
    model = eager.model
    scenes = load_segmentation("scenes", split="validation", n=6, seed=0, image_size=32)
    sweep = probe_sweep(model, scenes, sites=["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"],
                        probe="ridge", progress=False, alpha=1e-2)
    assert set(sweep.table.hook) == {"vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post"}
    with pytest.raises(LayoutMismatchError, match="learned queries"):
        probe_sweep(model, scenes, sites=["blocks.1.hook_resid_post"], probe="ridge", progress=False, alpha=1e-2)


def test_hugging_faces_processor_is_adopted():
    """A plain `Blip2Processor` (what `from_pretrained` loads) takes mmlens's prompts once the model
    wraps it, and gives Hugging Face's own ids: the queries' tokens, then the tokenized prompt."""
    hf_model, processor = tiny_blip2()
    plain = Blip2Processor(image_processor=processor.image_processor, tokenizer=processor.tokenizer, num_query_tokens=6)
    expected = plain(images=random_images(2), text=["how many", "what"], padding=True, return_tensors="pt")
    model = HookedMLLM.from_hf(hf_model, plain)
    assert isinstance(model.processor, Blip2PromptProcessor) and model.processor.image_token == "<image>"
    inputs = model.prepare(random_images(2), ["how many", "what"])
    assert torch.equal(inputs.input_ids, expected["input_ids"]) and torch.equal(inputs.pixel_values, expected["pixel_values"])
    with pytest.raises(InputError, match="must start with one <image> placeholder"):  # BLIP-2 reads its queries first
        model.prepare(random_images(1), ["how <image> many"])


@torch.no_grad()
def test_head_sweep_with_the_queries_knocked_out_equals_a_hand_loop(eager):
    """A head sweep restoring each LLM head's clean output into the run where text cannot read the
    queries: batched copies (joining at their own layer, with OPT's positions cut to their rows) =
    one copy at a time = a full forward patched by hand."""
    model = eager.model
    inputs = model.prepare(random_images(2), ["how many", "what"])
    n_layers, last = model.cfg.n_layers, f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"

    def blind(batch):  # the copies patching runs are the batch repeated: its queries read off its own layout
        return knockout(model, batch, queries=TokenGroup.text(), keys=TokenGroup.from_mask(queries_of(batch), "queries"),
                        layers=range(n_layers), verify=len(batch) == len(inputs))

    blocked = Run(inputs, blind, name="text cannot read the queries")
    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    effects = head_sweep(model, Run(inputs), blocked, metric)
    assert effects.shape == (n_layers, model.cfg.llm.n_heads, 2) and effects.std() > 0
    torch.testing.assert_close(effects, head_sweep(model, Run(inputs), blocked, metric, chunk_size=1), atol=1e-5, rtol=1e-5)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    _, clean = model.run_with_cache(inputs, names_filter=names)
    edit = blind(inputs)
    for layer in range(n_layers):
        head = layer % model.cfg.llm.n_heads

        def put_head(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = clean[hook.name][:, :, head]
            return z

        read = {}
        model.run_with_hooks(inputs, fwd_hooks=[*edit.hooks, (names[layer], put_head),
                                                (last, lambda x, hook: read.__setitem__(last, x))])
        torch.testing.assert_close(effects[layer, head], metric(read, inputs), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_residual_decomposition_is_exact_with_learned_positions(eager):
    """OPT adds its positions inside the decoder, after `hook_multimodal_embed`: the decomposition's
    embedding term is the residual entering block 0, so the parts sum to the residual exactly."""
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    last = model.cfg.n_layers
    parts = cache.decompose_resid(layer=last, return_labels=False)
    torch.testing.assert_close(parts.sum(0), cache[f"blocks.{last - 1}.hook_resid_post"], atol=1e-5, rtol=0)
