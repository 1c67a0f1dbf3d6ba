"""BLIP-2 and InstructBLIP with a Flan-T5 LLM: the LLM stage's blocks are T5's encoder (where the queries
are the image tokens), the decoder is hooked as `decoder.blocks.{l}`, and the logits are the decoder's.

The tier's parity tests run with three decoder tokens per row (the start token and two answer tokens),
so the decoder's self-attention is causal over more than one token. Tests the tier states for
decoder-only LLMs (knockout with the full 4D mask, cache against `hidden_states`, generation) have
encoder-decoder versions here: Hugging Face's T5 hands its encoder's mask to the decoder's
cross-attention too, so the reference runs its encoder and decoder by hand with the masks each reads.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import Blip2Config, Blip2ForConditionalGeneration

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import LayoutMismatchError, UnsupportedModelError
from mmlens.interventions import CacheMetric, Run, encoder_cross_attention_knockout, head_sweep
from mmlens.model.architectures import architecture_for
from mmlens.model.architectures.blip2.t5 import Blip2T5, InstructBlipT5
from mmlens.model.images.layout import LearnedQueryLayout
from mmlens.probing import probe_sweep
from mmlens.testing.families.blip2 import tiny_blip2, tiny_blip2_t5, tiny_instructblip_t5

import family_tier as tier
from conftest import random_images
from test_blip2 import queries_of, text_cut_off_from_the_last_queries
from family_tier import (  # noqa: F401 - the family tier's tests that apply, run on this file's fixtures
    test_bridge_aliases_resolve_to_real_hook_points, test_hooks_off_equal_hf_bit_for_bit,
    test_mask_geometry_is_a_mask_geometry,
)

VARIANTS = {"blip2_t5": lambda attn: tiny_blip2_t5(attn_implementation=attn),
            "instructblip_t5": lambda attn: tiny_instructblip_t5(attn_implementation=attn)}


def with_answer(family: tier.Family) -> tier.Family:
    """The family's batch with three decoder tokens per row: the start token, then two answer tokens."""
    start = family.model.hf_model.config.text_config.decoder_start_token_id
    answer = torch.tensor([[start, 5, 6], [start, 7, 8], [start, 9, 5]])
    return replace(family, inputs=replace(family.inputs, extra={**family.inputs.extra, "decoder_input_ids": answer}))


@pytest.fixture(scope="module", params=[(v, a) for v in VARIANTS for a in ("eager", "sdpa")], ids="-".join)
def family(request):
    variant, attn = request.param
    return with_answer(tier.build_family(lambda: VARIANTS[variant](attn)))


@pytest.fixture(scope="module", params=list(VARIANTS))
def eager(request):
    return with_answer(tier.build_family(lambda: VARIANTS[request.param]("eager")))


