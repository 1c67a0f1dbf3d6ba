"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP tower -> k x k average pooling, RMSNorm and a
linear map -> Gemma 3 LLM.

The projector pools the tower's last hidden state (after its post-layernorm) over k x k patches
(16 patches per LLM token in the released models), normalises each pooled vector and maps it into
the LLM; the result replaces the `<image_soft_token>` placeholders, which the processor wraps in
`<start_of_image>` ... `<end_of_image>` (text tokens, outside the grid). The LLM block has sandwich
norms, per-head q/k RMSNorms, a 1/sqrt(query_pre_attn_scalar) scale and sliding-window layers.
The tokens of one image attend to each other both ways (Hugging Face builds that from
`token_type_ids`): the family's own mode is therefore "bidirectional", and "causal" removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor, nn

from ....errors import LayoutMismatchError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_tree import fire
from ...images.layout import ImageTokenLayout
from ...images.preprocess import ImageGeometry
from ...runtime.attention_masks import additive_mask
from ...runtime.instrument import AttentionSpec, BlockSpec, _override_forward
from ..bridge_aliases import (
    CLIP_TOWER_ALIASES, LLM_ALIASES, LLM_QK_NORM_ALIASES, PROJECTOR_INPUT_ALIASES, PROJECTOR_OUTPUT_ALIASES, alias,
)
from ..llava.family import Llava
from ..type_ids import type_ids_extended, type_ids_rule

TYPES = "token_type_ids"  # 1 at image tokens: Hugging Face's cue for the both-ways image blocks

GEMMA3_BLOCK = BlockSpec(
    ln1="input_layernorm",
    attn="self_attn",
    ln2="pre_feedforward_layernorm",
    mlp="mlp",
    gated_mlp=True,
    # no softcap: Hugging Face's Gemma 3 attention never applies `attn_logit_softcapping`
    attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm"),
    post_norms=("post_attention_layernorm", "post_feedforward_layernorm"),
)

# the norms after the attention and MLP branches (the sandwich)
SANDWICH_NORM_ALIASES = (
    alias("blocks.{layer}.ln1_post.hook_normalized", "blocks.{layer}.ln1_post.hook_out"),
    alias("blocks.{layer}.ln2_post.hook_normalized", "blocks.{layer}.ln2_post.hook_out"),
)


# Gemma 3's PIL image processor overrides the stock pipeline only to add pan-and-scan crops; with
# them off (and the stock crop and pad, which its `_preprocess` never applies) it runs the stock
# resize / rescale / normalize, which `ImageGeometry` replays.
STOCK_WHEN_PAN_AND_SCAN_OFF = {
    "Gemma3ImageProcessorPil": (("do_pan_and_scan", "do_center_crop", "do_pad"), ("preprocess", "_preprocess")),
}


