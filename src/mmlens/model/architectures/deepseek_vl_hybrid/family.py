"""DeepSeek-VL hybrid (DeepseekVLHybridForConditionalGeneration): a SigLIP tower on `pixel_values`
and SAM's ViT on `high_res_pixel_values` -> an aligner that projects each tower's features to half
the LLM width, concatenates them (high-res first), applies GELU and a linear -> Llama LLM.

SigLIP is hooked as `vision.*`, exactly as in DeepSeek-VL; SAM as the second vision stage
`vision.high_res.*` (`sam_tower.py`), whose last block (through SAM's neck) and first
global-attention block (through the hybrid's neck) are resized and downsampled onto SigLIP's patch
grid, mixed by a learned alpha, and read by the aligner. Both towers end on the LLM's token grid,
so the layout is DeepSeek-VL's fixed grid; `high_res_grid` places SAM's patches on it
(`geometry.py`), and the layout names SAM's patch grid as a second vision grid, which probes on
`vision.high_res.*` read through (`layout.py`). The token-group knockout (`stage="vision"`) edits SigLIP's blocks; SAM's windowed
attention has no knockout (a key outside a query's window is out of reach already): edit its
`hook_attn_scores` with hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ....errors import InputError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.instrument import _override_forward
from ..deepseek_vl import DeepseekVL
from .geometry import HighResGrid, TwoResolutionGeometry
from .layout import HIGH_RES_PREFIX, TwoTowerLayout
from .sam_tower import HighResTowerHooks, add_points, instrument_high_res_path

HIGH_RES_TOWERS = ("sam_vision_model",)
HIGH_RES_INPUT = "high_res_pixel_values"
# the aligner's points beyond DeepSeek-VL's (`hook_in` is SigLIP's features, `hook_hidden` what `proj` reads)
ALIGNER_POINTS = ("hook_in_high_res", "hook_low_res_proj", "hook_high_res_proj")


class DeepseekVLHybrid(DeepseekVL):
    hf_class_names = ("DeepseekVLHybridForConditionalGeneration",)
    extra_input_names = (HIGH_RES_INPUT,)
    vision_grid_prefixes = (HIGH_RES_PREFIX,)

    def check_supported(self, hf_model: nn.Module) -> None:
        super().check_supported(hf_model)
        model_type = hf_model.config.high_res_vision_config.model_type
        if model_type not in HIGH_RES_TOWERS:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__}: config.high_res_vision_config.model_type = {model_type!r} is a high-res "
                f"tower mmlens does not hook in this family; supported: {list(HIGH_RES_TOWERS)}"
            )

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        config = super().build_config(hf_model)
        tower = hf_model.config.high_res_vision_config
        side, patch = _square(tower.image_size, "image_size"), _square(tower.patch_size, "patch_size")
        self.high_res_side = side
        self.high_res_grid = HighResGrid((side // patch, side // patch), (side, side), config.adapter.token_grid)
        self.high_res_window = int(tower.window_size)
        return config

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        aligner = self.projector(hf_model)
        return AdapterConfig(
            kind="two_tower_concat_gelu",  # each tower's linear, concatenated, a fixed nn.GELU(), then `proj`
            d_in=aligner.vision_proj.in_features,
            d_hidden=aligner.proj.in_features,
            d_out=aligner.proj.out_features,
            feature_layers=(vision.n_layers,),  # SigLIP's last block, read after ln_post
            select_strategy="full",
            n_image_tokens=vision.n_patches,
            token_grid=vision.patch_grid,
        )

    def layout(self, cfg: MLLMConfig, input_ids: Tensor, **inputs: Tensor) -> TwoTowerLayout:
        return TwoTowerLayout.around(super().layout(cfg, input_ids, **inputs), self.high_res_grid, self.high_res_window)

    def mask_geometry(self, processor: Any) -> TwoResolutionGeometry:
        return TwoResolutionGeometry.from_processor(processor)

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        add_points(root.adapter, *ALIGNER_POINTS)  # before the aligner is hooked onto them
        handles = super().instrument(hf_model, root)
        tower = hf_model.config.high_res_vision_config
        root.vision.high_res = HighResTowerHooks(tower.num_hidden_layers, bool(tower.use_rel_pos))
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        return handles + instrument_high_res_path(hf_model.model, root.vision.high_res, use_result)

    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        def forward(vision_encodings: Tensor, high_res_vision_encodings: Tensor) -> Tensor:
            low = fire(hooks.hook_low_res_proj, projector.vision_proj(fire(hooks.hook_in, vision_encodings)))
            high = fire(hooks.hook_in_high_res, high_res_vision_encodings)
            high = fire(hooks.hook_high_res_proj, projector.high_res_vision_proj(high))
            hidden = fire(hooks.hook_hidden, projector.act(torch.concat([high, low], dim=-1)))
            return fire(hooks.hook_out, projector.proj(hidden))

        _override_forward(projector, forward)

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        stacks = super().blocks(hf_model)
        n_vision = len(self.vision_layers(hf_model))
        layers = hf_model.model.high_res_vision_model.vision_encoder.layers
        high_res = [(f"vision.high_res.blocks.{i}", layer) for i, layer in enumerate(layers)]
        return stacks[:n_vision] + high_res + stacks[n_vision:]

    # ------------------------------------------------------------- inputs
    def hf_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The keywords Hugging Face's forward and `generate` get, the high-res pixels in the dtype
        of `pixel_values` (which `prepare` casts to the model's; the processor returns float32)."""
        kwargs = super().hf_keywords(kwargs)
        pixels, high_res = kwargs.get("pixel_values"), kwargs.get(HIGH_RES_INPUT)
        if pixels is not None and high_res is not None and high_res.is_floating_point():
            kwargs[HIGH_RES_INPUT] = high_res.to(pixels.dtype)
        return kwargs

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        super().check_inputs(cfg, input_ids, pixel_values, **inputs)
        high_res, side = inputs.get(HIGH_RES_INPUT), self.high_res_side
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_images and (high_res is None or tuple(high_res.shape) != (n_images, 3, side, side)):
            got = "none" if high_res is None else f"shape {tuple(high_res.shape)}"
            raise InputError(
                f"{HIGH_RES_INPUT}: this model's SAM tower reads each image again at {side} x {side} pixels, "
                f"[{n_images}, 3, {side}, {side}] for these {n_images} image(s), but got {got}; "
                "preprocess images with model.prepare(...), which returns both"
            )

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        inputs = super().probe_inputs(cfg, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        side = self.high_res_side
        return {**inputs, HIGH_RES_INPUT: torch.randn(len(inputs["pixel_values"]), 3, side, side, generator=generator)}


def _square(size: Any, field: str) -> int:
    """A SAM config's `image_size` / `patch_size` as one side (the hybrid's grids are square)."""
    sides = [int(size)] * 2 if isinstance(size, int) else [int(s) for s in size]
    if sides[0] != sides[1]:
        raise UnsupportedModelError(f"config.high_res_vision_config.{field} = {size!r}: the hybrid's high-res "
                                    "tower is square in mmlens (and in every released checkpoint)")
    return sides[0]
