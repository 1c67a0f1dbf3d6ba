"""GLM-4V (Glm4vForConditionalGeneration: GLM-4.1V) and GLM-4.6V (Glm46VForConditionalGeneration
with GLM-4V's dense LLM): a native-resolution ViT -> m x m downsampling convolution and merger ->
GLM-4 LLM with multimodal rotary positions (M-RoPE).

Images become tokens as in Qwen2-VL, whose layout, geometry and tower hooks this family imports:
each image keeps its resolution (a grid per image, `image_grid_thw`), the tower runs every image of
the batch as one packed sequence, and each m x m group of patches becomes one LLM token between
`<|begin_of_image|>` and `<|end_of_image|>`; the LLM gives image tokens (t, row, col) rotary
coordinates (`get_rope_index`). What differs: the tower adds learned position embeddings,
interpolated to each image's grid, to its normalised patch embeddings (`vision.hook_embed` holds
the sum, as block 0 reads it); its blocks are Qwen2.5-VL's without windows; its adapter is a
convolution folding each m x m group and a SwiGLU merger (`tower.py`); the LLM block has sandwich
norms (`ln1_post`, `ln2_post`), q/k/v biases, a fused `gate_up_proj` MLP and a partial rotary with
interleaved pairs; the size rule is GLM's (`geometry.py`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...images.layout import ImageTokenLayout
from ...runtime.instrument import instrument_language_model
from ...runtime.norms import NormKind
from ..bridge_aliases import LLM_ALIASES, PROJECTOR_OUTPUT_ALIASES, alias
from ..gemma3.family import SANDWICH_NORM_ALIASES
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from ..qwen2_vl.family import GRID, TYPES, Qwen2VL
from ..qwen2_vl.layout import qwen_layout
from ..qwen2_vl.tower import hook_first_block_input, instrument_packed_block
from .geometry import GlmResizeGeometry
from .tower import instrument_downsampling_merger

GLM4V_BLOCK = replace(LLM_BLOCK, post_norms=("post_self_attn_layernorm", "post_mlp_layernorm"))

# TransformerBridge wraps the merger as `vision_projector`: its input is the convolution's output
PROJECTOR_HIDDEN_ALIASES = (
    alias("adapter.hook_hidden", "vision_projector.hook_in", "vision_projector.hook_vision_proj_in"),
)

# the sub-models whose blocks this family specifies, by config model_type
VISION_TOWER, DENSE_LLM = "glm4v_vision", "glm4v_text"


class Glm4v(Qwen2VL):
    hf_class_names = ("Glm4vForConditionalGeneration", "Glm46VForConditionalGeneration")
    # TransformerBridge's names (TL 4.3 wraps GLM-4V): its tower is opaque but for the merger, whose
    # input is our `adapter.hook_hidden`; its attention and MLP `hook_out` are the branch outputs before
    # the sandwich norms, which no point of ours carries, so they are not aliased (as for Gemma 3)
    bridge_aliases = (*SANDWICH_NORM_ALIASES, *PROJECTOR_HIDDEN_ALIASES, *PROJECTOR_OUTPUT_ALIASES, *LLM_ALIASES)
    special_token_fields = ("image_token_id", "image_start_token_id", "image_end_token_id")
    llm_block = GLM4V_BLOCK
    module_paths = ModulePaths(vision_tower="model.visual", vision_layers="blocks", projector="model.visual.merger",
                               llm="model.language_model")
    vision_norm: NormKind = "RMS"
    vision_gated = True

    @classmethod
    def for_checkpoint(cls, hf_model: nn.Module) -> "Glm4v":
        """GLM-4.6V's class holds GLM-4V's dense LLM or GLM-4.5V's mixture of experts (`Glm4vMoe`)."""
        from .moe import MOE_LLM, Glm4vMoe  # moe.py builds on this module

        return Glm4vMoe() if hf_model.config.text_config.model_type == MOE_LLM else cls()

    def check_supported(self, hf_model: nn.Module) -> None:
        """GLM-4V's tower and dense LLM only (GLM-4.6V's class with GLM-4.5V's mixture-of-experts LLM
        is `Glm4vMoe`'s, picked by `for_checkpoint`)."""
        config = hf_model.config
        vision, text = config.vision_config.model_type, config.text_config.model_type
        if vision != VISION_TOWER or text != DENSE_LLM:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with a {vision!r} vision tower and a {text!r} LLM is not supported: "
                f"mmlens hooks GLM-4V's {VISION_TOWER!r} tower and its dense {DENSE_LLM!r} LLM here, and GLM-4.5V's "
                "mixture-of-experts 'glm4v_moe_text' LLM in Glm4vMoeForConditionalGeneration and "
                "Glm46VForConditionalGeneration"
            )

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return replace(Llava.llm_config(tc), use_normalization_before_and_after=True)

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        vc = hf_model.config.vision_config
        visual = self.vision_tower(hf_model)
        vision = VisionConfig(
            n_layers=vc.depth, n_heads=vc.num_heads, d_model=vc.hidden_size, d_head=vc.hidden_size // vc.num_heads,
            d_mlp=visual.blocks[0].mlp.up_proj.out_features, n_key_value_heads=vc.num_heads,
            normalization_type=self.vision_norm, positional_embedding_type="rotary",
            patch_size=vc.patch_size,  # image_size 0: every image has its own resolution
            gated_mlp=self.vision_gated,
        )
        merge = vc.spatial_merge_size
        adapter = AdapterConfig(
            kind=f"conv_downsample_{merge}x{merge}_swiglu_merger",
            d_in=merge * merge * vc.hidden_size,
            d_hidden=visual.downsample.out_channels,
            d_out=visual.merger.down_proj.out_features,
            feature_layers=(vc.depth,),  # the last block, through post_layernorm
            select_strategy="full",
            n_image_tokens=0,  # variable: (h / merge) x (w / merge) per image
            token_grid=(0, 0),
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(hf_model.config.text_config))

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        self._hf_model = hf_model  # its config (layouts, input checks, probe batch) and get_rope_index
        visual = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        for layer, hooks in zip(visual.blocks, root.vision.blocks):
            instrument_packed_block(layer, hooks, self.vision_gated, use_result, self.vision_norm, self.vision_rotary)
        instrument_downsampling_merger(visual, root.vision.ln_post, root.adapter)
        handles = [hook_first_block_input(visual.blocks[0], root.vision.hook_embed)]
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    # ------------------------------------------------------------- images -> tokens
    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        config = self._hf_model.config
        grid = inputs.get(GRID)
        return qwen_layout(
            input_ids.cpu(), None if grid is None else grid.cpu(),
            image_token_id=config.image_token_id, start_token_id=config.image_start_token_id,
            end_token_id=config.image_end_token_id, patch_size=config.vision_config.patch_size,
            merge=config.vision_config.spatial_merge_size, tower_group=None,  # no windows: the LLM's order
        )

    def mask_geometry(self, processor: Any) -> GlmResizeGeometry:
        return GlmResizeGeometry.from_processor(processor)

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of different grids, between begin/end-of-image tokens with text
        around, equal lengths (no padding)."""
        config = self._hf_model.config
        vc = config.vision_config
        merge = vc.spatial_merge_size
        grids = torch.tensor([[1, 2 * merge, 3 * merge], [1, 3 * merge, 2 * merge]])
        begin, end = config.image_start_token_id, config.image_end_token_id
        specials = {config.image_token_id, config.video_token_id, begin, end}
        text = [t for t in range(min(cfg.d_vocab, 32)) if t not in specials][:3]
        rows = [text[:k] + [begin] + [config.image_token_id] * (h * w // merge**2) + [end] + text[k:]
                for k, (_, h, w) in enumerate(grids.tolist())]
        ids = torch.tensor(rows)
        per_patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        pixels = torch.randn(int(grids.prod(-1).sum()), per_patch, generator=torch.Generator().manual_seed(seed))
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids), GRID: grids,
                TYPES: (ids == config.image_token_id).long()}
