"""What an architecture file provides: everything mmlens knows about one model family.

A model family (LLaVA, PaliGemma ...) is one subclass of `Architecture` in its own folder
(`architectures/<family>/family.py`), registered by its Hugging Face class name in
`architectures/__init__.py`. It reads the family's config, says where its modules
are (one `ModulePaths` table) and how their blocks compute (`BlockSpec`), which keywords its forward takes, and how images
become LLM tokens (the layout). `HookedMLLM` and everything above it only talk to this interface,
so no code outside `architectures/` knows a family.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from ...errors import InputError, ModelLoadError
from ..config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ..images.layout import ImageTokenLayout, compute_layout
from ..images.preprocess import ImageGeometry, MaskGeometry
from ..runtime.attention_masks import additive_mask, allowed_edges
from .bridge_aliases import BridgeAlias
from .module_paths import ModulePaths

# The keywords every family's forward takes; `extra_input_names` adds the family's own.
BASE_INPUT_NAMES = ("input_ids", "pixel_values", "attention_mask")


@dataclass(frozen=True)
class StageModules:
    """The Hugging Face modules of one transformer stack that the TL surface reads or runs:
    its blocks in order (for start/stop at a layer), for the LLM the token embedding and the
    unembedding (`W_E`, `W_U`, `model.unembed`), for the vision stack the module taking pixels."""

    layers: tuple[nn.Module, ...]
    embed: nn.Module | None = None
    unembed: nn.Module | None = None
    tower: nn.Module | None = None  # the vision stack's own module, called on pixel values


class Architecture(ABC):
    """Adapter between one Hugging Face model family and mmlens's hook tree."""

    hf_class_names: tuple[str, ...] = ()
    # Where the family keeps its modules; `paths` gives the table for one checkpoint.
    module_paths: ModulePaths
    # TransformerBridge's hook names for ours, composed of the named parts in `bridge_aliases.py`.
    bridge_aliases: tuple[BridgeAlias, ...] = ()
    # Keywords of the family's forward beyond BASE_INPUT_NAMES (e.g. PaliGemma's token_type_ids),
    # carried by MultimodalInputs through every forward, cache, repeat and generation.
    extra_input_names: tuple[str, ...] = ()
    # Those of `extra_input_names` the LLM alone still needs (attention rules), for runs that
    # start from the merged embeddings.
    llm_input_names: tuple[str, ...] = ()
    # Keywords only mmlens reads: per-image facts the layout needs that the processor does not
    # return (InternVL's original image sizes, from which its tile grids follow). `prepare` computes
    # them (`layout_inputs`), MultimodalInputs carries them beside the family's keywords through
    # every forward, repeat and generation, and `hf_keywords` strips them before Hugging Face runs.
    layout_input_names: tuple[str, ...] = ()
    # Whether the processor takes images as one list per row (it treats a row's images together,
    # e.g. LLaVA-OneVision tiles only a row's single image) rather than one flat list.
    images_per_row: bool = False
    # Config fields holding the ids of the special tokens this family puts in or finds in
    # input_ids; each must index the token embedding (checked at load, `check_special_tokens`).
    special_token_fields: tuple[str, ...] = ("image_token_id",)
    # Hook-name prefixes of vision points computed on a grid of their own (a second tower's patches):
    # probes read them through `layout.on_grid(prefix)` (`ImageTokenLayout.vision_grids`).
    vision_grid_prefixes: tuple[str, ...] = ()
    # Whether those grids come before the layout's own blocks in site order (earlier stages of one
    # tower, FastVLM) rather than after them (a second tower beside the first).
    vision_grids_first: bool = False
    # The vision points that enter a grid before its blocks, in pipeline order (a point, or its name
    # within the grid); every other point outside the blocks leaves after them (a neck, a final norm).
    vision_entry_points: tuple[str, ...] = ("hook_embed", "hook_pos_embed", "ln_pre.hook_normalized",
                                            "ln_pre.hook_scale")
    # Vision points named outside every grid prefix but computed on one of those grids (FastVLM's stem
    # on its first stage's cells): point -> the grid's prefix.
    vision_points_on_grids: Mapping[str, str] = MappingProxyType({})

    def check_special_tokens(self, hf_model: nn.Module) -> None:
        """Refuse a config whose special token ids fall outside the vocabulary: the first forward
        would fail with a bare IndexError inside the embedding, far from the config that caused it."""
        config = hf_model.config
        vocab = getattr(hf_model.get_input_embeddings(), "num_embeddings", None) or config.get_text_config().vocab_size
        for field in self.special_token_fields:
            value = getattr(config, field, None)
            if value is not None and not (isinstance(value, int) and 0 <= value < vocab):
                stored = getattr(config, "attribute_map", {}).get(field, field)  # the key config.json holds it under
                raise ModelLoadError(
                    f"{type(hf_model).__name__}: config.{field} = {value!r} is not a token of the vocabulary, which "
                    f"has {vocab} tokens (ids 0..{vocab - 1}). Fix {stored} in the checkpoint's config.json (or the "
                    "config the model was built from) to the id the tokenizer gives that token"
                )

    @classmethod
    def environment_problem(cls, config: Any) -> str | None:
        """What keeps Hugging Face from building this family's model here (a package its modules import
        that is not installed) and how to fix it, checked before any weight is read; None: nothing."""
        return None

    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """Keywords the LLM needs, beyond `attention_mask` and `llm_input_names`, when a run starts
        from the merged embeddings (`forward(llm_inputs_embeds=...)`, `start_at_layer`, patching's
        LLM-only copies) instead of from ids and pixels.

        `inputs` holds the full multimodal keywords of the rows being run (`input_ids`,
        `attention_mask`, the family's `extra_input_names`; `pixel_values` may be absent), already
        repeated when the batch is. A family whose positions depend on the images returns them
        here, computed the way its own forward does (Qwen2-VL: `{"position_ids": ...}` from
        `get_rope_index(input_ids, image_grid_thw, ..., attention_mask)`), so the shortcut computes
        what the full forward computes. The default, for families whose LLM positions follow from
        the attention mask alone, adds nothing.
        """
        return {}

    def layout_inputs(self, images: list[list[Any]]) -> dict[str, Tensor]:
        """The `layout_input_names` keywords for these images (one list per prompt, PIL images as
        the processor receives them); the default family needs none."""
        return {}

    def hf_keywords(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """`kwargs` without the keywords only mmlens reads (`layout_input_names`): what a Hugging
        Face forward or `generate` is given."""
        return {k: v for k, v in kwargs.items() if k not in self.layout_input_names}

    @abstractmethod
    def build_config(self, hf_model: nn.Module) -> MLLMConfig: ...

    @staticmethod
    def assemble_config(hf_model: nn.Module, vision: VisionConfig, adapter: AdapterConfig, llm: StageConfig) -> MLLMConfig:
        """The model's config from its three stages' (what `build_config` works out per family);
        the name, vocabulary, image token, device and dtype are read off the Hugging Face model."""
        param = next(hf_model.parameters())
        config = hf_model.config
        return MLLMConfig(
            architecture=type(hf_model).__name__, vision=vision, adapter=adapter, llm=llm,
            d_vocab=config.text_config.vocab_size, image_token_id=config.image_token_id,
            device=param.device, dtype=param.dtype,
        )

    def use_processor(self, processor: Any) -> None:
        """Read what the layout needs from the model's processor (Idefics3: the separator tokens'
        ids); called once when the model is wrapped with a processor. The default needs nothing."""

    @abstractmethod
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        """Install hooks on `hf_model` that fire `root`'s hook points; return removable handles."""

    # ------------------------------------------------------------- modules
    def paths(self, hf_model: nn.Module) -> ModulePaths:
        """The family's `module_paths`; a family whose paths differ between checkpoints (LLaVA's
        towers) fills them in for `hf_model` here."""
        return self.module_paths

    def vision_tower(self, hf_model: nn.Module) -> nn.Module:
        """The vision stack's module, called on pixel values."""
        return hf_model.get_submodule(self.paths(hf_model).vision_tower)

    def vision_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        """The vision encoder's blocks, in order (`vision.blocks.{i}`)."""
        return self.vision_tower(hf_model).get_submodule(self.paths(hf_model).vision_layers)

    def projector(self, hf_model: nn.Module) -> nn.Module:
        """The adapter between the vision tower and the LLM."""
        return hf_model.get_submodule(self.paths(hf_model).projector)

    def language_model(self, hf_model: nn.Module) -> nn.Module:
        """The LLM's decoder: token embedding, blocks and final norm."""
        return hf_model.get_submodule(self.paths(hf_model).llm)

    def llm_layers(self, hf_model: nn.Module) -> nn.ModuleList:
        """The LLM's decoder blocks, in order (`blocks.{l}`)."""
        return self.language_model(hf_model).get_submodule(self.paths(hf_model).llm_layers)

    def llm_attention(self, hf_model: nn.Module, layer: int) -> nn.Module:
        return self.llm_layers(hf_model)[layer].get_submodule(self.paths(hf_model).llm_attention)

    def stage_modules(self, hf_model: nn.Module) -> dict[str, StageModules]:
        """`{"vision": ..., "llm": ...}`: the modules behind the weight surface and start/stop at a layer."""
        paths = self.paths(hf_model)
        return {
            "vision": StageModules(layers=tuple(self.vision_layers(hf_model)), tower=self.vision_tower(hf_model)),
            "llm": StageModules(layers=tuple(self.llm_layers(hf_model)),
                                embed=self.language_model(hf_model).get_submodule(paths.embed),
                                unembed=hf_model.get_submodule(paths.unembed)),
        }

    def forward(self, hf_model: nn.Module, **inputs: Tensor) -> Any:
        """Run the Hugging Face model on its keywords (`input_ids`, `pixel_values`, ...; the
        layout-only ones are dropped here)."""
        return hf_model(**self.hf_keywords(inputs), use_cache=False)

    def processor_images(self, images: list[list[Any]]) -> list[Any]:
        """The images as the family's processor takes them, from one list per prompt (most take a
        flat list; a processor that counts images per prompt takes the nested one)."""
        return images if self.images_per_row else [image for row in images for image in row]

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        """The family's keywords for the same rows with one more generated (text) token."""
        return extra

    # ------------------------------------------------------------- attention
    # How tokens may attend: "causal", or "bidirectional" (each image's tokens see each other).
    # A family with its own rule (PaliGemma's prefix-LM) adds its name in front.
    attention_modes: tuple[str, ...] = ("causal", "bidirectional")

    def own_attention_mode(self, hf_model: nn.Module) -> str:
        """The rule the checkpoint was trained with; models trained by mmlens.zoo with
        bidirectional image attention say so in their config."""
        mode = getattr(hf_model.config, "mmlens_image_attention", self.attention_modes[0])
        if mode not in self.attention_modes:
            raise InputError(f"config.mmlens_image_attention must be one of {self.attention_modes}, got {mode!r}")
        return mode

    def image_attention_layers(self, cfg: MLLMConfig) -> tuple[int, ...] | None:
        """The LLM layers where "bidirectional" lets an image's tokens see each other (None: every
        layer), which the bidirectional-attention edit opens by default."""
        return None

    def key_value_layer(self, cfg: MLLMConfig, layer: int) -> int:
        """The LLM block whose keys and values block `layer` attends with (whose `attn.hook_k` / `hook_rot_k`
        hold them): itself, except where a family shares them between blocks (Gemma 4's KV sharing)."""
        return layer

    def attention_edges(
        self, mode: str, layout: ImageTokenLayout, attention_mask: Int[Tensor, "batch seq"] | None,
        extra: dict[str, Tensor],
    ) -> Bool[Tensor, "batch seq seq"]:
        """True where a query (dim 1) may read a key (dim 2) under `mode`, padding respected."""
        return allowed_edges(layout.image_of_position(), attention_mask, mode == "bidirectional")

    def attention_kwargs(
        self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout], dtype: torch.dtype
    ) -> dict[str, Tensor]:
        """The forward's keywords with the attention rule `mode` in force (a 4D mask where
        Hugging Face's own rule differs); `layout()` computes the layout when a mask needs it."""
        if mode == "causal":
            return kwargs
        mask = kwargs.get("attention_mask")
        ids = kwargs["input_ids"]
        mask = torch.ones_like(ids) if mask is None else mask
        edges = self.attention_edges(mode, layout(), mask, kwargs).to(ids.device)
        return {**kwargs, "attention_mask": self.hf_attention_mask(edges, dtype)}

    def hf_attention_mask(self, edges: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Any:
        """The `attention_mask` keyword that makes Hugging Face's forward attend along `edges`
        (a 4D additive mask; a family whose layers differ, such as sliding-window ones, returns
        what its forward takes per layer type)."""
        return additive_mask(edges, dtype)

    def llm_attention_scale(self, hf_model: nn.Module, layer: int) -> float:
        """The factor raw query-key products are multiplied by in LLM layer `layer`."""
        return float(self.llm_attention(hf_model, layer).scaling)

    def blocks(self, hf_model: nn.Module) -> list[tuple[str, nn.Module]]:
        """Every hooked block with its hook-tree name, in the order a forward runs them."""
        vision = [(f"vision.blocks.{i}", m) for i, m in enumerate(self.vision_layers(hf_model))]
        return vision + [(f"blocks.{l}", m) for l, m in enumerate(self.llm_layers(hf_model))]

    # ------------------------------------------------------------- images -> tokens
    def llm_sees_cls(self, cfg: MLLMConfig) -> bool:
        """Whether the LLM receives the vision encoder's CLS token before each image's grid."""
        return False

    def llm_prefix_tokens(self, cfg: MLLMConfig) -> int:
        """Tokens the LLM receives before each image's grid (CLS, registers)."""
        return int(self.llm_sees_cls(cfg))

    def patch_to_token(self, cfg: MLLMConfig) -> Int[Tensor, "n_patches"]:
        """The LLM grid token each vision patch feeds (one to one unless the adapter merges)."""
        return torch.arange(cfg.vision.n_patches)

    def vision_prefix_tokens(self, cfg: MLLMConfig) -> int:
        """Tokens of the vision sequence before the patches (CLS, registers)."""
        return int(cfg.vision.has_cls) + cfg.vision.n_registers

    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        """Where each image's tokens are in `input_ids` and which pixels they see (fixed grid)."""
        return compute_layout(
            input_ids,
            image_token_id=cfg.image_token_id,
            image_size=(cfg.vision.image_size, cfg.vision.image_size),
            patch_grid=cfg.vision.patch_grid,
            token_grid=cfg.adapter.token_grid,
            patch_to_token=self.patch_to_token(cfg),
            vision_prefix=self.vision_prefix_tokens(cfg),
            llm_sees_cls=self.llm_sees_cls(cfg),
            llm_prefix=self.llm_prefix_tokens(cfg),
        )

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Float[Tensor, "3 height width"]:
        """Image `image_index`'s preprocessed pixels as a [3, height, width] picture (what
        `pixel_values` holds for it, in whatever layout the family's processor uses). Callers may
        pass `span=` (the image's `ImageSpan`) for families that need the layout to find it."""
        return pixel_values[image_index]

    def mask_geometry(self, processor: Any) -> MaskGeometry:
        """The processor's pixel geometry, which label masks follow onto the canvas: the stock
        resize / pad / crop here; a family whose processor resizes or tiles its own way returns
        its own `MaskGeometry`."""
        return ImageGeometry.from_processor(processor)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        """Refuse images and placeholders that do not match (fixed grid: a constant per image);
        `inputs`: the family's own keywords present (e.g. `image_sizes`)."""
        per_image = cfg.adapter.n_image_tokens
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if n_tokens != n_images * per_image:
            raise InputError(
                f"{n_images} image(s) in pixel_values but {n_tokens} image tokens in input_ids "
                f"({per_image} per image); the prompts' placeholders and the images must match"
            )
        if pixel_values is not None:
            size = cfg.vision.image_size
            if tuple(pixel_values.shape[1:]) != (3, size, size):
                raise InputError(
                    f"pixel_values have shape {tuple(pixel_values.shape)} but this model takes "
                    f"[n, 3, {size}, {size}]; preprocess images with model.prepare(...)"
                )

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """A small batch (two rows, one image each) that exercises every block: spec verification
        runs it with and without hooks. No padding: a fully masked row is NaN in float64 in
        Hugging Face itself, and padding is the tests' business, not the spec's."""
        generator = torch.Generator().manual_seed(seed)
        size = cfg.vision.image_size
        pixels: Float[Tensor, "2 3 h w"] = torch.randn(2, 3, size, size, generator=generator)
        text = [t for t in range(min(cfg.d_vocab, 16)) if t != cfg.image_token_id][:4]
        image = [cfg.image_token_id] * cfg.adapter.n_image_tokens
        ids = torch.tensor([image + text, [text[0]] + image + text[1:]])
        mask = torch.ones_like(ids)
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": mask}

    # ------------------------------------------------------------- names
    def canonical_name(self, name: str) -> str:
        """Our name for a TransformerBridge name (the first of `bridge_aliases` that has it), else `name`."""
        for alias in self.bridge_aliases:
            renamed = alias.rename(name)
            if renamed is not None:
                return renamed
        return name
