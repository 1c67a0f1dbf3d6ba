"""Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration):
a native-resolution ViT -> 2x2 patch merger -> Qwen2 LLM with multimodal rotary positions (M-RoPE).

Each image keeps its own resolution: the processor resizes it to a multiple of 2 x patch size and
flattens its patches 2x2 group by 2x2 group; the tower runs every image of the batch as one packed
sequence split by `cu_seqlens` (see `tower.py`), and the merger turns each 2x2 group into one
LLM token, so image i has (h_i / 2) x (w_i / 2) tokens between `<|vision_start|>` and
`<|vision_end|>`. The LLM gives image tokens (t, row, col) rotary coordinates (`get_rope_index`).
Qwen2.5-VL differs in the tower only: RMSNorm and a SwiGLU MLP instead of LayerNorm and GELU, and
window attention (windows of `window_size` pixels, the patches reordered window by window) except
in the blocks `fullatt_block_indexes`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn
from transformers.vision_utils import get_vision_window_index

from ....errors import InputError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...images.layout import ImageTokenLayout
from ...runtime.instrument import instrument_language_model
from ...runtime.norms import NormKind
from ...weights import ungated_linears
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, alias
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from ..type_ids import type_ids_extended
from .geometry import SmartResizeGeometry
from .layout import qwen_layout, unpatchify
from .tower import hook_first_block_input, instrument_merger, instrument_packed_block, merger_parts

GRID = "image_grid_thw"
TYPES = "mm_token_type_ids"

BRIDGE_VISION_BLOCK = _V = "vision_encoder.blocks.{layer}."  # the bridge's Qwen vision block
# the bridge's names around a Qwen vision block (residuals, norms, attention and MLP outputs),
# shared by every Qwen tower
QWEN_VISION_BLOCK_ALIASES = (
    alias("vision.blocks.{layer}.hook_resid_pre", _V + "hook_in", _V + "hook_resid_pre"),
    alias("vision.blocks.{layer}.hook_resid_post", _V + "hook_out", _V + "hook_resid_post"),
    alias("vision.blocks.{layer}.ln1.hook_normalized", _V + "norm1.hook_out", _V + "attn.hook_in", _V + "hook_attn_in"),
    alias("vision.blocks.{layer}.ln2.hook_normalized", _V + "norm2.hook_out", _V + "mlp.hook_in", _V + "hook_mlp_in"),
    alias("vision.blocks.{layer}.hook_attn_out", _V + "attn.hook_out", _V + "hook_attn_out"),
    alias("vision.blocks.{layer}.hook_mlp_out", _V + "mlp.hook_out", _V + "hook_mlp_out"),
)
# Qwen2.5-VL's gated vision MLP
QWEN2_5_VISION_MLP_ALIASES = (
    alias("vision.blocks.{layer}.mlp.hook_pre", _V + "mlp.gate.hook_out"),
    alias("vision.blocks.{layer}.mlp.hook_pre_linear", _V + "mlp.in.hook_out"),
    alias("vision.blocks.{layer}.mlp.hook_post", _V + "mlp.out.hook_in"),
)


class Qwen2VL(Architecture):
    hf_class_names = ("Qwen2VLForConditionalGeneration",)
    extra_input_names = (GRID, TYPES)
    special_token_fields = ("image_token_id", "vision_start_token_id", "vision_end_token_id")
    llm_block = LLM_BLOCK
    module_paths = ModulePaths(vision_tower="model.visual", vision_layers="blocks", projector="model.visual.merger",
                               llm="model.language_model")
    vision_norm: NormKind = "LN"
    vision_gated = False  # fc1 -> act -> fc2
    vision_rotary = True  # the tower's 2-D rotary embedding (a spec without it is refused at load)
    windowed = False

    # ------------------------------------------------------------- config and modules
    llm_config = staticmethod(Llava.llm_config)

    @staticmethod
    def vision_width(vision_config: Any) -> int:
        return vision_config.embed_dim

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        config, visual = hf_model.config, self.vision_tower(hf_model)
        vc = config.vision_config
        width = self.vision_width(vc)
        mlp = visual.blocks[0].mlp
        vision = VisionConfig(
            n_layers=vc.depth,
            n_heads=vc.num_heads,
            d_model=width,
            d_head=width // vc.num_heads,
            d_mlp=(mlp.up_proj if self.vision_gated else ungated_linears(mlp)[0]).out_features,
            n_key_value_heads=vc.num_heads,
            normalization_type=self.vision_norm,
            positional_embedding_type="rotary",
            patch_size=vc.patch_size,  # image_size 0: every image has its own resolution
            gated_mlp=self.vision_gated,
        )
        merge = vc.spatial_merge_size
        merger = self.projector(hf_model)
        _, linear_1, _, linear_2 = merger_parts(merger)
        adapter = AdapterConfig(
            kind=f"patch_merger_{merge}x{merge}",
            d_in=merger.hidden_size,
            d_hidden=linear_1.out_features,
            d_out=linear_2.out_features,
            feature_layers=(vc.depth,),  # the last block, through ln_q
            select_strategy="full",
            n_image_tokens=0,  # variable: (h / merge) x (w / merge) per image
            token_grid=(0, 0),
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(config.text_config))

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        self._hf_model = hf_model  # its config (layouts, input checks, probe batch) and get_rope_index
        visual = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vision_norm = root.cfg.vision.normalization_type
        for layer, hooks in zip(visual.blocks, root.vision.blocks):
            instrument_packed_block(layer, hooks, self.vision_gated, use_result, vision_norm, self.vision_rotary)
        handles = [hook_first_block_input(visual.blocks[0], root.vision.hook_embed)]
        grids: dict[str, Tensor] = {}

        def remember_grid(_module, args, kwargs):
            grids["thw"] = kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

        handles.append(visual.register_forward_pre_hook(remember_grid, with_kwargs=True))
        instrument_merger(self.projector(hf_model), root.vision.ln_post, root.adapter, vision_norm,
                          lambda: self.merged_order(visual, grids["thw"]))

        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    def merged_order(self, visual: nn.Module, grid_thw: Int[Tensor, "n_images 3"]) -> Int[Tensor, "n_tokens"] | None:
        """For each LLM image token (all images, in order), the index of its 2x2 group in the
        tower's sequence; None when the tower keeps the LLM's order (no windows)."""
        if not self.windowed:
            return None
        window_index, _ = get_vision_window_index(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)
        return torch.argsort(window_index).to(grid_thw.device)

    # ------------------------------------------------------------- images -> tokens
    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        config = self._hf_model.config
        visual = self.vision_tower(self._hf_model)
        grid = inputs.get(GRID)
        return qwen_layout(
            input_ids.cpu(), None if grid is None else grid.cpu(),
            image_token_id=config.image_token_id, start_token_id=config.vision_start_token_id,
            end_token_id=config.vision_end_token_id, patch_size=config.vision_config.patch_size,
            merge=config.vision_config.spatial_merge_size,
            tower_group=None if grid is None else self.merged_order(visual, grid.cpu()),
        )

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Tensor:
        vc = self._hf_model.config.vision_config
        grid = inputs[GRID].cpu()
        start = int(grid[:image_index].prod(-1).sum())
        t, h, w = grid[image_index].tolist()
        return unpatchify(pixel_values[start : start + t * h * w], h, w, channels=vc.in_channels,
                          temporal=vc.temporal_patch_size, patch_size=vc.patch_size, merge=vc.spatial_merge_size)

    def mask_geometry(self, processor: Any) -> SmartResizeGeometry:
        return SmartResizeGeometry.from_processor(processor)

    # ------------------------------------------------------------- inputs and positions
    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        vc = self._hf_model.config.vision_config
        per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"{n_tokens} image tokens in input_ids but no pixel_values")
            return
        if pixel_values.ndim != 2 or pixel_values.shape[1] != per_patch:
            raise InputError(
                f"pixel_values have shape {tuple(pixel_values.shape)} but this model takes the processor's packed "
                f"patches [n_patches, {per_patch}]; preprocess images with model.prepare(...)"
            )
        merge = vc.spatial_merge_size**2
        if n_tokens * merge != pixel_values.shape[0]:
            raise InputError(
                f"{pixel_values.shape[0]} patches in pixel_values make {pixel_values.shape[0] // merge} image tokens "
                f"but input_ids hold {n_tokens}; the prompts' placeholders and the images must match"
            )

    def position_ids(self, kwargs: dict[str, Tensor]) -> Int[Tensor, "3 batch seq"] | None:
        """The M-RoPE position ids Hugging Face computes from the inputs (2-D padding mask), or None
        when it would fall back to plain positions (no image grid or token types given)."""
        if kwargs.get(GRID) is None or kwargs.get(TYPES) is None:
            return None
        mask = kwargs.get("attention_mask")
        positions, _ = self._hf_model.model.get_rope_index(
            kwargs["input_ids"], mm_token_type_ids=kwargs[TYPES], image_grid_thw=kwargs[GRID],
            attention_mask=mask if mask is not None and mask.ndim == 2 else None,
        )
        return positions

    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        positions = self.position_ids(inputs)
        return {} if positions is None else {"position_ids": positions}

    def attention_kwargs(
        self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        if mode == "causal":
            return kwargs
        # Hugging Face reads the 2-D mask to place M-RoPE positions: give them before it becomes 4D
        positions = self.position_ids(kwargs)
        edited = super().attention_kwargs(mode, kwargs, layout, dtype)
        return edited if positions is None else {**edited, "position_ids": positions}

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        return type_ids_extended(extra, TYPES)

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of different grids (larger than Qwen2.5-VL's windows), with
        vision start/end tokens and text, equal lengths (no padding)."""
        config = self._hf_model.config
        vc = config.vision_config
        merge = vc.spatial_merge_size
        grids = torch.tensor([[1, 2 * merge, 3 * merge], [1, 5 * merge, 2 * merge]])
        specials = {config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id}
        text = [t for t in range(min(cfg.d_vocab, 32)) if t not in specials][:6]
        rows = []
        for k, (_, h, w) in enumerate(grids.tolist()):
            image = [config.vision_start_token_id] + [config.image_token_id] * (h * w // merge**2) + [config.vision_end_token_id]
            rows.append(text[:k] + image + text[k:])
        length = max(map(len, rows))
        ids = torch.tensor([row + text[: length - len(row)] for row in rows])
        generator = torch.Generator().manual_seed(seed)
        per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixels = torch.randn(int(grids.prod(-1).sum()), per_patch, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids), GRID: grids,
                TYPES: (ids == config.image_token_id).long()}


class Qwen2_5_VL(Qwen2VL):
    hf_class_names = ("Qwen2_5_VLForConditionalGeneration",)
    # TransformerBridge's names (TL 4.3 wraps Qwen2.5-VL; it does not wrap Qwen2-VL). Bridge points
    # whose tensor is not ours are left out rather than aliased to something else:
    # `patch_embed.hook_out` and `vision_projector.hook_out` hold the tower's order before and after
    # the window reordering (ours: the blocks' order, and the LLM's order), `vision_projector.hook_in`
    # the residual before the merger's norm (ours: the normalised 2x2 groups), and the fused
    # `attn.qkv` has no single point here (see `hook_q/k/v`). Ours carry a leading batch dimension of one.
    bridge_aliases = (*QWEN_VISION_BLOCK_ALIASES, *QWEN2_5_VISION_MLP_ALIASES, *LLM_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES)
    vision_norm: NormKind = "RMS"
    vision_gated = True  # SwiGLU: gate_proj, up_proj, down_proj
    windowed = True

    @staticmethod
    def vision_width(vision_config: Any) -> int:
        return vision_config.hidden_size
