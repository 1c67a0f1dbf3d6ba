"""LLaVA models built from Hugging Face configs, with a word-level tokenizer and PIL processor.

A real `LlavaForConditionalGeneration` with random weights (fixed seed), a tokenizer built in
memory and a PIL image processor: everything an end-to-end run needs without the hub. The
embedded default model starts from here, and so do the tiny models of tests and benchmarks.
"""

from __future__ import annotations

from typing import Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
DEFAULT_WORDS = (
    "USER : ASSISTANT what is in the image ? a red green blue yellow circle square triangle "
    "left right top bottom how many one two three four there are and of colour shape"
).split()
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() }}: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_word_tokenizer(words: list[str] | tuple[str, ...] = DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A whitespace/punctuation word-level tokenizer with LLaVA's special tokens (BOS added)."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )
    return tokenizer


def build_llava(
    vision: Literal["clip", "siglip"] = "clip",
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_layers: int = 2,
    vision_d_model: int = 32,
    vision_heads: int = 4,
    llm_layers: int = 2,
    llm_d_model: int = 64,
    llm_heads: int = 4,
    llm_kv_heads: int | None = None,
    llm_d_mlp: int | None = None,
    vision_feature_layer: int = -2,
    vision_feature_select_strategy: Literal["default", "full"] | None = None,
    words: list[str] | tuple[str, ...] = DEFAULT_WORDS,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A random-weight LLaVA (CLIP or SigLIP tower, MLP projector, Llama LLM) and its processor.

    `vision_feature_select_strategy` defaults to "default" (drop CLS) for CLIP and "full" for
    SigLIP, which has no CLS token.
    """
    tokenizer = build_word_tokenizer(words)
    strategy = vision_feature_select_strategy or ("default" if vision == "clip" else "full")
    vision_kwargs = dict(
        hidden_size=vision_d_model,
        intermediate_size=4 * vision_d_model,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
    )
    if vision == "clip":
        vision_config = CLIPVisionConfig(projection_dim=vision_d_model, **vision_kwargs)
    elif vision == "siglip":
        vision_config = SiglipVisionConfig(**vision_kwargs)
    else:
        raise ValueError(f"vision must be 'clip' or 'siglip', got {vision!r}")
    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=llm_d_model,
        intermediate_size=llm_d_mlp or 4 * llm_d_model,
        num_hidden_layers=llm_layers,
        num_attention_heads=llm_heads,
        num_key_value_heads=llm_kv_heads or llm_heads,
        max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if vision == "clip" else 0,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor
