"""FastVLM (FastVlmForConditionalGeneration): FastViTHD, a timm tower (`fastvit.py`) -> a 2-layer MLP
projector -> a Qwen2 LLM, LLaVA-style.

The tower halves the resolution down to one cell per 64 px; its final convolution's feature map
`[image, channels, h, w]` is flattened in raster order and projected, one LLM token per cell, into
the image's `<image>` placeholders: LLaVA's fixed grid, with the final grid as the vision patch grid
(no CLS). `vision.blocks.{i}` are the attention blocks on that grid, so the tower's knockouts and
probes work there; the finer stages are hooked under `vision.stages.{s}`, each a vision grid of its
own (its feature map's cells, `layout.py`) that probes read and label there, before the final grid in
site order. timm imports torchvision: Hugging Face cannot build the model without both.
"""

from __future__ import annotations

from math import isqrt
from typing import Any

from jaxtyping import Int
from torch import Tensor, nn

from ....errors import UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...images.layout import ImageTokenLayout
from ...runtime.instrument import instrument_language_model
from ..base import Architecture
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from .fastvit import add_fastvit_hooks, final_grid_stages, instrument_fastvit, is_attention_block, stage_downsamples
from .layout import MultiScaleLayout
from .timm_backend import TIMM_NEEDED, timm_problem

TOWERS = ("fastvit_mci3",)  # timm's FastViTHD, the tower of every released FastVLM
LLMS = ("qwen2",)
STEM_STRIDE = 4


class FastVlm(Architecture):
    hf_class_names = ("FastVlmForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="model.vision_tower.timm_model", vision_layers="stages",  # see vision_layers
                               projector="model.multi_modal_projector", llm="model.language_model")
    llm_block = LLM_BLOCK
    vision_grids_first = True  # the finer stages' grids (`vision_grid_prefixes`, set at load) precede the final one
    # a stage's entry (the halving convolution, then the position encoding) comes before its blocks, the
    # stem before every stage; `vision.hook_final_conv` follows the final grid's blocks
    vision_entry_points = ("hook_embed", "hook_downsampled", "hook_pos_embed")
    # TransformerBridge (TL 4.3) has no FastVLM adapter: no bridge names to alias

    @classmethod
    def environment_problem(cls, config: Any) -> str | None:
        problem = timm_problem()
        return f"{problem}. {TIMM_NEEDED}" if problem else None

    def check_supported(self, hf_model: nn.Module) -> None:
        """Refuse, naming the config field, a tower or LLM this family does not hook, and a tower whose
        final grid holds anything but attention blocks (`vision.blocks` are those)."""
        config = hf_model.config
        problem = None
        if config.vision_config.model_type != "timm_wrapper" or config.vision_config.architecture not in TOWERS:
            problem = (f"config.vision_config.architecture = {getattr(config.vision_config, 'architecture', None)!r} is a "
                       f"tower mmlens does not hook in this family; supported: {list(TOWERS)}")
        elif config.text_config.model_type not in LLMS:
            problem = (f"config.text_config.model_type = {config.text_config.model_type!r} is an LLM mmlens does not hook "
                       f"in this family; supported: {list(LLMS)}")
        elif isqrt(config.image_seq_length) ** 2 != config.image_seq_length:
            problem = (f"config.image_seq_length = {config.image_seq_length} is not a square grid of tokens (FastVLM's "
                       "images are square: 256 tokens for 1024 px)")
        else:
            tower = self.vision_tower(hf_model)
            final = [block for s in final_grid_stages(tower) for block in tower.stages[s].blocks]
            kinds = [type(block).__name__ for block in final]
            if not final or not all(map(is_attention_block, final)):
                problem = (f"config.vision_config.model_args: the stages on the final grid hold {kinds}; mmlens hooks "
                           "them as vision.blocks, attention blocks as in FastViTHD (token_mixers ending in 'attention')")
        if problem:
            raise UnsupportedModelError(f"{type(hf_model).__name__}: {problem}")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        blocks = self.vision_layers(hf_model)
        attention = blocks[0].token_mixer
        width = attention.qkv.in_features
        stride = self.stride(hf_model)
        vision = VisionConfig(
            n_layers=len(blocks), n_heads=attention.num_heads, d_model=width, d_head=attention.head_dim,
            d_mlp=blocks[0].mlp.fc1.out_channels, n_key_value_heads=attention.num_heads, normalization_type="LN",
            positional_embedding_type="none",  # convolutions carry position (RepCPE before the attention stages)
            image_size=isqrt(config.image_seq_length) * stride, patch_size=stride, has_ln_post=False,
        )
        projector = self.projector(hf_model)
        adapter = AdapterConfig(
            kind=f"mlp2x_{config.projector_hidden_act}", d_in=projector.linear_1.in_features,
            d_hidden=projector.linear_1.out_features, d_out=projector.linear_2.out_features,
            feature_layers=(vision.n_layers,), select_strategy="full",
            n_image_tokens=vision.n_patches, token_grid=vision.patch_grid,
        )
        return self.assemble_config(hf_model, vision, adapter, Llava.llm_config(config.text_config))

    def stride(self, hf_model: nn.Module) -> int:
        """Pixels per final-grid cell: the stem's 4, doubled by every stage that halves the resolution."""
        return STEM_STRIDE * 2 ** sum(map(stage_downsamples, self.vision_tower(hf_model).stages))

    def stage_grids(self, hf_model: nn.Module) -> list[tuple[str, int]]:
        """(hook prefix, cell size in pixels) of every stage before the final grid, in pipeline order."""
        tower = self.vision_tower(hf_model)
        final = set(final_grid_stages(tower))
        grids, cell = [], STEM_STRIDE
        for s, stage in enumerate(tower.stages):
            if s in final:
                break
            cell *= 2 if stage_downsamples(stage) else 1
            grids.append((f"vision.stages.{s}", cell))
        return grids

    # ------------------------------------------------------------- modules and hooks
    def vision_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        """The attention blocks on the final grid, one per `vision.blocks.{i}`."""
        tower = self.vision_tower(hf_model)
        return nn.ModuleList(block for s in final_grid_stages(tower) for block in tower.stages[s].blocks)

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        tower = self.vision_tower(hf_model)
        final = set(final_grid_stages(tower))
        earlier = [(f"vision.stages.{s}.blocks.{j}", block) for s, stage in enumerate(tower.stages) if s not in final
                   for j, block in enumerate(stage.blocks)]
        return earlier + super().blocks(hf_model)

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        tower = self.vision_tower(hf_model)
        add_fastvit_hooks(root.vision, tower)
        handles = instrument_fastvit(tower, root.vision, use_result)
        Llava._instrument_projector(self.projector(hf_model), root.adapter)
        self._stage_grids = tuple(self.stage_grids(hf_model))
        self.vision_grid_prefixes = tuple(prefix for prefix, _ in self._stage_grids)
        # the stem's output is on the first stage's grid (that stage does not halve it): probes read it there
        self.vision_points_on_grids = {"vision.hook_embed": prefix for prefix, cell in self._stage_grids[:1]
                                       if cell == STEM_STRIDE}
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    # ------------------------------------------------------------- images -> tokens
    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        return MultiScaleLayout.around(super().layout(cfg, input_ids, **inputs), getattr(self, "_stage_grids", ()),
                                       STEM_STRIDE)
