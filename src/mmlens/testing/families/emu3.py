"""A tiny Emu3 (a VQ-VAE tokenizer whose codes are written into a Llama-style LLM's sequence as
token ids) and its Emu3Processor, for the family's tests and the overhead benchmark."""

from __future__ import annotations

from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor, Emu3TextConfig
from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor

from .common import instantiate, text_kwargs, word_tokenizer

END_OF_ROW = "<|extra_200|>"  # Emu3's name for the token after each row of codes


def visual_token(code: int) -> str:
    return f"<|visual token {code:06d}|>"


def tiny_emu3(
    *, codebook_size: int = 32, max_side: int = 32, llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4,
    seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny Emu3: a VQ encoder of four resolutions (three 2x downsamplings: the processor's fixed
    factor of 8), 32 channels (its GroupNorms take 32 groups), attention blocks at the coarsest resolution and in the middle (as released) and
    a temporal factor of 2; `codebook_size` codes, each a token of the vocabulary. The processor
    resizes images to multiples of 8 px between 16x16 and `max_side` squared pixels."""
    tokenizer = word_tokenizer(image_token="<image>", boi_token="<|image start|>", eoi_token="<|image end|>",
                               image_wrapper_token="<|image token|>", eof_token="<|extra_201|>")
    tokenizer.add_tokens([END_OF_ROW, *(visual_token(code) for code in range(codebook_size))], special_tokens=True)
    image_processor = Emu3ImageProcessor(min_pixels=16 * 16, max_pixels=max_side * max_side, spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tokenizer)
    vq = dict(codebook_size=codebook_size, embed_dim=4, latent_channels=4, temporal_downsample_factor=2,
              base_channels=32, channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[3],
              hidden_size=32, num_attention_heads=1)
    text = Emu3TextConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=dict(tokenizer.get_vocab()))
    return instantiate(Emu3ForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["END_OF_ROW", "tiny_emu3", "visual_token"]
