"""Hook overhead of HookedMLLM and of the bare TransformerLens bridge, relative to Hugging Face.

Run: `python benchmarks/overhead.py` (or `make bench`). A config of about 4M parameters
(vision 4 x 128, LLM 4 x 256, 64 image tokens, batch 4); every ratio below is
(time of the variant) / (HF forward time), medians of interleaved repeats in one run. The bridge
columns are for LLaVA; then one row block per other family (`--families`), each against its own
Hugging Face model, without a bridge column.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import time_interleaved  # noqa: E402

from mmlens import HookedMLLM  # noqa: E402
from mmlens.testing import tiny_llava  # noqa: E402
from mmlens.testing_families import (  # noqa: E402
    tiny_gemma3, tiny_idefics3, tiny_internvl, tiny_llava_dinov2, tiny_llava_next, tiny_llava_onevision, tiny_mistral3,
    tiny_paligemma, tiny_qwen2_vl, tiny_qwen3_vl,
)
from mmlens.testing.families.aya_vision import tiny_aya_vision, tiny_cohere2_vision  # noqa: E402
from mmlens.testing.families.blip2 import (  # noqa: E402
    tiny_blip2, tiny_blip2_t5, tiny_instructblip, tiny_instructblip_opt, tiny_instructblip_t5,
)
from mmlens.testing.families.deepseek_vl import tiny_deepseek_vl  # noqa: E402
from mmlens.testing.families.deepseek_vl_hybrid import tiny_deepseek_vl_hybrid  # noqa: E402
from mmlens.testing.families.emu3 import tiny_emu3  # noqa: E402
from mmlens.testing.families.fast_vlm import tiny_fast_vlm  # noqa: E402
from mmlens.testing.families.gemma4 import tiny_gemma4  # noqa: E402
from mmlens.testing.families.glm4v import tiny_glm4v, tiny_glm4v_moe  # noqa: E402
from mmlens.testing.families.janus import tiny_janus  # noqa: E402
from mmlens.testing.families.lighton_ocr import tiny_lighton_ocr  # noqa: E402
from mmlens.testing.families.llama4 import tiny_llama4  # noqa: E402
from mmlens.testing.families.mllama import tiny_mllama  # noqa: E402
from mmlens.testing.families.llava import tiny_llava_pixtral  # noqa: E402
from mmlens.testing.families.qwen3_5 import tiny_qwen3_5  # noqa: E402
from mmlens.testing.families.qwen3_5_moe import tiny_qwen3_5_moe  # noqa: E402
from mmlens.testing.families.qwen3_vl_moe import tiny_qwen3_vl_moe  # noqa: E402
from mmlens.testing.families.vipllava import tiny_vipllava  # noqa: E402

SIZE = dict(image_size=64, patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4, llm_d_model=256)
TILED = dict(tile=64, patch_size=8, pinpoints=((64, 128), (128, 64), (128, 128)), vision_layers=4, vision_d_model=128,
             llm_layers=4, llm_d_model=256)
FAMILIES = {
    "paligemma": lambda attn: tiny_paligemma(**SIZE, llm_heads=8, attn_implementation=attn),
    "llava-dinov2": lambda attn: tiny_llava_dinov2(**SIZE, vision_heads=4, llm_heads=8, llm_d_mlp=688, attn_implementation=attn),
    # tiles of SIZE's image size, up to 2x2 of them: the tower runs on 2-5 tiles per image
    "llava-next": lambda attn: tiny_llava_next(**TILED, vision_heads=4, llm_heads=8, llm_d_mlp=688, attn_implementation=attn),
    "llava-onevision": lambda attn: tiny_llava_onevision(**TILED, vision_heads=4, llm_heads=8, attn_implementation=attn),
    # the same widths; a 64x64 image is 8x8 patches of 8 px and 4x4 merged tokens, the 4 images one packed sequence
    **{f"qwen{v}-vl": (lambda attn, v=v: tiny_qwen2_vl(v, patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4,
                                                       llm_d_model=256, llm_heads=8, max_side=64, attn_implementation=attn))
       for v in ("2", "2.5")},
    # Qwen2-VL's widths; deepstack after vision blocks 1 and 2, added after LLM layers 0 and 1
    "qwen3-vl": lambda attn: tiny_qwen3_vl(patch_size=8, vision_layers=4, vision_d_model=128, deepstack_layers=(1, 2),
                                           llm_layers=4, llm_d_model=256, llm_heads=8, max_side=64, attn_implementation=attn),
    # Gemma's own 4x4 pooling: 16x16 patches of 8 px -> 16 LLM tokens per image
    "gemma3": lambda attn: tiny_gemma3(image_size=128, patch_size=8, tokens_per_side=4, vision_layers=4, vision_d_model=128,
                                       llm_layers=4, llm_d_model=256, llm_heads=8, sliding_window=16, attn_implementation=attn),
    # 64-px tiles, 8-px patches: a 64-px image is 2 x 2 tiles + the global image, 5 x 16 = 80 image tokens
    "idefics3": lambda attn: tiny_idefics3(tile=64, patch_size=8, longest_edge=128, vision_layers=4, vision_d_model=128,
                                           llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # 32-px tiles, 4-px patches: a 64-px image is 2 x 2 tiles + the thumbnail, 5 x 16 = 80 image tokens (as Idefics3's)
    "internvl": lambda attn: tiny_internvl(tile=32, patch_size=4, max_tiles=4, vision_layers=4, vision_d_model=128,
                                           llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # the same widths; a 64x64 image is 8x8 patches of 8 px and 4x4 merged tokens in 4 rows closed by
    # [IMG_BREAK] / [IMG_END], the 4 images one packed sequence with a block-diagonal mask
    "mistral3": lambda attn: tiny_mistral3(patch_size=8, longest_edge=64, vision_layers=4, vision_d_model=128, llm_layers=4,
                                           llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # LLaVA's widths; three tower layers (the 2nd-to-last, 3rd-to-last and the first block's input) concatenated
    "vipllava": lambda attn: tiny_vipllava(**SIZE, feature_layers=(-2, -3, 1), vision_heads=4, llm_heads=8, llm_d_mlp=688,
                                           attn_implementation=attn),
    # LLaVA's widths and geometry: a 64x64 image is 8x8 patches of 8 px, one LLM token each, between
    # <begin_of_image> / <end_of_image>
    "janus": lambda attn: tiny_janus(image_size=64, patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4,
                                     llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # Janus's widths and geometry with a SigLIP tower: a 64x64 image is 8x8 patches of 8 px, one LLM token each
    "deepseek-vl": lambda attn: tiny_deepseek_vl(image_size=64, patch_size=8, vision_layers=4, vision_d_model=128,
                                                 llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # DeepSeek-VL's widths and geometry plus SAM's tower (4 x 128) on a 128-px copy of each image: 16x16 patches in
    # windows of 4 (block 1 global), necked, resized and downsampled onto SigLIP's 8x8 grid, one LLM token per cell
    "deepseek-vl-hybrid": lambda attn: tiny_deepseek_vl_hybrid(image_size=64, high_res_size=128, patch_size=8,
                                                               window_size=4, vision_layers=4, vision_d_model=128,
                                                               high_res_layers=4, high_res_d_model=128, llm_layers=4,
                                                               llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # Pixtral-12B in LLaVA format: a 64x64 image is 8x8 patches of 8 px, one LLM token each (no merger), in 8 rows
    # closed by [IMG_BREAK] / [IMG_END], the 4 images one packed sequence with a block-diagonal mask
    "llava-pixtral": lambda attn: tiny_llava_pixtral(patch_size=8, longest_edge=64, vision_layers=4, vision_d_model=128,
                                                     llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # Mistral 3's widths and geometry (8x8 patches -> 4x4 merged tokens per 64x64 image), a Qwen3 LLM, each image one
    # contiguous run of [IMG] (no row breaks)
    "lighton-ocr": lambda attn: tiny_lighton_ocr(patch_size=8, longest_edge=64, vision_layers=4, vision_d_model=128,
                                                 llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # Qwen3-VL's widths with MoE MLPs: 8 experts of width 128, top 2, in LLM layers 1-3 (layer 0 dense)
    "qwen3-vl-moe": lambda attn: tiny_qwen3_vl_moe(n_experts=8, top_k=2, d_expert=128, dense_layers=(0,), patch_size=8,
                                                   vision_layers=4, vision_d_model=128, deepstack_layers=(1, 2), llm_layers=4,
                                                   llm_d_model=256, llm_heads=8, max_side=64, attn_implementation=attn),
    # Qwen3-VL's tower without deepstack; the checkpoints' pattern of three linear-attention layers then one full one,
    # linear heads as wide as d_model (4 key heads, 8 value heads of 32)
    "qwen3.5": lambda attn: tiny_qwen3_5(patch_size=8, vision_layers=4, vision_d_model=128,
                                         layer_types=("linear_attention",) * 3 + ("full_attention",), llm_d_model=256,
                                         llm_heads=8, linear_key_heads=4, linear_value_heads=8, linear_head_dim=32,
                                         max_side=64, attn_implementation=attn),
    # Qwen3.5's sizes with every MLP a mixture of experts: 8 experts of width 128, top 2, and a shared expert of 256
    "qwen3.5-moe": lambda attn: tiny_qwen3_5_moe(n_experts=8, top_k=2, d_expert=128, d_shared_expert=256, patch_size=8,
                                                 vision_layers=4, vision_d_model=128,
                                                 layer_types=("linear_attention",) * 3 + ("full_attention",),
                                                 llm_d_model=256, llm_heads=8, linear_key_heads=4, linear_value_heads=8,
                                                 linear_head_dim=32, max_side=64, attn_implementation=attn),
    # Qwen2-VL's widths; a 64x64 image is 8x8 patches of 8 px, folded 2x2 by the convolution into 4x4 tokens,
    # the 4 images one packed sequence; the LLM has sandwich norms and a fused gate/up MLP
    "glm4v": lambda attn: tiny_glm4v(patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4, llm_d_model=256,
                                     llm_heads=8, max_side=64, attn_implementation=attn),
    # 32-px tiles, 4-px patches: a 64-px image is 2 x 2 tiles + the global image, 5 x 16 = 80 image tokens (as
    # InternVL's); MoE on layers 1 and 3 (4 experts, top 2, a shared expert), chunks of 64 in layers 0-2, layer 3 NoPE
    "llama4": lambda attn: tiny_llama4(tile=32, patch_size=4, max_tiles=4, vision_layers=4, vision_d_model=128,
                                       llm_layers=4, llm_d_model=256, llm_heads=8, chunk_size=64, attn_implementation=attn),
    # GLM-4V's widths before a GLM-4.5 MoE LLM: layer 0 dense, layers 1-3 route to 2 of 8 experts of width 128
    # (2 groups, 1 kept), plus a shared expert
    "glm4.5v": lambda attn: tiny_glm4v_moe(n_experts=8, n_group=2, topk_group=1, top_k=2, d_expert=128, dense_layers=1,
                                           patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4,
                                           llm_d_model=256, llm_heads=8, max_side=64, attn_implementation=attn),
    # 32-px tiles of 4x4 patches of 8 px (+ CLS), up to 4 tiles per image; 4 local + 2 gated global tower blocks;
    # LLM layers 1 and 3 cross-attend to the images' 4 x 17 keys, layers 0 and 2 self-attend (the text only)
    "mllama": lambda attn: tiny_mllama(tile=32, patch_size=8, max_tiles=4, vision_layers=4, global_layers=2,
                                       vision_d_model=128, llm_layers=4, cross_attention_layers=(1, 3), llm_d_model=256,
                                       llm_heads=8, attn_implementation=attn),
    # 32 learned queries, as the released BLIP-2; Q-Former 4 blocks, cross-attention at 0 and 2; an OPT LLM
    "blip2": lambda attn: tiny_blip2(**SIZE, n_queries=32, qformer_layers=4, qformer_d_model=128, heads=8,
                                     attn_implementation=attn),
    # "blip2"'s tower and Q-Former, reading the prompt beside its queries, before a Llama LLM (Vicuna's block) / OPT
    "instructblip": lambda attn: tiny_instructblip(**SIZE, n_queries=32, qformer_layers=4, qformer_d_model=128, heads=8,
                                                   llm_heads=8, attn_implementation=attn),
    "instructblip-opt": lambda attn: tiny_instructblip_opt(**SIZE, n_queries=32, qformer_layers=4, qformer_d_model=128,
                                                           heads=8, attn_implementation=attn),
    # Gemma 4's own tower; 8-px patches pooled 2x2: a 64x64 image (aspect kept, within 70 soft tokens) is 16x16 patches,
    # 8x8 = 64 LLM tokens
    "gemma4": lambda attn: tiny_gemma4(patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4, llm_d_model=256,
                                       llm_heads=8, attn_implementation=attn),
    # Gemma 4 E2B-style: per-layer inputs (64 wide), the last 2 of 6 blocks reusing keys and values with double-wide MLPs
    "gemma4-e2b": lambda attn: tiny_gemma4(patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=6, llm_d_model=256,
                                           llm_heads=8, per_layer_input=64, kv_shared_layers=2, double_wide_mlp=True,
                                           attn_implementation=attn),
    # Gemma 4 26B-A4B-style: 8 experts (2 per token) beside every block's dense MLP, keys as values in the full layers
    "gemma4-moe": lambda attn: tiny_gemma4(patch_size=8, vision_layers=4, vision_d_model=128, llm_layers=4, llm_d_model=256,
                                           llm_heads=8, experts=8, attention_k_eq_v=True, attn_implementation=attn),
    # 32-px tiles, 4-px patches: a 64-px image is 2 x 2 tiles + the thumbnail, 5 x 16 = 80 image tokens (as InternVL's),
    # each tile's run after its TILE_i marker text; the LLM's parallel Cohere2 blocks alternate sliding-window
    # (16 tokens, rotary) and full attention (no positions)
    "aya-vision": lambda attn: tiny_aya_vision(tile=32, patch_size=4, max_tiles=4, vision_layers=4, vision_d_model=128,
                                               llm_layers=4, llm_d_model=256, llm_heads=8, sliding_window=16,
                                               attn_implementation=attn),
    # Aya Vision's widths and geometry (Cohere2-Vision's own canvas rule gives the same 2 x 2 tiles on a 64-px image),
    # each run followed by <|IMG_LINE_BREAK|>; no LayerNorm in the projector
    "cohere2-vision": lambda attn: tiny_cohere2_vision(tile=32, patch_size=4, max_tiles=4, vision_layers=4,
                                                       vision_d_model=128, llm_layers=4, llm_d_model=256, llm_heads=8,
                                                       sliding_window=16, attn_implementation=attn),
    # a VQ encoder of four levels (32 channels) at 8 px per code: a 64x64 image is 8x8 codes, 8x9 LLM tokens with
    # the end-of-row tokens, between <|image token|> / <|extra_201|>; the LLM at LLaVA's benchmark widths
    "emu3": lambda attn: tiny_emu3(max_side=64, llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # FastViTHD's five stages (timm; needs timm and torchvision) at 16 px per token: a 64x64 image is 4x4 tokens,
    # the first attention stage on 8x8; the LLM at LLaVA's benchmark widths
    "fast-vlm": lambda attn: tiny_fast_vlm(llm_layers=4, llm_d_model=256, llm_heads=8, attn_implementation=attn),
    # "blip2"'s tower and Q-Former before a Flan-T5 LLM: SIZE's 4 encoder + 4 decoder layers of width 256, 8 heads
    # (gated-GELU MLP); the logits are the decoder's start token's (one decoder token per row)
    "blip2-t5": lambda attn: tiny_blip2_t5(**SIZE, n_queries=32, qformer_layers=4, qformer_d_model=128, heads=8,
                                           attn_implementation=attn),
    "instructblip-t5": lambda attn: tiny_instructblip_t5(**SIZE, n_queries=32, qformer_layers=4, qformer_d_model=128,
                                                         heads=8, attn_implementation=attn),
}
PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?", "what"]
ROWS = (
    ("forward, no hooks", "ours_forward", "bridge_forward", "<= 1.05"),
    ("cache residual streams", "ours_cache_resid", "bridge_cache_resid", "<= 1.2"),
    ("cache every hook", "ours_cache_all", "bridge_cache_all", "<= 1.6"),
)


def residual_names(name: str) -> bool:
    # the adapter's own points (`adapter.hook_in` ...), not the inside of an adapter with blocks (a Q-Former),
    # whose residual streams `hook_resid` already names
    adapter_point = name.startswith("adapter.") and ".blocks." not in name
    return "hook_resid" in name or adapter_point or name == "hook_multimodal_embed"


def bridge_residual_names(name: str) -> bool:
    return "hook_resid" in name or name.startswith("vision_projector.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    hf, processor = tiny_llava(
        image_size=64, patch_size=8, vision_layers=4, vision_d_model=128, vision_heads=4,
        llm_layers=4, llm_d_model=256, llm_heads=8, llm_d_mlp=688, attn_implementation=args.attn,
    )
    bridge_source = copy.deepcopy(hf)
    reference = copy.deepcopy(hf)
    reference_twin = copy.deepcopy(hf)  # a second bare HF model gives the noise floor
    model = HookedMLLM.from_hf(hf, processor)
    n_params = sum(p.numel() for p in reference.parameters())
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    inputs = model.prepare(images, PROMPTS)
    kwargs = inputs.hf_kwargs()

    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    bridge = build_bridge_from_module(bridge_source, "LlavaForConditionalGeneration", hf_config=bridge_source.config)

    def bridge_forward():
        return bridge(inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask)

    def bridge_cache(names_filter):
        return lambda: bridge.run_with_cache(
            inputs.input_ids, pixel_values=inputs.pixel_values, attention_mask=inputs.attention_mask,
            names_filter=names_filter,
        )

    torch.testing.assert_close(model(inputs), reference(**kwargs).logits, atol=1e-5, rtol=0)
    fns = {
        "hf": lambda: reference(**kwargs),
        "hf_twin": lambda: reference_twin(**kwargs),
        "ours_forward": lambda: model(inputs),
        "ours_cache_resid": lambda: model.run_with_cache(inputs, names_filter=residual_names),
        "ours_cache_all": lambda: model.run_with_cache(inputs),
        "bridge_forward": bridge_forward,
        "bridge_cache_resid": bridge_cache(bridge_residual_names),
        "bridge_cache_all": bridge_cache(None),
    }
    times = time_interleaved(fns, repeats=args.repeats)
    _, cache = model.run_with_cache(inputs)
    _, resid = model.run_with_cache(inputs, names_filter=residual_names)
    print(f"config: {n_params / 1e6:.2f}M params, attention {args.attn}, batch {len(inputs)}, "
          f"seq {inputs.input_ids.shape[1]}, {model.cfg.n_image_tokens} image tokens, "
          f"torch threads {torch.get_num_threads()}")
    from mmlens.model.runtime.allocator import tune_allocator

    print(f"glibc trim threshold raised (applies to every variant in this process): {tune_allocator()}")
    print(f"HF forward: {times['hf'] * 1e3:.2f} ms (median of {args.repeats})")
    print(f"noise floor: a second identical HF model / HF = {times['hf_twin'] / times['hf']:.3f}")
    print(f"cache sizes: residual streams {len(resid)} hooks, everything {len(cache)} hooks")
    print(f"{'variant (LLaVA)':<32}{'HookedMLLM':>12}{'TL bridge':>12}{'target':>10}")
    for label, ours, theirs, target in ROWS:
        print(f"{label:<32}{times[ours] / times['hf']:>12.3f}{times[theirs] / times['hf']:>12.3f}{target:>10}")
    for family in args.families:
        family_rows(family, FAMILIES[family](args.attn), images, args.repeats)


def family_rows(family: str, built, images, repeats: int) -> None:
    """The three ratios for another family, each against its own bare Hugging Face model."""
    hf, processor = built
    reference = copy.deepcopy(hf)
    model = HookedMLLM.from_hf(hf, processor)
    inputs = model.prepare(images, PROMPTS)
    if "decoder_input_ids" in model.architecture.extra_input_names:  # an encoder-decoder: its start token, given
        start = model.hf_model.config.text_config.decoder_start_token_id
        decoder = torch.full((len(inputs.input_ids), 1), start, dtype=torch.long)
        inputs = dataclasses.replace(inputs, extra={**inputs.extra, "decoder_input_ids": decoder})
    kwargs = inputs.hf_kwargs()
    torch.testing.assert_close(model(inputs), reference(**kwargs).logits, atol=1e-5, rtol=0)
    times = time_interleaved({
        "hf": lambda: reference(**kwargs),
        "ours_forward": lambda: model(inputs),
        "ours_cache_resid": lambda: model.run_with_cache(inputs, names_filter=residual_names),
        "ours_cache_all": lambda: model.run_with_cache(inputs),
    }, repeats=repeats)
    n_params = sum(p.numel() for p in reference.parameters())
    print(f"\n{model.cfg.architecture}: {n_params / 1e6:.2f}M params, seq {inputs.input_ids.shape[1]}, "
          f"HF forward {times['hf'] * 1e3:.2f} ms")
    for label, ours, _, target in ROWS:
        print(f"{label:<32}{times[ours] / times['hf']:>12.3f}{'':>12}{target:>10}")


if __name__ == "__main__":
    main()
