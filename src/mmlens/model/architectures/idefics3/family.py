"""Idefics3 and SmolVLM (Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration): a
SigLIP-like tower on square tiles, a pixel-shuffle connector, a Llama LLM.

The processor resizes each image (longest edge to `size`, then both sides up to multiples of the
tile size `T`), cuts it into `rows x cols` tiles and appends the whole image squashed to `T x T`
(the global image); a small image is only that global image. Every tile's and the global image's
tokens are wrapped in text separators: `<fake_token_around_image><row_i_col_j>` before a tile,
`<fake_token_around_image><global-img>` before the global image, row breaks between rows and a
closing `<fake_token_around_image>`, so one image is several runs of `<image>` tokens. The
connector's pixel shuffle folds each `r x r` square of patches into one token (`r` =
`scale_factor`), then one linear map. Each image is two segments on the processed canvas (the
resized image the tiles are cut from): the tiles as one grid, and the global image; separators
are special tokens outside every grid. Frames the processor added only as padding (all zeros)
are dropped by the model before the tower, so vision activations are one row per real frame.
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
from ...images.layout import GridCells, ImageSpan, ImageTokenLayout, Segment, image_runs
from ...runtime.instrument import _override_forward, hook_module_output, instrument_block, instrument_language_model
from ...runtime.norms import instrument_norm
from ..base import Architecture
from .geometry import SplitGeometry
from ..bridge_aliases import (
    CLIP_TOWER_ALIASES, LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, PROJECTOR_INPUT_ALIASES, PROJECTOR_OUTPUT_ALIASES,
)
from ..llava import LLM_BLOCK, Llava
from ..module_paths import ModulePaths
from ..pixel_shuffle import shuffle_map
from ..towers import CLIP_BLOCK

# The separators of one image, by the kind they are recorded under in the layout.
SEPARATOR, TILE_TAG, GLOBAL_TAG, ROW_BREAK = "separator", "tile_tag", "global_tag", "row_break"


def _squashed_edges(n: int, cell: int, tile: int, canvas: int) -> Int[Tensor, "n_plus_1"]:
    """Canvas pixel edges of `n` consecutive cells of `cell` pixels in the global image, which is
    the `canvas`-pixel side resized to `tile` pixels: each edge is the canvas pixel the cell's first
    pixel samples (nearest-neighbour centres), the outer edges are the canvas's own."""
    starts = torch.arange(n + 1) * cell
    edges = torch.div((2 * starts + 1) * canvas, 2 * tile, rounding_mode="floor").clamp(max=canvas)
    edges[0], edges[-1] = 0, canvas
    return edges


