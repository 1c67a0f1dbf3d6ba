"""Checkpoints whose config mixes known and unknown parts: each is either supported, and then the
family tier runs on it, or refused at load naming the part (config field and model_type) and
the parts that are supported.

Supported: LLaVA with a Qwen3 LLM (the tier runs here) and LLaVA with a Pixtral tower (the tier
runs in test_llava_pixtral.py). Refused: LLaVA with a tower or an LLM no family hooks, LLaVA's
Pixtral variant with an LLM it does not take, LLaVA-NeXT with a Pixtral tower, LightOnOCR with an
LLM other than Qwen3, and Aya Vision, whose Cohere2 LLM's blocks are parallel (attention and MLP
both read one norm of the residual), which a block spec cannot state yet (docs/models.md).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from transformers import (
    AyaVisionConfig, AyaVisionForConditionalGeneration, GemmaConfig, LightOnOcrForConditionalGeneration, LlamaConfig,
    LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig,
    Siglip2VisionConfig, SiglipVisionConfig,
)

from mmlens import HookedMLLM
from mmlens.data import load_segmentation
from mmlens.errors import UnsupportedModelError
from mmlens.model.architectures import architecture_for
from mmlens.model.architectures.llava.pixtral import LlavaPixtral
from mmlens.model.architectures.llava.qwen3 import LlavaQwen3
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.testing import tiny_llava
from mmlens.testing.families.common import instantiate, text_kwargs
from mmlens.testing.families.lighton_ocr import tiny_lighton_ocr
from mmlens.testing.families.llava import tiny_llava_pixtral, tiny_llava_with

import family_tier as tier
from family_tier import *  # noqa: F403 - the family tier's tests, run on LLaVA with a Qwen3 LLM

family, eager, builder = tier.fixtures({"llava_qwen3": lambda attn: tiny_llava_with("qwen3", attn_implementation=attn)})


def test_a_qwen3_llm_picks_its_variant_with_its_qk_norms(eager):
    model = eager.model
    assert type(model.architecture) is LlavaQwen3 and model.cfg.llm.use_qk_norm
    assert {"blocks.0.attn.q_ln.hook_normalized", "blocks.0.attn.k_ln.hook_normalized"} <= set(model.hook_names())


def test_a_qwen3_spec_without_its_qk_norms_is_refused(monkeypatch):
    monkeypatch.setattr(LlavaQwen3, "llm_block", replace(LlavaQwen3.llm_block, attention=AttentionSpec()))
    hf_model, processor = tiny_llava_with("qwen3")
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


def test_every_analysis_runs(eager):
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0, image_size=32)
    tier.every_analysis_runs(eager.model, scenes)


def test_a_pixtral_tower_is_llavas_packed_variant():
    hf_model, _ = tiny_llava_pixtral()
    assert type(architecture_for(hf_model)) is LlavaPixtral


def llava_with(*, vision=None, text=None) -> tuple:
    """The tiny LLaVA with its tower's or its LLM's config replaced."""
    reference, processor = tiny_llava()
    config = LlavaConfig(
        vision_config=vision or reference.config.vision_config, text_config=text or reference.config.text_config,
        image_token_id=reference.config.image_token_id, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    return instantiate(LlavaForConditionalGeneration, config, "eager", 0), processor


def tiny_gemma_text(tokenizer) -> GemmaConfig:
    return GemmaConfig(**text_kwargs(tokenizer, 64, 2, 4, 2), head_dim=16)


def test_llava_with_a_tower_no_family_hooks_is_refused_naming_it():
    tower = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    hf_model, processor = llava_with(vision=tower)
    with pytest.raises(UnsupportedModelError) as refusal:
        HookedMLLM.from_hf(hf_model, processor)
    message = str(refusal.value)
    assert "config.vision_config.model_type = 'siglip2_vision_model'" in message
    assert all(name in message for name in ("clip_vision_model", "siglip_vision_model", "dinov2", "pixtral"))


def test_llava_with_an_llm_no_family_hooks_is_refused_naming_it():
    _, processor = tiny_llava()
    hf_model, processor = llava_with(text=tiny_gemma_text(processor.tokenizer))
    with pytest.raises(UnsupportedModelError) as refusal:
        HookedMLLM.from_hf(hf_model, processor)
    message = str(refusal.value)
    assert "config.text_config.model_type = 'gemma'" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3"))


def test_a_pixtral_tower_with_an_llm_it_does_not_take_is_refused_naming_it():
    hf_model, processor = tiny_llava_pixtral()
    config = hf_model.config
    config.text_config = tiny_gemma_text(processor.tokenizer)
    gemma = instantiate(LlavaForConditionalGeneration, config, "eager", 0)
    with pytest.raises(UnsupportedModelError, match=r"config\.text_config\.model_type = 'gemma'.*Pixtral tower"):
        HookedMLLM.from_hf(gemma, processor)


def test_llava_next_with_a_pixtral_tower_is_refused_naming_it():
    pixtral, processor = tiny_llava_pixtral()
    reference, _ = tiny_llava()
    config = LlavaNextConfig(vision_config=pixtral.config.vision_config, text_config=reference.config.text_config,
                             image_token_id=reference.config.image_token_id, image_grid_pinpoints=[[40, 40]])
    hf_model = instantiate(LlavaNextForConditionalGeneration, config, "eager", 0)
    refusal = r"config\.vision_config\.model_type = 'pixtral'.*\['clip_vision_model'\]"
    with pytest.raises(UnsupportedModelError, match=refusal):
        HookedMLLM.from_hf(hf_model, processor)


def test_lighton_ocr_with_an_llm_other_than_qwen3_is_refused_naming_it():
    hf_model, processor = tiny_lighton_ocr()
    config = hf_model.config
    config.text_config = MistralConfig(**text_kwargs(processor.tokenizer, 64, 2, 4, 2), head_dim=16)
    mistral = instantiate(LightOnOcrForConditionalGeneration, config, "eager", 0)
    with pytest.raises(UnsupportedModelError, match=r"config\.text_config\.model_type = 'mistral'.*\['qwen3'\]"):
        HookedMLLM.from_hf(mistral, processor)


def test_aya_vision_with_an_llm_other_than_cohere2_is_refused_naming_it():
    """Aya Vision is supported with its Cohere2 LLM (parallel blocks); a Llama LLM in its config is
    refused naming the part, not hooked with the wrong block."""
    tower = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)
    llm = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=2)
    config = AyaVisionConfig(vision_config=tower, text_config=llm, image_token_id=5, downsample_factor=2)
    hf_model = instantiate(AyaVisionForConditionalGeneration, config, "eager", 0)
    with pytest.raises(UnsupportedModelError, match=r"config\.text_config\.model_type = 'llama'.*\['cohere2'\]"):
        HookedMLLM.from_hf(hf_model)
