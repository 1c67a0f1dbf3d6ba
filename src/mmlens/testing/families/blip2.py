"""A tiny BLIP-2 (Blip2ForConditionalGeneration: BLIP's ViT tower, a Q-Former with cross-attention
every other block, an OPT LLM) and a tiny InstructBLIP (the Q-Former also reads the instruction; a
Llama LLM), each with the prompt processor mmlens uses for it; and both with a Flan-T5 LLM (an
encoder-decoder: gated-GELU MLPs, relative position buckets, untied head) in place of theirs."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig, InstructBlipConfig,
    InstructBlipForConditionalGeneration, LlamaConfig, OPTConfig, T5Config,
)
from transformers.models.t5.modeling_t5 import T5LayerNorm
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

from ...model.architectures.blip2 import Blip2PromptProcessor, InstructBlipPromptProcessor
from .common import instantiate, text_kwargs, word_tokenizer

__all__ = ["tiny_blip2", "tiny_blip2_t5", "tiny_instructblip", "tiny_instructblip_opt", "tiny_instructblip_t5"]


def tiny_blip2(*, n_queries: int = 6, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2,
               vision_d_model: int = 32, qformer_layers: int = 3, qformer_d_model: int = 32, llm_layers: int = 2,
               llm_d_model: int = 64, heads: int = 4, seed: int = 0, attn_implementation: str = "eager"):
    """`(hf_model, processor)`: by default a 2-block tower over a 4x4 patch grid (and CLS), a 3-block
    Q-Former with `n_queries` learned queries cross-attending at blocks 0 and 2, and a 2-layer OPT
    (learned positions, LayerNorms with bias, fc1/fc2 MLP); every stack has `heads` heads.
    The learned queries and LayerNorms are drawn at random (`_with_random_queries_and_norms`)."""
    # Hugging Face's processor adds its own `<image>` token (it reads a tokenizer's `image_token` as an AddedToken)
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = Blip2PromptProcessor(image_processor=image_processor, tokenizer=word_tokenizer(), num_query_tokens=n_queries)
    tokenizer = processor.tokenizer
    vision = Blip2VisionConfig(hidden_size=vision_d_model, intermediate_size=2 * vision_d_model,
                               num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                               patch_size=patch_size, qkv_bias=True,
                               initializer_range=0.02)  # BLIP's default (1e-10) leaves the tower blind to pixels
    qformer = Blip2QFormerConfig(hidden_size=qformer_d_model, intermediate_size=2 * qformer_d_model,
                                 num_hidden_layers=qformer_layers, num_attention_heads=heads, cross_attention_frequency=2,
                                 encoder_hidden_size=vision_d_model, vocab_size=len(tokenizer))
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=llm_d_model, ffn_dim=2 * llm_d_model,
                     num_hidden_layers=llm_layers, num_attention_heads=heads, word_embed_proj_dim=llm_d_model,
                     max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=n_queries, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = instantiate(Blip2ForConditionalGeneration, config, attn_implementation, seed)
    return _with_random_queries_and_norms(model), processor


def tiny_instructblip(*, n_queries: int = 6, image_size: int = 32, patch_size: int = 8, llm_layers: int = 2,
                      llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
                      **blip2_sizes: int):
    """`(hf_model, processor)`: the tower and Q-Former of `tiny_blip2` (`blip2_sizes` as it takes them;
    its Q-Former also embedding the instruction with its own word and position embeddings) and a Llama
    LLM of `llm_layers` blocks of `llm_d_model`, `llm_heads` heads (GQA, 2 kv heads), with
    `InstructBlipPromptProcessor` (the word tokenizer for both the LLM and the Q-Former)."""
    image_processor = BlipImageProcessorPil(size={"height": image_size, "width": image_size})
    processor = InstructBlipPromptProcessor(image_processor=image_processor, tokenizer=word_tokenizer(),
                                            qformer_tokenizer=word_tokenizer(), num_query_tokens=n_queries)
    blip2 = tiny_blip2(n_queries=n_queries, image_size=image_size, patch_size=patch_size, **blip2_sizes)[0].config
    tokenizer = processor.tokenizer
    config = InstructBlipConfig(
        vision_config=blip2.vision_config.to_dict(),
        qformer_config={**blip2.qformer_config.to_dict(), "vocab_size": len(processor.qformer_tokenizer),
                        "max_position_embeddings": 64},
        text_config=LlamaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2)).to_dict(),
        num_query_tokens=n_queries, image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    model = instantiate(InstructBlipForConditionalGeneration, config, attn_implementation, seed)
    return _with_random_queries_and_norms(model), processor


def tiny_instructblip_opt(*, seed: int = 0, attn_implementation: str = "eager", **blip2_sizes: int):
    """`(hf_model, processor)`: `tiny_instructblip`'s tower and instruction-reading Q-Former with
    `tiny_blip2`'s OPT LLM (Hugging Face's own InstructBLIP test configuration pairs them);
    `blip2_sizes` as `tiny_blip2` takes them."""
    llm = {k: blip2_sizes.pop(k) for k in ("llm_layers", "llm_d_model") if k in blip2_sizes}
    instruct, processor = tiny_instructblip(seed=seed, **blip2_sizes)
    blip2 = tiny_blip2(seed=seed, **blip2_sizes, **llm)[0].config
    config = InstructBlipConfig(vision_config=instruct.config.vision_config.to_dict(),
                                qformer_config=instruct.config.qformer_config.to_dict(),
                                text_config={**blip2.text_config.to_dict(), "vocab_size": len(processor.tokenizer)},
                                num_query_tokens=instruct.config.num_query_tokens,
                                image_token_index=instruct.config.image_token_id)
    model = instantiate(InstructBlipForConditionalGeneration, config, attn_implementation, seed)
    return _with_random_queries_and_norms(model), processor


def tiny_blip2_t5(*, tied: bool = False, llm_layers: int = 2, llm_d_model: int = 64, seed: int = 0,
                  attn_implementation: str = "eager", **blip2_sizes: int):
    """`(hf_model, processor)`: `tiny_blip2`'s tower and Q-Former (`blip2_sizes` as it takes them) with a
    Flan-T5 LLM of `llm_layers` encoder and decoder layers (`flan_t5_config`); `tied=True` gives T5 v1.0's
    tied head, whose decoder output is scaled by d_model**-0.5 before it."""
    blip2, processor = tiny_blip2(seed=seed, **blip2_sizes)
    heads = blip2.config.qformer_config.num_attention_heads
    config = Blip2Config(vision_config=blip2.config.vision_config.to_dict(),
                         qformer_config=blip2.config.qformer_config.to_dict(),
                         text_config=flan_t5_config(processor.tokenizer, tied, llm_layers, llm_d_model, heads).to_dict(),
                         num_query_tokens=blip2.config.num_query_tokens, image_token_index=blip2.config.image_token_id)
    model = instantiate(Blip2ForConditionalGeneration, config, attn_implementation, seed)
    return _with_moderate_logits(_with_random_queries_and_norms(model)), processor


def tiny_instructblip_t5(*, llm_layers: int = 2, llm_d_model: int = 64, seed: int = 0,
                         attn_implementation: str = "eager", **blip2_sizes: int):
    """`(hf_model, processor)`: `tiny_instructblip`'s tower and instruction-reading Q-Former
    (`blip2_sizes` as `tiny_blip2` takes them) with the Flan-T5 LLM of `tiny_blip2_t5` (`llm_layers`
    encoder and decoder layers of `llm_d_model`, as many heads as the Q-Former: `heads`)."""
    instruct, processor = tiny_instructblip(seed=seed, **blip2_sizes)
    heads = instruct.config.qformer_config.num_attention_heads
    config = InstructBlipConfig(vision_config=instruct.config.vision_config.to_dict(),
                                qformer_config=instruct.config.qformer_config.to_dict(),
                                text_config=flan_t5_config(processor.tokenizer, False, llm_layers, llm_d_model,
                                                           heads).to_dict(),
                                num_query_tokens=instruct.config.num_query_tokens,
                                image_token_index=instruct.config.image_token_id)
    model = instantiate(InstructBlipForConditionalGeneration, config, attn_implementation, seed)
    return _with_moderate_logits(_with_random_queries_and_norms(model)), processor


def flan_t5_config(tokenizer, tied: bool, layers: int = 2, d_model: int = 64, heads: int = 4) -> T5Config:
    """A tiny Flan-T5 (T5 v1.1: gated-GELU MLP, untied head) over `tokenizer`: `layers` encoder and as
    many decoder layers of width `d_model` (MLP 2x), `heads` heads, and 8 relative position buckets
    reaching 20 tokens, so the short test prompts already use the logarithmic buckets."""
    return T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model,
                    num_layers=layers, num_decoder_layers=layers, num_heads=heads, feed_forward_proj="gated-gelu",
                    relative_attention_num_buckets=8,
                    relative_attention_max_distance=20, pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                    tie_word_embeddings=tied)


def _with_moderate_logits(model: nn.Module) -> nn.Module:
    """T5's untied head scaled by d_model**-0.5: Hugging Face draws it with unit variance, which puts the
    tiny model's logits in the tens, where float32 rounding alone exceeds the tests' 1e-5."""
    head = model.language_model.lm_head
    with torch.no_grad():
        head.weight.mul_(head.in_features ** -0.5)
    return model


def _with_random_queries_and_norms(model: nn.Module) -> nn.Module:
    """The learned queries and every LayerNorm (and T5's RMS norm) drawn at random (Hugging Face starts them at zero and
    (1, 0), which would leave every query the same and hide a misplaced norm)."""
    with torch.no_grad():
        model.query_tokens.normal_(0, 1)
        for norm in model.modules():
            if isinstance(norm, (nn.LayerNorm, T5LayerNorm)):
                norm.weight.copy_(1 + 0.3 * torch.randn_like(norm.weight))
            if isinstance(norm, nn.LayerNorm):
                norm.bias.copy_(0.1 * torch.randn_like(norm.bias))
    return model