class Idefics3(Architecture):
    hf_class_names = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    # The processor's pixel mask (which tile pixels are image, not padding) travels with every forward.
    extra_input_names = ("pixel_attention_mask",)
    images_per_row = True  # the processor's documented input: one list of images per prompt
    llm_block = LLM_BLOCK
    module_paths = ModulePaths(vision_tower="model.vision_model", vision_layers="encoder.layers",
                               projector="model.connector", llm="model.text_model")
    # TransformerLens 4.3's Idefics3 adapter names its parts as its LLaVA one does (vision_encoder: a
    # SigLIP bridge without a pre-layernorm, vision_projector: the connector, then the Llama LLM)
    bridge_aliases = (*CLIP_TOWER_ALIASES, *PROJECTOR_INPUT_ALIASES, *PROJECTOR_OUTPUT_ALIASES, *LLM_ALIASES,
                      *LLM_BRANCH_OUTPUT_ALIASES)
    vision_block = CLIP_BLOCK  # pre-norm SigLIP blocks: layer_norm1/2, self_attn (out_proj, scale), mlp
    llm_config = staticmethod(Llava.llm_config)
    # filled by `use_processor`: the ids of the separators around the image tokens
    token_ids: dict[str, Any] | None = None

    # ------------------------------------------------------------- modules
    def check_supported(self, hf_model: nn.Module) -> None:
        text_type = hf_model.config.text_config.model_type
        if text_type != "llama":
            raise UnsupportedModelError(f"{type(hf_model).__name__} with a {text_type!r} LLM is not supported; "
                                        "supported: 'llama'")

    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        self.check_supported(hf_model)
        config = hf_model.config
        vc = config.vision_config
        self.scale = int(config.scale_factor)
        mlp = self.vision_layers(hf_model)[0].mlp
        vision = VisionConfig.from_encoder(
            vc, d_mlp=mlp.fc1.out_features, normalization_type="LN", positional_embedding_type="learned",
            image_size=vc.image_size, patch_size=vc.patch_size, has_cls=False, n_registers=0, has_ln_pre=False,
        )
        side = vc.image_size // vc.patch_size
        if side % self.scale:
            raise UnsupportedModelError(f"{side} patches per tile side do not fold by the scale factor {self.scale}")
        proj = self.projector(hf_model).modality_projection.proj
        tokens = side // self.scale
        adapter = AdapterConfig(
            kind=f"pixel_shuffle{self.scale}_linear", d_in=vc.hidden_size,
            d_hidden=proj.in_features,  # hook_hidden: the shuffled features (r*r patches stacked), before the map
            d_out=proj.out_features, feature_layers=(vision.n_layers,), select_strategy="full",
            n_image_tokens=tokens * tokens, token_grid=(tokens, tokens),  # per frame (tile or global image)
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(config.text_config))

    def mask_geometry(self, processor: Any) -> SplitGeometry:
        """The processor's two resizes, replayed on label masks (its tiles are crops of the result)."""
        return SplitGeometry(processor)

    def use_processor(self, processor: Any) -> None:
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is None:
            return
        ids = tokenizer.convert_tokens_to_ids
        self.token_ids = {
            SEPARATOR: ids(getattr(processor, "fake_image_token", "<fake_token_around_image>")),
            GLOBAL_TAG: ids(getattr(processor, "global_image_tag", None) or getattr(processor, "global_image_token", "<global-img>")),
            TILE_TAG: {ids(f"<row_{i + 1}_col_{j + 1}>"): (i, j) for i in range(6) for j in range(6)},
        }

    def patch_to_token(self, cfg: MLLMConfig) -> Int[Tensor, "n_patches"]:
        return shuffle_map(cfg.vision.image_size // cfg.vision.patch_size, self.scale)

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        tower = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        vision_norm = root.cfg.vision.normalization_type
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, self.vision_block, use_result, vision_norm)
        handles = [hook_module_output(tower.embeddings, root.vision.hook_embed)]
        instrument_norm(tower.post_layernorm, root.vision.ln_post, vision_norm)
        connector, adapter = self.projector(hf_model), root.adapter

        def connect(image_hidden_states: Tensor) -> Tensor:
            x = fire(adapter.hook_in, image_hidden_states)
            shuffled = fire(adapter.hook_hidden, connector.pixel_shuffle(x, connector.scale_factor))
            return fire(adapter.hook_out, connector.modality_projection(shuffled))

        _override_forward(connector, connect)
        lm = self.language_model(hf_model)
        return handles + instrument_language_model(lm, self.llm_layers(hf_model), self.llm_block, root, use_result)

    # ------------------------------------------------------------- images -> tokens
    def _ids(self) -> dict[str, Any]:
        if self.token_ids is None:
            raise InputError("the Idefics3 / SmolVLM layout reads the separator tokens' ids from the processor; "
                             "pass processor= to HookedMLLM.from_hf")
        return self.token_ids

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        ids = self._ids()
        tile, n = cfg.vision.image_size, cfg.adapter.n_image_tokens
        k, g = cfg.adapter.token_grid[0], tile // cfg.vision.patch_size
        shuffle = self.patch_to_token(cfg)
        rows, frame, image = [], 0, 0
        for b, where in enumerate(image_runs(input_ids, cfg.image_token_id)):
            row = input_ids[b].tolist()
            chunks = self._chunks(b, where, n)
            spans, i = [], 0
            while i < len(chunks):
                tiles: list[tuple[int, int, int]] = []  # (tile row, tile col, first position)
                while i < len(chunks) and row[chunks[i] - 1] in ids[TILE_TAG]:
                    tiles.append((*ids[TILE_TAG][row[chunks[i] - 1]], chunks[i]))
                    i += 1
                if i == len(chunks) or row[chunks[i] - 1] != ids[GLOBAL_TAG]:
                    raise LayoutMismatchError(f"batch row {b}: image {image}'s tiles are not followed by its global image "
                                              "(<global-img>); were the prompts expanded by this model's processor?")
                spans.append(self._span(b, image, row, tiles, chunks[i], frame, (tile, n, k, g), shuffle))
                frame, image, i = frame + len(tiles) + 1, image + 1, i + 1
            rows.append(tuple(spans))
        return ImageTokenLayout(tuple(rows), input_ids.shape[1], (frame, g * g), (frame, n))

    @staticmethod
    def _chunks(b: int, where: Tensor, n: int) -> list[int]:
        """First positions of the runs of `n` image tokens (one per frame) in a row."""
        if len(where) % n:
            raise LayoutMismatchError(f"batch row {b} has {len(where)} image tokens, not a multiple of {n} per frame")
        starts = where[::n]
        if len(starts) and int(starts[0]) < 2:  # every frame follows a separator and a tag
            raise LayoutMismatchError(f"batch row {b}: image tokens at position {int(starts[0])}, before any separator")
        for s, block in zip(starts.tolist(), where.view(-1, n)):
            if int(block[-1]) - s != n - 1:
                raise LayoutMismatchError(f"batch row {b}: the frame at position {s} is not {n} contiguous image tokens")
        return starts.tolist()

    def _span(self, b: int, image: int, row: list[int], tiles: list[tuple[int, int, int]], global_start: int,
              frame: int, sizes: tuple[int, int, int, int], shuffle: Tensor) -> ImageSpan:
        tile, n, k, g = sizes
        n_rows = max((t[0] for t in tiles), default=-1) + 1
        n_cols = max((t[1] for t in tiles), default=-1) + 1
        if [(r, c) for r, c, _ in tiles] != [(r, c) for r in range(n_rows) for c in range(n_cols)]:
            raise LayoutMismatchError(f"batch row {b}: image {image}'s tile tags are not a full raster of tiles")
        canvas = (n_rows * tile, n_cols * tile) if tiles else (tile, tile)
        segments = []
        local = torch.arange(g * g)
        if tiles:
            starts = torch.tensor([s for _, _, s in tiles])
            tokens = GridCells.uniform(n_rows * k, n_cols * k, *canvas)
            patches = GridCells.uniform(n_rows * g, n_cols * g, *canvas)
            tr, tc = tokens.cells[:, 0], tokens.cells[:, 1]
            which = (tr // k) * n_cols + tc // k  # the tile of each token of the joined grid
            within = (tr % k) * k + tc % k
            pr, pc = patches.cells[:, 0], patches.cells[:, 1]
            patch_tile = (pr // g) * n_cols + pc // g
            patch_within = (pr % g) * g + pc % g
            token_in_tile = shuffle[patch_within]
            joined = ((patch_tile // n_cols) * k + token_in_tile // k) * (n_cols * k) + (patch_tile % n_cols) * k + token_in_tile % k
            segments.append(Segment("tiles", tokens, starts[which] + within, (frame + which, within),
                                    patches, (frame + patch_tile, patch_within), joined))
        last = frame + len(tiles)
        squash = [GridCells(_squashed_edges(m, tile // m, tile, canvas[0]), _squashed_edges(m, tile // m, tile, canvas[1]))
                  for m in (k, g)]
        segments.append(Segment("global", squash[0], global_start + torch.arange(n), (torch.full((n,), last), torch.arange(n)),
                                squash[1], (torch.full((g * g,), last), local), shuffle.clone()))
        return ImageSpan(b, image, tuple(segments), canvas, self._specials(b, image, row, tiles, global_start, n))

    def _specials(self, b: int, image: int, row: list[int], tiles: list, global_start: int, n: int) -> dict[str, Tensor]:
        """Every token between the image's first `<fake_token_around_image>` and its closing one
        that is not an image token, by kind (separators, tile tags, the global tag, row breaks)."""
        ids = self._ids()
        first = (tiles[0][2] if tiles else global_start) - 2
        end = global_start + n  # the closing separator
        if first < 0 or end >= len(row) or row[first] != ids[SEPARATOR] or row[end] != ids[SEPARATOR]:
            raise LayoutMismatchError(f"batch row {b}: image {image} is not wrapped in <fake_token_around_image>")
        grid = {s + j for _, _, s in tiles for j in range(n)} | set(range(global_start, end))
        kinds: dict[str, list[int]] = {SEPARATOR: [], TILE_TAG: [], GLOBAL_TAG: [], ROW_BREAK: []}
        for p in range(first, end + 1):
            if p in grid:
                continue
            t = row[p]
            kind = SEPARATOR if t == ids[SEPARATOR] else TILE_TAG if t in ids[TILE_TAG] else GLOBAL_TAG if t == ids[GLOBAL_TAG] else ROW_BREAK
            kinds[kind].append(p)
        return {kind: torch.tensor(p, dtype=torch.long) for kind, p in kinds.items() if p}

    def image_pixels(self, pixel_values: Tensor, image_index: int, *, span: ImageSpan | None = None,
                     **inputs: Tensor) -> Tensor:
        """Image `span`'s picture as the tower saw it: its tiles put back in their raster,
        [3, rows*T, cols*T] (the processed canvas its tile grid covers), or its global frame when
        it has no tiles. `pixel_values` holds frames per batch row, padded with all-zero frames the
        model drops, so which frames are this image's comes from its layout span."""
        if span is None:
            raise InputError("Idefics3 keeps a row's images as one list of frames: pass the image's layout span "
                             "(span=inputs.layout.spans[i]) to find its frames")
        frames = pixel_values.flatten(0, 1)
        frames = frames[frames.flatten(1).ne(0).any(1)]  # the model's own drop of all-zero padding frames
        tiles = [seg for seg in span.segments if seg.kind == "tiles"]
        if not tiles:
            return frames[int(span.segments[-1].vision_index[0][0])]
        tile = frames.shape[-1]
        rows, cols = span.canvas[0] // tile, span.canvas[1] // tile
        first = int(tiles[0].vision_index[0].min())
        return einops.rearrange(frames[first:first + rows * cols], "(r c) ch h w -> ch (r h) (c w)", r=rows, c=cols)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = (input_ids == cfg.image_token_id).sum(dim=1)
        if pixel_values is None:
            if n_tokens.any():
                raise InputError("image tokens in input_ids but no pixel_values")
            return
        tile = cfg.vision.image_size
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[2:]) != (3, tile, tile) or len(pixel_values) != len(input_ids):
            raise InputError(f"pixel_values have shape {tuple(pixel_values.shape)} but {cfg.architecture} takes "
                             f"[batch={len(input_ids)}, frames, 3, {tile}, {tile}]; preprocess images with model.prepare(...)")
        # the model drops every all-zero frame (the processor's padding) and fills the image tokens
        # with the rest in order: each row's real frames must be its own
        real = (pixel_values != 0).flatten(2).any(dim=2).sum(dim=1)
        want = real * cfg.adapter.n_image_tokens
        if not torch.equal(want.cpu(), n_tokens.cpu()):
            raise InputError(f"per batch row, {real.tolist()} real (not all-zero) frames need {want.tolist()} image tokens "
                             f"but input_ids hold {n_tokens.tolist()}; the prompts' placeholders and the images must match")
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and tuple(mask.shape) != (*pixel_values.shape[:2], tile, tile):
            raise InputError(f"pixel_attention_mask has shape {tuple(mask.shape)}, pixel_values {tuple(pixel_values.shape)}")

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows: one image that is only its global frame (two padding frames after it) and one
        of 1 x 2 tiles plus its global frame, so the padding drop and both segments are exercised."""
        generator = torch.Generator().manual_seed(seed)
        tile, n = cfg.vision.image_size, cfg.adapter.n_image_tokens
        ids = self.token_ids
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        if ids is None:  # no processor: any text tokens do as separators, the model only reads <image>
            sep, glob, tags = text[1], text[2], [text[3], text[3]]
        else:
            inverse = {v: t for t, v in ids[TILE_TAG].items()}
            sep, glob, tags = ids[SEPARATOR], ids[GLOBAL_TAG], [inverse[(0, 0)], inverse[(0, 1)]]
        image = [cfg.image_token_id] * n
        single = [sep, glob, *image, sep]
        tiled = [sep, tags[0], *image, sep, tags[1], *image, sep, glob, *image, sep]
        rows = [single + text, tiled + text]
        length = max(map(len, rows))
        ids_t = torch.tensor([[text[0]] * (length - len(r)) + r for r in rows])
        pixels = torch.randn(2, 3, 3, tile, tile, generator=generator)
        pixels[0, 1:] = 0  # padding frames, dropped by the model
        mask = torch.ones(2, 3, tile, tile, dtype=torch.long)
        mask[0, 1:] = 0
        return {"input_ids": ids_t, "pixel_values": pixels, "attention_mask": torch.ones_like(ids_t),
                "pixel_attention_mask": mask}
