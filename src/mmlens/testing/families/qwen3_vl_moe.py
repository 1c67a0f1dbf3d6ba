"""A tiny Qwen3-VL-MoE (Qwen3-VL with sparse mixture-of-experts MLPs in its LLM) and its processor."""

from __future__ import annotations

from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

from .common import instantiate
from .qwen3_vl import tiny_qwen3_vl


def tiny_qwen3_vl_moe(
    *,
    n_experts: int = 4,
    top_k: int = 2,
    d_expert: int = 32,
    dense_layers: tuple[int, ...] = (0,),
    experts_implementation: str = "eager",
    seed: int = 0,
    attn_implementation: str = "eager",
    **sizes,
):
    """A tiny Qwen3-VL-MoE: `tiny_qwen3_vl`'s model (`sizes` are its keywords) whose LLM layers
    route each token to `top_k` of `n_experts` experts (width `d_expert`), except `dense_layers`
    (`mlp_only_layers`), which keep a dense MLP; `experts_implementation` is Hugging Face's
    (eager, grouped_mm, batched_mm)."""
    dense, processor = tiny_qwen3_vl(seed=seed, attn_implementation=attn_implementation, **sizes)
    config = dense.config.to_dict()
    text = {**config["text_config"], "num_experts": n_experts, "num_experts_per_tok": top_k,
            "moe_intermediate_size": d_expert, "decoder_sparse_step": 1, "mlp_only_layers": list(dense_layers)}
    config = Qwen3VLMoeConfig(text_config=text, vision_config=config["vision_config"],
                              **{k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                                         "vision_end_token_id")})
    config._experts_implementation = experts_implementation
    return instantiate(Qwen3VLMoeForConditionalGeneration, config, attn_implementation, seed), processor


__all__ = ["tiny_qwen3_vl_moe"]