class Gemma3(Llava):
    hf_class_names = ("Gemma3ForConditionalGeneration",)
    vision_towers = ("siglip_vision_model",)
    llms = ("gemma3_text",)
    llm_block = GEMMA3_BLOCK
    # without LLM_BRANCH_OUTPUT_ALIASES: the bridge's attn/mlp `hook_out` are the branch outputs
    # before the sandwich norm, which no hook point of ours carries
    bridge_aliases = (*SANDWICH_NORM_ALIASES, *LLM_QK_NORM_ALIASES, *CLIP_TOWER_ALIASES, *PROJECTOR_INPUT_ALIASES,
                      *PROJECTOR_OUTPUT_ALIASES, *LLM_ALIASES)
    extra_input_names = (TYPES,)
    llm_input_names = (TYPES,)
    attention_modes = ("bidirectional", "causal")
    special_token_fields = ("image_token_id", "boi_token_index", "eoi_token_index")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        cfg = super().build_config(hf_model)
        text = hf_model.config.text_config
        # what the attention rule and the layout need later, when only the ids are at hand
        self.image_token_id = cfg.image_token_id
        self.markers = {"start": hf_model.config.boi_token_index, "end": hf_model.config.eoi_token_index}
        self.sliding_window = text.sliding_window if "sliding_attention" in text.layer_types else None
        if self.sliding_window is not None and self.sliding_window < cfg.adapter.n_image_tokens:
            raise UnsupportedModelError(
                f"Gemma 3 with sliding_window={self.sliding_window} shorter than an image's "
                f"{cfg.adapter.n_image_tokens} tokens: its sliding layers cut images apart, which the "
                "bidirectional-attention edit does not model (released checkpoints use windows of 512+)"
            )
        return cfg

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return replace(Llava.llm_config(tc), use_normalization_before_and_after=True, use_qk_norm=True)

    def mask_geometry(self, processor: Any) -> ImageGeometry:
        """The stock geometry; pan-and-scan (extra crops per image) is refused, naming the processor."""
        return ImageGeometry.from_processor(processor, stock_when_off=STOCK_WHEN_PAN_AND_SCAN_OFF)

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        projector = self.projector(hf_model)
        side, per_side = projector.tokens_per_side, projector.patches_per_image
        if side * side != hf_model.config.mm_tokens_per_image or per_side % side:
            raise UnsupportedModelError(
                f"Gemma 3 pooling {per_side}x{per_side} patches into {hf_model.config.mm_tokens_per_image} tokens "
                "is not a whole k x k pooling of a square grid; pooled tokens would not tile the image"
            )
        k = projector.kernel_size
        return AdapterConfig(
            kind=f"avgpool{k}x{k}_rmsnorm_linear",
            d_in=vision.d_model,
            d_hidden=vision.d_model,  # the pooled vector after the soft-embedding norm
            d_out=projector.mm_input_projection_weight.shape[1],
            feature_layers=(vision.n_layers,),  # the last block, read after ln_post
            select_strategy="full",
            n_image_tokens=side * side,
            token_grid=(side, side),
        )

    def patch_to_token(self, cfg: MLLMConfig) -> Int[Tensor, "n_patches"]:
        """Each patch feeds the pooled token whose k x k window holds it (many to one)."""
        rows, cols = cfg.vision.patch_grid
        token_rows, token_cols = cfg.adapter.token_grid
        r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
        return ((r // (rows // token_rows)) * token_cols + c // (cols // token_cols)).flatten()

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        """One pooled grid per image; its `<start_of_image>` and `<end_of_image>` tokens are the
        specials "start" and "end", outside the grid and outside the image's attention block."""
        layout = super().layout(cfg, input_ids, **inputs)
        ids = input_ids.cpu()
        rows = []
        for row in layout.images:
            spans = []
            for span in row:
                around = {"start": span.positions[:1] - 1, "end": span.positions[-1:] + 1}
                for kind, position in around.items():
                    inside = 0 <= int(position) < ids.shape[1]
                    if not inside or int(ids[span.row, position]) != self.markers[kind]:
                        raise LayoutMismatchError(
                            f"batch row {span.row}: image {span.image_index} has no <{kind}_of_image> token next to its "
                            "grid; Gemma 3 prompts must be expanded by its processor (Gemma3Processor)"
                        )
                spans.append(replace(span, special={**span.special, **around}))
            rows.append(tuple(spans))
        return replace(layout, images=tuple(rows))

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        """`adapter.hook_in` is the pooled tokens (what the per-token maps read; the patch-level
        input is `vision.ln_post.hook_normalized`), so every adapter point lies on the token grid."""

        def forward(vision_outputs: Tensor) -> Tensor:
            # Hugging Face's operations, in its order, so the output is bit for bit its own
            batch, _, width = vision_outputs.shape
            grid = vision_outputs.transpose(1, 2).reshape(
                batch, width, projector.patches_per_image, projector.patches_per_image
            ).contiguous()
            pooled = fire(hooks.hook_in, projector.avg_pool(grid).flatten(2).transpose(1, 2))
            normed = fire(hooks.hook_hidden, projector.mm_soft_emb_norm(pooled))
            projected = torch.matmul(normed, projector.mm_input_projection_weight)
            return fire(hooks.hook_out, projected.type_as(vision_outputs))

        _override_forward(projector, forward)

    # ------------------------------------------------------------- attention
    def own_attention_mode(self, hf_model: nn.Module) -> str:
        return "bidirectional"

    def attention_kwargs(
        self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """Hugging Face applies both rules itself: the image blocks from `token_type_ids`
        (derived from the ids when a caller leaves them out), plain causal without them."""
        return type_ids_rule(mode, kwargs, TYPES, self.image_token_id)

    def hf_attention_mask(self, edges: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Any:
        """One 4D mask per layer type, as Gemma 3's forward takes them: sliding layers also drop
        keys `sliding_window` or more positions back (Hugging Face's `sliding_window_overlay`)."""
        masks = {"full_attention": additive_mask(edges, dtype)}
        if self.sliding_window is not None:
            position = torch.arange(edges.shape[-1], device=edges.device)
            window = position[None, :] > position[:, None] - self.sliding_window
            masks["sliding_attention"] = additive_mask(edges & window, dtype)
        return masks

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        return type_ids_extended(extra, TYPES)

    def processor_images(self, images: list[list[Any]]) -> list[Any]:
        return images  # Gemma3Processor counts `<start_of_image>` per prompt against each row's images

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        inputs = super().probe_inputs(cfg, seed)
        return {**inputs, TYPES: (inputs["input_ids"] == cfg.image_token_id).long()}
