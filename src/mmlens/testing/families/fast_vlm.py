"""A tiny FastVLM (FastViTHD tower through timm, 2-layer MLP projector, Qwen2 LLM). Building it needs
timm, which imports torchvision; `tiny_fast_vlm` says so when either is missing."""

from __future__ import annotations

import torch
from torch import nn
from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config

from ...model.architectures.fast_vlm import TIMM_NEEDED, timm_problem
from ...zoo.build import build_llava
from .common import instantiate, text_kwargs

# FastViTHD's five stages (`fastvit_mci3`: three of RepMixer blocks, then two of attention, each
# attention stage on a grid half as fine as the one before), one or two blocks each, narrow enough for
# a test: the attention stages are 32 and 64 wide (one and two heads of timm's 32 channels). The RepMixer
# stages keep the stem's resolution (FastViTHD halves twice there), so 64 px images give the released
# model's last grids at a sixteenth of the pixels per side: a 4x4 token grid, the first attention
# stage on 8x8 (its depthwise convolutions are what a CPU spends its time on)
TINY_TOWER = {
    "inference_mode": True,  # the released checkpoints' reparameterised convolutions
    "layers": (1, 1, 1, 2, 2),
    "embed_dims": (8, 8, 8, 32, 64),
    "mlp_ratios": (2, 2, 2, 2, 2),
    "downsamples": (False, False, False, True, True),
}
STRIDE = 16  # the stem's 4, then two halvings


def tiny_fast_vlm(*, image_size: int = 64, llm_layers: int = 2, llm_d_model: int = 64, llm_heads: int = 4, seed: int = 0,
                  attn_implementation: str = "eager"):
    """A tiny FastVLM and a LLaVA processor (one `<image>` placeholder per 16 px cell): images of
    `image_size` px (default 64: a 4x4 token grid; the first attention stage works on 8x8). The
    tower's weights are drawn at unit gain (Hugging Face's 0.02 init shrinks activations a hundredfold
    per convolution, to 1e-20 at the end), its layer scales, which timm starts at 1e-5, near 1 and its
    q/k weights large, so every block moves the residual and attention is peaked (knockouts and spec
    checks then show). The Qwen2 LLM has `llm_layers` blocks of `llm_d_model`, `llm_heads` heads (2 kv)."""
    problem = timm_problem()
    if problem:
        raise ImportError(f"{problem}. {TIMM_NEEDED}")
    _, processor = build_llava("siglip", image_size=image_size, patch_size=STRIDE, seed=seed,
                               attn_implementation=attn_implementation)
    width = TINY_TOWER["embed_dims"][-1] * 2  # the final conv doubles the last stage's width
    vision = {"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "hidden_size": width,
              "do_pooling": True, "global_pool": "avg", "model_args": dict(TINY_TOWER)}
    text = Qwen2Config(**text_kwargs(processor.tokenizer, llm_d_model, llm_layers, llm_heads, 2))
    config = FastVlmConfig(vision_config=vision, text_config=text.to_dict(), image_token_id=processor.image_token_id,
                           image_seq_length=(image_size // STRIDE) ** 2, projector_hidden_act="gelu")
    model = instantiate(FastVlmForConditionalGeneration, config, attn_implementation, seed)
    with torch.no_grad():
        for module in model.model.vision_tower.timm_model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0, module.weight[0].numel() ** -0.5)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1)
        for name, parameter in model.model.vision_tower.timm_model.named_parameters():
            if name.endswith("gamma"):
                parameter.copy_(1 + 0.5 * torch.randn_like(parameter))
            elif name.endswith("qkv.weight"):
                rows = parameter.shape[0] // 3
                parameter[: 2 * rows].normal_(0, 0.3)
    return model, processor


__all__ = ["tiny_fast_vlm"]
