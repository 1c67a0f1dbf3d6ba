"""A tiny Qwen3.5-MoE (Qwen3.5 whose every LLM MLP is a sparse mixture of experts beside a gated
shared expert) and its processor."""

from __future__ import annotations

from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

from .common import instantiate
from .qwen3_5 import tiny_qwen3_5


def tiny_qwen3_5_moe(
    *,
    n_experts: int = 4,
    top_k: int = 2,
    d_expert: int = 32,
    d_shared_expert: int = 48,
    experts_implementation: str = "eager",
    seed: int = 0,
    attn_implementation: str = "eager",
    **sizes,
):
    """A tiny Qwen3.5-MoE: `tiny_qwen3_5`'s model (`sizes` are its keywords: the layer types, the
    linear attention's heads) whose every LLM layer routes each token to `top_k` of `n_experts`
    experts (width `d_expert`) and adds a shared expert (width `d_shared_expert`) scaled by its
    sigmoid gate; `experts_implementation` is Hugging Face's (eager, grouped_mm, batched_mm)."""
    dense, processor = tiny_qwen3_5(seed=seed, attn_implementation=attn_implementation, **sizes)
    config = dense.config.to_dict()
    text = {key: value for key, value in config["text_config"].items() if key != "intermediate_size"}
    text.update(num_experts=n_experts, num_experts_per_tok=top_k, moe_intermediate_size=d_expert,
                shared_expert_intermediate_size=d_shared_expert)
    config = Qwen3_5MoeConfig(text_config=text, vision_config=config["vision_config"],
                              **{k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                         "vision_end_token_id")})
    config._experts_implementation = experts_implementation
    return instantiate(Qwen3_5MoeForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_qwen3_5_moe"]
