"""A tiny Janus (SigLIP-style tower, two-layer MLP aligner, Llama LLM; a minimal VQ model that
only generation uses) and its JanusProcessor."""

from __future__ import annotations

from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor, JanusVisionConfig, LlamaConfig
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from .common import instantiate, text_kwargs, word_tokenizer


def tiny_janus(
    *, image_size: int = 32, patch_size: int = 8, vision_layers: int = 2, vision_d_model: int = 32,
    llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0, attn_implementation: str = "eager",
):
    """A tiny Janus: a 32x32 image becomes 4x4 LLM tokens between `<begin_of_image>` and
    `<end_of_image>`; the processor resizes the longest side to 32 and pads the image to a square.
    The VQ model is the smallest Hugging Face builds (one resolution, 32 channels: its GroupNorms take 32 groups): the
    understanding path never runs it."""
    tokenizer = word_tokenizer(image_token="<image_placeholder>", boi_token="<begin_of_image>", eoi_token="<end_of_image>")
    n_tokens = (image_size // patch_size) ** 2
    image_processor = JanusImageProcessorPil(size={"height": image_size, "width": image_size}, min_size=4)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tokenizer, num_image_tokens=n_tokens)
    vision = JanusVisionConfig(
        hidden_size=vision_d_model, num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
        patch_size=patch_size, projection_dim=llm_d_model, depth=2, num_image_tokens=n_tokens,
    )
    text = LlamaConfig(**text_kwargs(tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    vq = dict(embed_dim=8, num_embeddings=32, latent_channels=32, base_channels=32, channel_multiplier=[1],
              num_res_blocks=1, projection_dim=llm_d_model, image_token_embed_dim=llm_d_model)
    config = JanusConfig(vision_config=vision, text_config=text, vq_config=vq, image_token_id=tokenizer.image_token_id,
                         tie_word_embeddings=False)
    return instantiate(JanusForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_janus"]