def close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def by_hand(family: tier.Family, encoder_mask: torch.Tensor, cross_mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's T5 on the merged embeddings, its encoder under `encoder_mask` (2-D or 4-D) and its
    decoder's cross-attention under `cross_mask` ([batch, encoder seq])."""
    _, cache = family.model.run_with_cache(family.inputs, names_filter="hook_multimodal_embed")
    t5 = family.reference.language_model
    encoded = t5.encoder(inputs_embeds=cache["hook_multimodal_embed"], attention_mask=encoder_mask)
    return t5(encoder_outputs=encoded, attention_mask=cross_mask,
              decoder_input_ids=family.inputs.extra["decoder_input_ids"], use_cache=False).logits


def test_flan_t5_checkpoints_pick_the_encoder_decoder_variant(eager):
    assert type(eager.model.architecture) in (Blip2T5, InstructBlipT5)
    assert isinstance(eager.inputs.layout, LearnedQueryLayout)
    with pytest.raises(ValueError, match="full"):  # T5's encoder has one rule: every token reads every other
        with eager.model.using_image_attention("causal"):
            pass


@torch.no_grad()
def test_identity_hooks_everywhere_equal_hf(family):
    """An identity hook on every point (encoder, decoder, cross-attention, both final norms, the answer's
    embedding) gives Hugging Face's logits, and every point fires."""
    model = family.model
    ours, fired = tier.run_with_identity_hooks_everywhere(model, family.inputs)
    close(ours, family.reference(**family.inputs.hf_kwargs()).logits)
    assert fired == set(model.hook_names()), f"never fired: {sorted(set(model.hook_names()) - fired)[:5]}"


@torch.no_grad()
def test_cache_equals_hf_in_the_encoder_and_the_decoder(eager):
    """The queries' encoder positions hold the projection; encoder and decoder residuals, self- and
    cross-attention patterns and the encoder's output equal Hugging Face's; the unembedding of
    `ln_final.hook_normalized` (the decoder's final norm before its weight) is the logits."""
    model, inputs = eager.model, eager.inputs
    logits, cache = model.run_with_cache(inputs)
    assert torch.equal(cache["hook_multimodal_embed"][queries_of(inputs)], cache["adapter.hook_out"].flatten(0, 1))
    ref = eager.reference(**inputs.hf_kwargs(), output_hidden_states=True, output_attentions=True).language_model_outputs
    t5 = model.hf_model.config.text_config
    for layer in range(t5.num_layers):
        close(cache[f"blocks.{layer}.hook_resid_pre"], ref.encoder_hidden_states[layer])
        close(cache[f"blocks.{layer}.attn.hook_pattern"], ref.encoder_attentions[layer])
    close(cache["encoder_ln_final.hook_normalized"], ref.encoder_last_hidden_state)
    for layer in range(t5.num_decoder_layers):
        close(cache[f"decoder.blocks.{layer}.hook_resid_pre"], ref.decoder_hidden_states[layer])
        close(cache[f"decoder.blocks.{layer}.attn.hook_pattern"], ref.decoder_attentions[layer])
        close(cache[f"decoder.blocks.{layer}.cross_attn.hook_pattern"], ref.cross_attentions[layer])
    pattern = cache["decoder.blocks.0.attn.hook_pattern"]
    assert (pattern.triu(1) == 0).all() and pattern.shape[-2:] == (3, 3), "the decoder's self-attention is causal"
    close(model.unembed(cache["ln_final.hook_normalized"]), logits)
    assert model.resolve_hook_name("decoder.1.cross_attn.hook_pattern") == "decoder.blocks.1.cross_attn.hook_pattern"
    assert model.resolve_hook_name("encoder.0.hook_resid_mid") == "blocks.0.hook_resid_mid"


@torch.no_grad()
def test_tied_head_rescale_is_in_the_unembedding():
    """T5 v1.0's tied head scales the decoder's output by d_model**-0.5: `W_U` carries the factor, so the
    normalised residual times `W_U` is the logits."""
    hf_model, processor = tiny_blip2_t5(tied=True)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(2), ["how many", "what"])
    logits, cache = model.run_with_cache(inputs, names_filter="ln_final.hook_normalized")
    close(cache["ln_final.hook_normalized"] @ model.W_U + model.b_U, logits)
    close(model.unembed(cache["ln_final.hook_normalized"]), logits)


@torch.no_grad()
def test_knockout_in_the_encoder_equals_hf_with_its_mask(eager):
    """The prompt reading the last three queries of its image, blocked in every encoder layer, equals
    Hugging Face's encoder given the same 4D mask (its decoder reading every real encoder position)."""
    model, inputs = eager.model, eager.inputs
    ours, allowed = text_cut_off_from_the_last_queries(model, inputs)
    theirs = by_hand(eager, model.architecture.hf_attention_mask(allowed), inputs.attention_mask)
    close(ours, theirs)
    assert (ours - model(inputs)).abs().max() > 1e-4, "the knockout changed something"


@torch.no_grad()
def test_decoder_cross_attention_knockout_equals_hf_with_its_mask(eager):
    """The decoder cut off from every image's queries in all its cross-attention layers equals Hugging
    Face's decoder given the encoder's mask with the queries closed; no attention is left on them."""
    model, inputs = eager.model, eager.inputs
    ko = encoder_cross_attention_knockout(model, inputs, verify=True)
    assert torch.equal(ko.queries, queries_of(inputs)) and set(ko.blocked_mass) == {0, 1}
    assert all(mass == 0.0 for mass in ko.blocked_mass.values())
    ours = model(ko.inputs)
    close(ours, by_hand(eager, inputs.attention_mask, inputs.attention_mask * ~queries_of(inputs)))
    assert (ours - model(inputs)).abs().max() > 1e-4, "the knockout changed something"
    with pytest.raises(UnsupportedModelError, match="no decoder reading an encoder"):
        encoder_cross_attention_knockout(HookedMLLM.from_hf(*tiny_blip2()), inputs)


