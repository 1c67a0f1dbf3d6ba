"""Aya Vision (AyaVisionForConditionalGeneration): a SigLIP tower on GotOcr2 tiles plus a thumbnail,
a pixel shuffle + LayerNorm + SwiGLU projector, and a Cohere2 LLM of parallel blocks (`cohere2.py`).

The processor cuts each image into the tile grid closest to its aspect ratio (GotOcr2's tiling,
replayed from the image's size like InternVL's) and appends a thumbnail when there are several
tiles; each frame goes through the tower alone. The projector reads one tower hidden state
(`vision_feature_layer`, every patch: SigLIP has no CLS token), folds each r x r square of patches
into one token (`downsample_factor`), LayerNorms it and projects it with a SwiGLU (linear, then
`silu(gate) * x` on its two halves, then linear). In the prompt each tile's run of `<|IMG_PATCH|>`
follows its `TILE_i` text and the thumbnail's follows `TILE_GLOBAL`, all between `<|START_OF_IMG|>`
and `<|END_OF_IMG|>` (`layout.py`); the tile grid, which the tokens do not say, needs each image's
size (`image_sizes`, layout-only). The LLM's sliding-window layers take a mask of their own.
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import InputError, LayoutMismatchError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_tree import fire
from ...images.layout import ImageTokenLayout
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward
from ..gemma3 import Gemma3
from ..internvl.family import SIZES, InternVL, _Unpatch, original_sizes
from ..internvl.geometry import Tiling
from ..llama4.layout import FrameSizes
from ..llava import Llava
from ..module_paths import ModulePaths
from ..pixel_shuffle import shuffle_map
from .cohere2 import COHERE2_BLOCK, COHERE2_BRIDGE_ALIASES, cohere2_llm_config
from .layout import END, START, marked_tiles_span


class AyaVision(Llava):
    hf_class_names = ("AyaVisionForConditionalGeneration",)
    vision_towers = ("siglip_vision_model",)
    llms = ("cohere2",)
    llm_block = COHERE2_BLOCK
    bridge_aliases = COHERE2_BRIDGE_ALIASES
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="encoder.layers",
                               projector="model.multi_modal_projector", llm="model.language_model")
    layout_input_names = (SIZES,)
    marker_kind = "tile_tag"  # the TILE_i / TILE_GLOBAL text before each run
    # filled by `use_processor`: GotOcr2's tiling settings and the ids of the image's start and end markers
    tiling: Tiling | None = None
    tiling_kind: type[Tiling] = Tiling  # GotOcr2's canvas rule
    markers: dict[str, int] | None = None

    # ------------------------------------------------------------- config
    def check_supported(self, hf_model: nn.Module) -> None:
        super().check_supported(hf_model)
        config = hf_model.config
        if not isinstance(config.vision_feature_layer, int):
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with vision_feature_layer={config.vision_feature_layer!r}: the projector's "
                "input is hooked as one tower hidden state; use a checkpoint that reads a single layer (an int)")
        if config.vision_feature_select_strategy != "full":
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with vision_feature_select_strategy="
                f"{config.vision_feature_select_strategy!r}: SigLIP has no CLS token, so 'default' drops a patch and the "
                "pixel shuffle no longer folds a square grid; only 'full' is supported")
        self.check_shuffle(hf_model)

    @staticmethod
    def check_shuffle(hf_model: nn.Module) -> None:
        config = hf_model.config
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        if side % config.downsample_factor:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__}: {side} x {side} patches per tile do not fold by downsample_factor="
                f"{config.downsample_factor}; the pixel shuffle folds whole squares of patches")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        config = super().build_config(hf_model)
        text = hf_model.config.text_config
        self.sliding_window = text.sliding_window if "sliding_attention" in text.layer_types else None
        return config

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        return cohere2_llm_config(tc)

    def adapter_config(self, hf_model: nn.Module, vision: VisionConfig) -> AdapterConfig:
        config = hf_model.config
        self.shuffle = config.downsample_factor
        k = vision.patch_grid[0] // self.shuffle
        projector = self.projector(hf_model)
        return AdapterConfig(
            kind=f"pixel_shuffle{self.shuffle}_{self._projector_kind}", d_in=vision.d_model,
            d_hidden=projector.linear_1.in_features,  # hook_hidden: the shuffled patches, before the projection
            d_out=projector.linear_2.out_features, feature_layers=(self.feature_layer(hf_model, vision),),
            select_strategy="full", n_image_tokens=k * k, token_grid=(k, k),  # per frame (tile or thumbnail)
        )

    _projector_kind = "ln_swiglu"

    @staticmethod
    def feature_layer(hf_model: nn.Module, vision: VisionConfig) -> int:
        """The tower hidden state the projector reads (`vision_feature_layer`; the last block's, before
        the post-LayerNorm, by default)."""
        return hf_model.config.vision_feature_layer % (vision.n_layers + 1)

    # ------------------------------------------------------------- hooks
    @staticmethod
    def _instrument_projector(projector: nn.Module, hooks: Any) -> None:
        """`adapter.hook_in`: the tower's patches as the projector reads them ([frames, patches, d]);
        `hook_hidden`: each token's r x r patches stacked by the pixel shuffle ([frames, tokens, r*r*d]);
        `hook_out`: the projector's output, what the LLM receives ([frames, tokens, d_model])."""
        shuffle, original = projector.pixel_shuffle, bare_forward(projector)

        def pixel_shuffle(features: Tensor) -> Tensor:
            out = shuffle(fire(hooks.hook_in, features))
            return fire(hooks.hook_hidden, out.flatten(1, 2)).unflatten(1, out.shape[1:3])

        def forward(image_features: Tensor) -> Tensor:
            out = original(image_features)
            return fire(hooks.hook_out, out.flatten(1, 2)).unflatten(1, out.shape[1:3])

        projector.pixel_shuffle = pixel_shuffle  # an instance attribute shadows the method; `instrument`'s handle removes it
        _override_forward(projector, forward)

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        handles = super().instrument(hf_model, root)  # Llava's tower, LLM and (through the override above) projector
        return handles + [_Unpatch(self.projector(hf_model), "pixel_shuffle")]

    # ------------------------------------------------------------- attention
    # One 4D mask per layer type, as Cohere2's forward takes them: sliding layers also drop keys
    # `sliding_window` or more positions back (Gemma 3's rule)
    hf_attention_mask = Gemma3.hf_attention_mask

    # ------------------------------------------------------------- images -> tokens
    def use_processor(self, processor: Any) -> None:
        image_processor, tokenizer = getattr(processor, "image_processor", None), getattr(processor, "tokenizer", None)
        if image_processor is not None and hasattr(image_processor, "max_patches"):  # a tiling processor
            self.tiling = self.tiling_kind.from_processor(processor)
        if tokenizer is not None:
            self.markers = {kind: tokenizer.convert_tokens_to_ids(token) for kind, token in self._marker_tokens(processor).items()}

    @staticmethod
    def _marker_tokens(processor: Any) -> dict[str, str]:
        return {START: processor.start_of_img_token, END: processor.end_of_img_token}

    # each image's original (height, width), in `pixel_values` order, as InternVL's layout takes them
    layout_inputs = InternVL.layout_inputs
    mask_geometry = InternVL.mask_geometry  # the layout's canvas is the original image
    image_pixels = InternVL.image_pixels  # the tiles put back together
    probe_inputs = InternVL.probe_inputs  # a one-tile image and a 1 x 2 one with its thumbnail

    def _sizes(self, inputs: dict[str, Tensor], needed: bool) -> list[tuple[int, int]]:
        return original_sizes(
            inputs, needed, f"{type(self).__name__}'s layout needs each image's original size (image_sizes, [n_images, 2] "
            "as (height, width)): the processor returns neither it nor the tile grid, and the runs of image tokens "
            "alone do not fix the grid (6 tiles are 2 x 3 or 3 x 2)")

    def _tiling(self) -> Tiling:
        if self.tiling is None or self.markers is None:
            raise InputError(f"the {type(self).__name__} layout replays the processor's tiling and reads its image "
                             "markers; pass processor= to HookedMLLM.from_hf")
        return self.tiling

    def patch_to_token(self, cfg: MLLMConfig) -> Int[Tensor, "n_patches"]:
        return shuffle_map(cfg.vision.patch_grid[0], self.shuffle)

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        ids_all = input_ids.cpu()
        placeholders = int((ids_all == cfg.image_token_id).sum())
        sizes = self._sizes(inputs, needed=placeholders > 0)
        side = cfg.vision.patch_grid[0]
        frame_sizes = FrameSizes(cfg.vision.image_size, cfg.vision.patch_size, side, cfg.adapter.token_grid[0], self.shuffle)
        tiling = self._tiling() if placeholders else None
        if tiling is not None and tiling.tile != cfg.vision.image_size:
            raise InputError(f"the processor's tiles are {tiling.tile} px but the tower takes {cfg.vision.image_size} px")
        rows: list[tuple] = []
        image = frame = covered = 0
        for b, ids in enumerate(ids_all):
            spans = []
            starts = (ids == self.markers[START]).nonzero().flatten().tolist() if placeholders else []
            for start in starts:
                if image >= len(sizes):
                    raise LayoutMismatchError(f"batch row {b} has images beyond the {len(sizes)} in image_sizes")
                grid = tiling.grid(sizes[image])
                spans.append(marked_tiles_span(b, image, start, ids, sizes[image], grid, frame, frame_sizes, self.markers,
                                               cfg.image_token_id, self.marker_kind))
                image, frame, covered = image + 1, frame + tiling.n_frames(sizes[image]), covered + len(spans[-1].positions)
            rows.append(tuple(spans))
        if image != len(sizes) or covered != placeholders:
            raise LayoutMismatchError(f"{len(sizes)} image_sizes and {placeholders} image tokens, but {image} image(s) "
                                      f"between start and end markers cover {covered} of them")
        return ImageTokenLayout(tuple(rows), input_ids.shape[1], (frame, side * side), (frame, frame_sizes.n))

    # pixel_values, image tokens and image_sizes agree, and `_images` walks the placeholders image by image
    check_inputs = InternVL.check_inputs
    _check_tilings = InternVL._check_tilings

    def _images(self, cfg: MLLMConfig, input_ids: Tensor, sizes: list[tuple[int, int]]) -> ImageTokenLayout:
        """The layout of these images, which refuses placeholders the images' tilings do not give."""
        return self.layout(cfg, input_ids, **{SIZES: torch.tensor(sizes)})
