"""InternVL (InternVLForConditionalGeneration): InternViT tower on 448-px tiles plus a thumbnail,
pixel shuffle, an LN + MLP projector, a Qwen2 (InternVL3) or Llama LLM.

The processor cuts each image into `rows x cols` tiles chosen by aspect ratio and appends a
thumbnail (see `geometry.py`); the prompt holds `<img>`, one run of `<IMG_CONTEXT>` (`n`
tokens per tile, the thumbnail last) and `</img>`. InternViT blocks are pre-norm with a CLS token and
per-channel layer scale parameters (`lambda_1`, `lambda_2`); the 6B towers RMS-normalise queries and
keys over the whole width before splitting heads. The model drops the CLS token, folds each 2 x 2
square of patches into one token (pixel shuffle, `downsample_ratio` 0.5), and projects with
LayerNorm + MLP. The run of tokens does not say how the tiles are arranged (6 tiles are 2 x 3 or
3 x 2), so the layout needs each image's size (`image_sizes`, which `prepare` records and never
passes to Hugging Face): each image is the tile grid and the thumbnail, both on the original image.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Int
from torch import Tensor, nn

from ....errors import InputError, LayoutMismatchError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, VisionConfig
from ...hook_tree import fire
from ...runtime.devices import bare_forward
from ...runtime.instrument import (
    AttentionSpec, BlockSpec, _override_forward, hook_module_output, instrument_block, instrument_language_model,
)
from ...images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment, image_runs
from ...runtime.norms import instrument_norm
from ..base import Architecture
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from ..passed_checks import passed_checks
from ..pixel_shuffle import shuffle_map
from .geometry import TileGeometry, Tiling, edges_on_original

SIZES = "image_sizes"  # layout-only: each image's original (height, width)


def original_sizes(inputs: dict[str, Tensor], needed: bool, why: str) -> list[tuple[int, int]]:
    """Each image's original (height, width) from the layout-only `image_sizes`, which tiling
    families need to place an image's tiles; [] when absent and not `needed`, else refused saying
    `why` the layout needs them and how to pass them."""
    given = inputs.get(SIZES)
    if given is None:
        if needed:
            raise InputError(f"{why}. Build inputs with model.prepare(images, prompts), or pass image_sizes with the "
                             "processor's outputs")
        return []
    return [(int(h), int(w)) for h, w in torch.as_tensor(given).tolist()]


class _Unpatch:
    """Handle that takes an instance-level method override off again."""

    def __init__(self, owner: Any, name: str) -> None:
        self.owner, self.name = owner, name

    def remove(self) -> None:
        self.owner.__dict__.pop(self.name, None)


class InternVL(Architecture):
    hf_class_names = ("InternVLForConditionalGeneration",)
    layout_input_names = (SIZES,)
    llms = ("qwen2", "llama")
    llm_block = LLM_BLOCK
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="encoder.layer",
                               projector="model.multi_modal_projector", llm="model.language_model")
    llm_config = staticmethod(Llava.llm_config)
    tiling: Tiling | None = None  # the processor's, read by `use_processor`
    markers: dict[str, int] | None = None  # ids of <img> and </img>

    # ------------------------------------------------------------- modules
    @staticmethod
    def vision_block(vision_config: Any) -> BlockSpec:
        """InternViT's block: norms before attention and MLP, layer scale parameters on both branches,
        and (use_qk_norm) RMSNorms over the whole query and key projections."""
        qk = bool(vision_config.use_qk_norm)
        return BlockSpec(
            ln1="layernorm_before", attn="attention", ln2="layernorm_after", mlp="mlp", gated_mlp=False,
            attention=AttentionSpec(o="projection_layer", scaling="scale", rotary=False,
                                    q_norm="q_norm" if qk else None, k_norm="k_norm" if qk else None,
                                    qk_norm_over="width", qk_norm_kind="RMS"),
            layer_scale=("lambda_1", "lambda_2"),
        )

    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        text_type = config.text_config.model_type
        if text_type not in self.llms:
            raise UnsupportedModelError(f"{type(hf_model).__name__} with a {text_type!r} LLM is not supported; "
                                        f"supported: {list(self.llms)}")
        if config.vision_feature_select_strategy != "default":
            raise UnsupportedModelError(f"vision_feature_select_strategy={config.vision_feature_select_strategy!r}: "
                                        "the pixel shuffle needs the patches without the CLS token ('default')")
        if 1 / config.downsample_ratio != int(1 / config.downsample_ratio):
            raise UnsupportedModelError(f"downsample_ratio {config.downsample_ratio}: the pixel shuffle folds r x r "
                                        "patches for a whole r only")
        vc = config.vision_config
        if tuple(vc.image_size)[0] != tuple(vc.image_size)[1] or tuple(vc.patch_size)[0] != tuple(vc.patch_size)[1]:
            raise UnsupportedModelError(f"InternViT with non-square tiles or patches ({vc.image_size}, {vc.patch_size})")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc = config.vision_config
        self.scale = int(1 / config.downsample_ratio)
        tile, patch = int(tuple(vc.image_size)[0]), int(tuple(vc.patch_size)[0])
        vision = VisionConfig.from_encoder(
            vc, d_mlp=vc.intermediate_size, normalization_type="LN" if vc.norm_type == "layer_norm" else "RMS",
            positional_embedding_type="learned", image_size=tile, patch_size=patch, has_cls=True, n_registers=0,
            has_ln_pre=False, has_ln_post=not vc.use_mean_pooling, use_qk_norm=bool(vc.use_qk_norm),
        )
        side = tile // patch
        if side % self.scale:
            raise UnsupportedModelError(f"{side} patches per tile side do not fold by the pixel shuffle's {self.scale}")
        tokens = side // self.scale
        projector = self.projector(hf_model)
        n_states = vision.n_layers + 1  # embeddings, then one per block
        adapter = AdapterConfig(
            kind=f"pixel_shuffle{self.scale}_ln_mlp2x_{config.projector_hidden_act}", d_in=vc.hidden_size,
            d_hidden=projector.linear_1.in_features,  # hook_hidden: the shuffled features, before LN + MLP
            d_out=projector.linear_2.out_features, feature_layers=(config.vision_feature_layer % n_states,),
            select_strategy="default", n_image_tokens=tokens * tokens, token_grid=(tokens, tokens),  # per frame
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(config.text_config))

    def use_processor(self, processor: Any) -> None:
        image_processor = getattr(processor, "image_processor", None)
        if image_processor is not None and hasattr(image_processor, "crop_image_to_patches"):
            self.tiling = Tiling.from_processor(processor)
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None and getattr(tokenizer, "start_image_token", None):
            self.markers = {"start": tokenizer.start_image_token_id, "end": tokenizer.end_image_token_id}

    def mask_geometry(self, processor: Any) -> TileGeometry:
        return TileGeometry(processor)

    def patch_to_token(self, cfg: MLLMConfig) -> Int[Tensor, "n_patches"]:
        return shuffle_map(cfg.vision.image_size // cfg.vision.patch_size, self.scale)

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        tower = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vision_norm = root.cfg.vision.normalization_type
        block = self.vision_block(hf_model.config.vision_config)
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, block, use_result, vision_norm)
        handles = [hook_module_output(tower.embeddings, root.vision.hook_embed)]
        if root.cfg.vision.has_ln_post:  # use_mean_pooling=False: a LayerNorm after the last block
            instrument_norm(tower.layernorm, root.vision.ln_post, "LN")
        handles.append(self._instrument_adapter(hf_model.model, self.projector(hf_model), root.adapter))
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    @staticmethod
    def _instrument_adapter(model: nn.Module, projector: nn.Module, adapter: Any) -> _Unpatch:
        """`adapter.hook_in`: the patches without CLS ([frames, patches, d]) as the pixel shuffle
        reads them; `hook_hidden`: the shuffled features ([frames, tokens, r*r*d]); `hook_out`: the
        projector's output, what the LLM receives."""
        shuffle = model.pixel_shuffle
        original = bare_forward(projector)

        def pixel_shuffle(features: Tensor, scale_factor: float = 0.5) -> Tensor:
            side = features.shape[1]
            x = fire(adapter.hook_in, features.flatten(1, 2)).unflatten(1, (side, -1))
            out = shuffle(x, scale_factor=scale_factor)
            return fire(adapter.hook_hidden, out.flatten(1, 2)).unflatten(1, out.shape[1:3])

        def project(image_features: Tensor) -> Tensor:
            return fire(adapter.hook_out, original(image_features))

        model.pixel_shuffle = pixel_shuffle  # an instance attribute shadows the method; _Unpatch removes it
        _override_forward(projector, project)
        return _Unpatch(model, "pixel_shuffle")

    # ------------------------------------------------------------- images -> tokens
    def layout_inputs(self, images: list[list[Any]]) -> dict[str, Tensor]:
        """Each image's original (height, width), in `pixel_values` order (row by row)."""
        return {SIZES: torch.tensor([[image.height, image.width] for row in images for image in row], dtype=torch.long)}

    def _tiling(self) -> Tiling:
        if self.tiling is None:
            raise InputError("the InternVL layout replays the processor's tiling; pass processor= to HookedMLLM.from_hf")
        return self.tiling

    @staticmethod
    def _sizes(inputs: dict[str, Tensor], needed: bool) -> list[tuple[int, int]]:
        return original_sizes(
            inputs, needed, "InternVL's layout needs each image's original size (image_sizes, [n_images, 2] as (height, "
            "width)): the processor returns neither it nor the tile grid, and the image tokens alone do not fix the "
            "grid (6 tiles are 2 x 3 or 3 x 2)")

    def _images(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], sizes: list[tuple[int, int]]) -> list[list[tuple]]:
        """Per batch row, its images as (image, first position, size, grid, first frame): the
        placeholders walked image by image, as the model fills them with the frames in order."""
        runs = image_runs(input_ids, cfg.image_token_id)
        if not sizes:
            if any(len(r) for r in runs):
                self._sizes({}, needed=True)  # raises, saying what to do
            return [[] for _ in runs]
        tiling = self._tiling()
        if tiling.tile != cfg.vision.image_size:
            raise InputError(f"the processor's tiles are {tiling.tile} px but the tower takes {cfg.vision.image_size} px")
        n = cfg.adapter.n_image_tokens
        rows, image, frame = [], 0, 0
        for b, where in enumerate(runs):
            found, used = [], 0
            while used < len(where):
                if image >= len(sizes):
                    raise LayoutMismatchError(f"batch row {b} has image tokens beyond the {len(sizes)} image(s) in image_sizes")
                grid, frames = tiling.grid(sizes[image]), tiling.n_frames(sizes[image])
                count = frames * n
                block = where[used: used + count]
                if len(block) < count or int(block[-1] - block[0]) != count - 1:
                    raise LayoutMismatchError(
                        f"batch row {b}: image {image} of size {sizes[image]} is {grid[0]} x {grid[1]} tiles"
                        f"{' + a thumbnail' if grid != (1, 1) else ''}, {count} contiguous image tokens; found {len(block)} "
                        f"from position {int(block[0])}. Were the prompts expanded by this model's processor, "
                        "with its default tiling?")
                found.append((image, int(block[0]), sizes[image], grid, frame))
                used, image, frame = used + count, image + 1, frame + frames
            rows.append(found)
        if image != len(sizes):
            raise LayoutMismatchError(f"{len(sizes)} image_sizes but image tokens for {image} image(s) in input_ids")
        return rows

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        images = self._images(cfg, input_ids, self._sizes(inputs, needed=False))
        rows = tuple(tuple(self._span(cfg, b, *image, input_ids[b]) for image in row) for b, row in enumerate(images))
        frames = sum(self._tiling().n_frames(size) for row in images for _, _, size, _, _ in row)
        g = cfg.vision.image_size // cfg.vision.patch_size
        return ImageTokenLayout(rows, input_ids.shape[1], (frames, 1 + g * g), (frames, cfg.adapter.n_image_tokens))

    def _span(self, cfg: MLLMConfig, b: int, image: int, first: int, size: tuple[int, int], grid: tuple[int, int],
              frame0: int, ids: Tensor) -> ImageSpan:
        """The tiles as one joined grid (token (R, C) is token (R % k, C % k) of tile (R // k, C // k)),
        then the thumbnail when there are several tiles; both laid on the original image."""
        tile, patch = cfg.vision.image_size, cfg.vision.patch_size
        n, k, g = cfg.adapter.n_image_tokens, cfg.adapter.token_grid[0], tile // patch
        shuffle = self.patch_to_token(cfg)
        (height, width), (n_rows, n_cols) = size, grid

        def on_image(cells_down: int, cells_across: int, px: int, tiles_down: int, tiles_across: int) -> GridCells:
            return GridCells(edges_on_original(cells_down, px, tiles_down * tile, height),
                             edges_on_original(cells_across, px, tiles_across * tile, width))

        tokens = on_image(n_rows * k, n_cols * k, tile // k, n_rows, n_cols)
        patches = on_image(n_rows * g, n_cols * g, patch, n_rows, n_cols)
        tr, tc = tokens.cells[:, 0], tokens.cells[:, 1]
        which = (tr // k) * n_cols + tc // k  # the tile of each token of the joined grid
        within = (tr % k) * k + tc % k
        pr, pc = patches.cells[:, 0], patches.cells[:, 1]
        patch_tile = (pr // g) * n_cols + pc // g
        patch_within = (pr % g) * g + pc % g
        fed = shuffle[patch_within]  # the token of its own tile each patch feeds
        joined = ((patch_tile // n_cols) * k + fed // k) * (n_cols * k) + (patch_tile % n_cols) * k + fed % k
        segments = [Segment("tiles", tokens, first + which * n + within, (frame0 + which, within),
                            patches, (frame0 + patch_tile, 1 + patch_within), joined)]  # vision position 0 is CLS
        if n_rows * n_cols > 1:
            thumb = frame0 + n_rows * n_cols
            local_tokens, local_patches = torch.arange(k * k), torch.arange(g * g)
            segments.append(Segment("thumbnail", on_image(k, k, tile // k, 1, 1), first + (thumb - frame0) * n + local_tokens,
                                    (torch.full((k * k,), thumb), local_tokens), on_image(g, g, patch, 1, 1),
                                    (torch.full((g * g,), thumb), 1 + local_patches), shuffle.clone()))
        end = first + (n_rows * n_cols + len(segments) - 1) * n
        special = {"start": torch.tensor([first - 1]), "end": torch.tensor([end])}
        if self.markers is not None:
            found = (int(ids[first - 1]) if first else None, int(ids[end]) if end < len(ids) else None)
            if found != (self.markers["start"], self.markers["end"]):
                raise LayoutMismatchError(f"batch row {b}: image {image}'s tokens are not wrapped in <img> ... </img>")
        return ImageSpan(b, image, tuple(segments), (height, width), special)

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Tensor:
        """Image `image_index` as the tower saw it: its tiles put back together, [3, rows*T, cols*T]
        (the image resized to its grid; a one-tile image is that tile)."""
        sizes, tiling = self._sizes(inputs, needed=True), self._tiling()
        first = sum(tiling.n_frames(s) for s in sizes[:image_index])
        rows, cols = tiling.grid(sizes[image_index])
        tiles = pixel_values[first: first + rows * cols]
        return einops.rearrange(tiles, "(r c) ch h w -> ch (r h) (c w)", r=rows, c=cols)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError("image tokens in input_ids but no pixel_values")
            return
        tile = cfg.vision.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, tile, tile):
            raise InputError(f"pixel_values have shape {tuple(pixel_values.shape)} but {cfg.architecture} takes "
                             f"[frames, 3, {tile}, {tile}] (every image's tiles and thumbnail); use model.prepare(...)")
        if n_tokens != len(pixel_values) * cfg.adapter.n_image_tokens:
            need = len(pixel_values) * cfg.adapter.n_image_tokens
            raise InputError(f"{len(pixel_values)} frames (tiles and thumbnails) need {need} "
                             f"image tokens but input_ids hold {n_tokens}; the prompts' placeholders and the images must match")
        sizes = self._sizes(inputs, needed=False)
        if sizes:
            # the tilings and the walk read the ids, the sizes and the number of frames only: once per batch's values
            passed_checks(self).run(lambda: self._check_tilings(cfg, input_ids, sizes, len(pixel_values)),
                                    input_ids, sizes, len(pixel_values))

    def _check_tilings(self, cfg: MLLMConfig, input_ids: Tensor, sizes: list[tuple[int, int]], n_frames: int) -> None:
        """Refuse images whose tilings make another number of frames than `n_frames`, or whose
        placeholders the walk image by image (as the model fills them) does not find."""
        tiling = self._tiling()
        frames = sum(tiling.n_frames(s) for s in sizes)
        if frames != n_frames:
            raise InputError(f"image_sizes {sizes} make {frames} frames but pixel_values hold {n_frames}")
        try:
            self._images(cfg, input_ids, sizes)
        except LayoutMismatchError as error:
            raise InputError(f"images of sizes {sizes} and the prompts' placeholders do not match: {error}") from None

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows: an image of one tile, and one of 1 x 2 tiles plus its thumbnail (no sizes: the
        model does not need them, only the layout does)."""
        generator = torch.Generator().manual_seed(seed)
        tile, n = cfg.vision.image_size, cfg.adapter.n_image_tokens
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        start, end = (self.markers["start"], self.markers["end"]) if self.markers else (text[1], text[2])
        rows = [[start, *[cfg.image_token_id] * n, end] + text, [start, *[cfg.image_token_id] * (3 * n), end] + text]
        length = max(map(len, rows))
        ids = torch.tensor([[text[0]] * (length - len(r)) + r for r in rows])
        pixels = torch.randn(4, 3, tile, tile, generator=generator)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids)}