@torch.no_grad()
def test_runs_from_a_layer_or_the_merged_embeddings_equal_the_full_forward(eager):
    """Stopping at an encoder block gives the residual entering it; starting there (or at block 0, or from
    the merged embeddings) gives the full forward's logits, the skipped first block handing on T5's
    relative position bias; the decoder's keywords travel with the batch when it is repeated."""
    model, inputs = eager.model, eager.inputs
    full, cache = model.run_with_cache(inputs, names_filter=["hook_multimodal_embed", "blocks.1.hook_resid_pre"])
    close(model(inputs, stop_at_layer=1), cache["blocks.1.hook_resid_pre"])
    close(model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, tokens=inputs), full)
    close(model(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"]), full)
    close(model(inputs.repeat(2)), full.repeat(2, 1, 1))


@torch.no_grad()
def test_generation_is_hugging_faces_and_refused_step_by_step(eager):
    """Greedy generation gives Hugging Face's answer (the decoder's new ids); generating one full forward
    per token, which extends the prompt rather than the decoder's ids, is refused by name."""
    model = eager.model
    inputs = replace(eager.inputs, extra={k: v for k, v in eager.inputs.extra.items() if k != "decoder_input_ids"})
    ours = model.generate(inputs, max_new_tokens=3)
    theirs = eager.reference.generate(**inputs.hf_kwargs(), max_new_tokens=3, do_sample=False)
    assert ours == model.processor.batch_decode(theirs[:, 1:], skip_special_tokens=True)
    with pytest.raises(UnsupportedModelError, match="decoder_input_ids"):
        model.generate(inputs, max_new_tokens=2, use_past_kv_cache=False)


def test_registry_hands_t5_configs_to_the_variant():
    hf_model, _ = tiny_instructblip_t5()
    assert type(architecture_for(hf_model)) is InstructBlipT5


@torch.no_grad()
def test_head_sweep_over_encoder_heads_equals_a_hand_loop(eager):
    """Patching each encoder head's clean z into a run on other images (copies joining the batched
    forward at that head's hook_z) equals a full forward patched by hand, read at the decoder's output."""
    model, inputs = eager.model, eager.inputs
    other = replace(inputs, pixel_values=model.prepare(random_images(3, seed=7), tier.PROMPTS).pixel_values)
    point = "decoder.blocks.1.hook_resid_post"  # the decoder's output, before its final norm
    metric = CacheMetric(lambda acts, inp: acts[point][:, -1].norm(dim=-1), [point])
    effects = head_sweep(model, Run(inputs), Run(other), metric)
    assert effects.shape == (model.cfg.n_layers, model.cfg.n_heads, len(inputs))
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(model.cfg.n_layers)]
    _, clean = model.run_with_cache(inputs, names_filter=names)
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            def put_head(z, hook, head=head):
                z = z.clone()
                z[:, :, head] = clean[hook.name][:, :, head]
                return z

            read = {}
            model.run_with_hooks(other, fwd_hooks=[(names[layer], put_head), (point, lambda x, hook: read.__setitem__(point, x))])
            torch.testing.assert_close(effects[layer, head], metric(read, other), atol=1e-5, rtol=1e-5)
    assert (effects - metric({point: model.run_with_cache(other, names_filter=point)[1][point]}, other)).abs().max() > 1e-4


def test_wrong_spec_is_refused(monkeypatch):
    """Hooked T5 maths that forgets the mask (the decoder's causal one, in the probe's three decoder
    tokens) leaves plain logits exact; loading refuses it, naming the decoder block."""
    import mmlens.model.architectures.blip2.t5_blocks as t5_blocks

    monkeypatch.setattr(t5_blocks, "apply_attention_mask", lambda scores, mask, is_causal: scores)
    hf_model, processor = tiny_blip2_t5()
    with pytest.raises(UnsupportedModelError, match=r"decoder\.blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_probes_read_the_tower_and_refuse_the_queries(eager):
    """A probe sweep at a tower site runs end to end; one at an encoder site is refused by name (the queries
    have no pixel boxes), as in the OPT variant."""
    scenes = load_segmentation("scenes", split="validation", n=6, seed=0, image_size=32)
    sweep = probe_sweep(eager.model, scenes, sites=["vision.blocks.1.hook_resid_post"], probe="ridge", progress=False,
                        alpha=1e-2)
    assert set(sweep.table.hook) == {"vision.blocks.1.hook_resid_post"}
    with pytest.raises(LayoutMismatchError, match="learned queries"):
        probe_sweep(eager.model, scenes, sites=["blocks.1.hook_resid_post"], probe="ridge", progress=False, alpha=1e-2)


@torch.no_grad()
def test_logit_lens_of_the_encoder_is_refused_by_name(eager):
    """The encoder's residual never meets the final norm or the head (the decoder's), so stacking it
    through the final norm is refused; the plain residual stack still decomposes the encoder."""
    _, cache = eager.model.run_with_cache(eager.inputs)
    assert cache.accumulated_resid().shape[0] == eager.model.cfg.n_layers + 1
    with pytest.raises(UnsupportedModelError, match="decoder's residual"):
        cache.accumulated_resid(apply_ln=True)
    with pytest.raises(UnsupportedModelError, match="logit lens"):
        cache.logit_lens()


def test_t5_without_a_decoder_is_refused_by_name():
    hf_model, processor = tiny_blip2_t5()
    config = hf_model.config.to_dict()
    config["text_config"] = {**config["text_config"], "num_decoder_layers": 0}
    with pytest.raises(UnsupportedModelError, match="no decoder layers"):
        HookedMLLM.from_hf(Blip2ForConditionalGeneration(Blip2Config(**config)), processor)
