"""Gemma 4 (Gemma4ForConditionalGeneration): its own vision encoder -> k x k pooling by patch
position, an unweighted RMSNorm and a linear map -> Gemma 4 LLM.

Each image keeps its aspect ratio and becomes its own grid of soft tokens between
`<start_of_image>` and `<end_of_image>` (`layout.py`); the tower and the embedder are hooked in
`tower.py`. The LLM block is Gemma 3's (sandwich norms, q/k norms, sliding-window layers) plus an
unweighted RMSNorm on the values, a rotary applied to q and k before the head transpose (the
full-attention layers' "proportional" rotary leaves the unrotated channels at cos 1, sin 0, so
it is the same call), full-attention layers with their own head size, keys reused as values where
`attention_k_eq_v` drops their `v_proj`, and a scalar on the block's whole output (`layer_scalar`).
E2B / E4B add per-layer inputs and KV sharing, 26B-A4B experts beside the MLP (`block.py`,
`per_layer.py`, `experts.py`). What the hooked block cannot state is refused by name at load
(`refuse_unsupported`).

"bidirectional" is Gemma 4's own rule: an image's tokens see each other both ways in the
sliding-window layers only, while the full-attention layers stay causal (Hugging Face's
`create_masks_for_vision_model`). It is the own mode of checkpoints with
`use_bidirectional_attention="vision"`, which Hugging Face applies itself from `mm_token_type_ids`;
others are causal, and "bidirectional" gives them the same rule as 4D masks. Attention edges are one
set for every layer; `hf_attention_mask` intersects them with each layer type's rule (causal for
full layers, the window for sliding ones), so a knockout composes with either mode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

from ....errors import HookNameError, InputError, UnsupportedModelError
from ...config import AdapterConfig, MLLMConfig, StageConfig, VisionConfig
from ...hook_names import parse_hook_name
from ...images.layout import ImageTokenLayout
from ...runtime.attention_masks import additive_mask
from ...runtime.instrument import AttentionSpec, instrument_block, instrument_language_model
from ..base import Architecture
from ..bridge_aliases import LLM_ALIASES, LLM_QK_NORM_ALIASES, PROJECTOR_OUTPUT_ALIASES, alias
from ..gemma3 import GEMMA3_BLOCK, Gemma3
from ..gemma3.family import SANDWICH_NORM_ALIASES
from ..module_paths import ModulePaths
from ..type_ids import type_ids_extended, type_ids_rule
from .block import instrument_gemma4_block, storing_layers
from .experts import moe_config
from .per_layer import PER_LAYER_INPUTS, given_per_layer_inputs, prompt_per_layer_inputs
from .geometry import Gemma4Geometry
from .layout import gemma4_layout, patch_grids
from .tower import GEMMA4_VISION_BLOCK, hook_patch_embeddings, instrument_embedder, refuse_clipping

# a KV-sharing block's attention points that belong to the block whose keys and values it reuses
SHARED_KEY_SITES = ("attn.hook_k", "attn.hook_v", "attn.hook_rot_k", "attn.k_ln.")
POSITIONS = "image_position_ids"  # each patch's (x, y) in its image; (-1, -1) for padding patches
TYPES = "mm_token_type_ids"  # 1 at image tokens: Hugging Face's cue for the both-ways image blocks


def rotate_by_position(_attn: nn.Module, q: Tensor, k: Tensor, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The LLM's rotary on q and k `[batch, seq, head, d_head]`, each by Hugging Face's one-tensor call."""
    cos, sin = kwargs["position_embeddings"]
    rotated_k = None if k is None else apply_rotary_pos_emb(k, cos, sin, unsqueeze_dim=2)  # None: reused keys
    return apply_rotary_pos_emb(q, cos, sin, unsqueeze_dim=2), rotated_k


GEMMA4_BLOCK = replace(
    GEMMA3_BLOCK,
    attention=AttentionSpec(q_norm="q_norm", k_norm="k_norm", v_norm="v_norm",
                            position_step=rotate_by_position),
    output_scalar="layer_scalar",
)

# What the hooked Gemma 4 cannot express yet: (text config field, is it in use, what it is).
UNSUPPORTED_TEXT_FIELDS = (
    ("use_bidirectional_attention", lambda v: v not in (None, "vision"), "every token attending both ways (an "
     "encoder, not a causal LLM), which no causal attention mode states"),
)


# TransformerBridge's names for what only some checkpoints have: the parts of the per-layer input
# (E2B, E4B), and a 26B-A4B's dense MLP, which it wraps as `mlp` beside `router` and `experts`, and
# which is our `mlp.shared_expert` there (`experts.py`)
PER_LAYER_ALIASES = (
    alias("blocks.{layer}.hook_per_layer_gate", "blocks.{layer}.per_layer_input_gate.hook_out"),
    alias("blocks.{layer}.hook_per_layer_post", "blocks.{layer}.per_layer_projection.hook_in"),
    alias("blocks.{layer}.hook_per_layer_out", "blocks.{layer}.post_per_layer_input_norm.hook_out"),
)
DENSE_MLP_AS_SHARED_EXPERT = (
    alias("blocks.{layer}.mlp.shared_expert.hook_pre", "blocks.{layer}.mlp.gate.hook_out"),
    alias("blocks.{layer}.mlp.shared_expert.hook_pre_linear", "blocks.{layer}.mlp.in.hook_out"),
    alias("blocks.{layer}.mlp.shared_expert.hook_post", "blocks.{layer}.mlp.out.hook_in"),
    alias("blocks.{layer}.mlp.shared_expert.hook_out", "blocks.{layer}.mlp.hook_out"),
)


def refuse_unsupported(config: Any) -> None:
    """Refuse, naming the config field, every Gemma 4 feature the hooked blocks do not compute."""
    text = config.text_config
    for field, in_use, what in UNSUPPORTED_TEXT_FIELDS:
        value = getattr(text, field, None)
        if in_use(value):
            raise UnsupportedModelError(
                f"Gemma 4 with text_config.{field}={value!r} is not supported: {what}. Supported: every released "
                "Gemma 4 LLM (E2B, E4B with per-layer inputs and KV sharing, 31B, 26B-A4B with experts) with "
                "use_bidirectional_attention None or \"vision\")"
            )
    if config.vision_config is None:
        raise UnsupportedModelError("Gemma 4 without a vision_config has no image path for mmlens to hook")


class Gemma4(Architecture):
    hf_class_names = ("Gemma4ForConditionalGeneration",)
    module_paths = ModulePaths(vision_tower="model.vision_tower", vision_layers="encoder.layers",
                               projector="model.embed_vision", llm="model.language_model")
    # TransformerBridge (TL 4.3) wraps the LLM as Gemma 3's and the vision side as two opaque parts:
    # `vision_encoder.hook_out` (the pooled tokens, our adapter.hook_in) and the embedder's output
    bridge_aliases = (
        alias("adapter.hook_in", "vision_encoder.hook_out", "vision_projector.hook_in"),
        *PROJECTOR_OUTPUT_ALIASES, *SANDWICH_NORM_ALIASES, *LLM_QK_NORM_ALIASES, *LLM_ALIASES,
    )
    extra_input_names = (POSITIONS, TYPES)
    llm_input_names = (TYPES,)
    images_per_row = True  # Gemma4Processor counts `<|image|>` per prompt against each row's images
    attention_modes = ("causal", "bidirectional")
    # the video and audio ids too: Hugging Face embeds them to find placeholders in merged embeddings
    special_token_fields = ("image_token_id", "boi_token_id", "eoi_token_id", "video_token_id", "audio_token_id")
    llm_block = GEMMA4_BLOCK
    vision_block = GEMMA4_VISION_BLOCK

    # ------------------------------------------------------------- config
    def build_config(self, hf_model: nn.Module) -> MLLMConfig:
        config = hf_model.config
        refuse_unsupported(config)
        refuse_clipping(self.vision_tower(hf_model))
        self._hf_model = hf_model  # its config: layouts, input checks, the probe batch
        text, vc = config.text_config, config.vision_config
        if text.enable_moe_block:  # this model's table: the dense MLP's names go to the shared expert
            dense = tuple(a for a in type(self).bridge_aliases if ".mlp.hook_" not in a.ours.text)
            self.bridge_aliases = dense + DENSE_MLP_AS_SHARED_EXPERT
        if text.hidden_size_per_layer_input:
            self.bridge_aliases = self.bridge_aliases + PER_LAYER_ALIASES
        self.markers = {"start": config.boi_token_id, "end": config.eoi_token_id}
        self.image_token_id = config.image_token_id
        self.hf_applies_bidirectional = text.use_bidirectional_attention == "vision"
        self.sliding_window = text.sliding_window if "sliding_attention" in text.layer_types else None
        vision = replace(
            VisionConfig.from_encoder(
                vc, d_mlp=vc.intermediate_size, normalization_type="RMS", positional_embedding_type="rotary",
                patch_size=vc.patch_size, has_ln_post=False, gated_mlp=True,  # image_size 0: every image its own
                use_normalization_before_and_after=True, use_qk_norm=True,
            ),
            d_head=vc.head_dim, n_key_value_heads=vc.num_key_value_heads,
        )
        k = vc.pooling_kernel_size
        adapter = AdapterConfig(
            kind=f"position_avgpool{k}x{k}_rmsnorm_linear",
            d_in=vc.hidden_size,
            d_hidden=vc.hidden_size,  # the pooled token after the embedder's unweighted norm
            d_out=text.hidden_size,
            feature_layers=(vc.num_hidden_layers,),
            select_strategy="full",
            n_image_tokens=0,  # variable: (h / k) x (w / k) per image
            token_grid=(0, 0),
        )
        return self.assemble_config(hf_model, vision, adapter, self.llm_config(text))

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        """Gemma 3's stage with the first layer's head size and kv heads: full-attention layers have
        their own (`global_head_dim`), which each block's hook points carry."""
        first = tc.per_layer_config[0]
        return StageConfig(
            n_layers=tc.num_hidden_layers, n_heads=tc.num_attention_heads, d_model=tc.hidden_size,
            d_head=first.head_dim, d_mlp=tc.intermediate_size, n_key_value_heads=first.num_key_value_heads,
            normalization_type="RMS", positional_embedding_type="rotary", gated_mlp=True,
            use_normalization_before_and_after=True, use_qk_norm=True, moe=moe_config(tc),
        )

    # ------------------------------------------------------------- hooks
    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        tower = self.vision_tower(hf_model)
        use_result = lambda: root.cfg.use_attn_result  # noqa: E731 - read at call time
        norm = root.cfg.vision.normalization_type
        for layer, hooks in zip(self.vision_layers(hf_model), root.vision.blocks):
            instrument_block(layer, hooks, self.vision_block, use_result, norm)
        handles = [hook_patch_embeddings(tower.patch_embedder, root.vision.hook_embed)]
        instrument_embedder(self.projector(hf_model), root.adapter)
        lm = self.language_model(hf_model)
        # a run from inside the LLM recomputes its per-layer inputs with these quiet (`llm_keywords`)
        self._tower_points = [m for group in (root.vision, root.adapter) for m in group.modules() if isinstance(m, HookPoint)]
        sources = storing_layers(hf_model.config.text_config)
        layers = self.llm_layers(hf_model)

        def instrument_layer(layer: nn.Module, *args: Any, **kwargs: Any) -> None:
            instrument_gemma4_block(layer, *args, **kwargs, source=sources.get(layer.self_attn.layer_idx))

        return handles + instrument_language_model(lm, layers, self.llm_block, root, use_result,
                                                    instrument_layer=instrument_layer)

    # ------------------------------------------------------------- per-layer inputs
    def llm_keywords(self, hf_model: nn.Module, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The prompt's and images' own per-layer inputs, for a run that starts inside the LLM
        (`per_layer.py`); `forward` hands them to the LLM as they are."""
        if not hf_model.config.text_config.hidden_size_per_layer_input:
            return {}
        return {PER_LAYER_INPUTS: prompt_per_layer_inputs(hf_model, inputs, self._tower_points)}

    def forward(self, hf_model: nn.Module, **inputs: Tensor) -> Any:
        given = inputs.pop(PER_LAYER_INPUTS, None)
        if given is None:
            return super().forward(hf_model, **inputs)
        with given_per_layer_inputs(self.language_model(hf_model), given):
            return super().forward(hf_model, **inputs, per_layer_inputs=given)

    # ------------------------------------------------------------- attention
    def own_attention_mode(self, hf_model: nn.Module) -> str:
        if hf_model.config.text_config.use_bidirectional_attention == "vision":
            return "bidirectional"
        return super().own_attention_mode(hf_model)

    def attention_kwargs(
        self, mode: str, kwargs: dict[str, Tensor], layout: Callable[[], ImageTokenLayout], dtype: torch.dtype
    ) -> dict[str, Any]:
        """A "vision" checkpoint's forward applies the rule itself from `mm_token_type_ids` (derived
        from the ids when a caller leaves them out) and is plain causal without them; other
        checkpoints get "bidirectional" as 4D masks per layer type."""
        if not self.hf_applies_bidirectional:
            return super().attention_kwargs(mode, kwargs, layout, dtype)
        return type_ids_rule(mode, kwargs, TYPES, self.image_token_id)

    def hf_attention_mask(self, edges: Bool[Tensor, "batch seq seq"], dtype: torch.dtype = torch.float32) -> Any:
        """One 4D mask per layer type: Gemma 3's (sliding layers also drop keys `sliding_window` or more
        positions back), with the full-attention layers kept causal, where Gemma 4 opens no image."""
        masks = Gemma3.hf_attention_mask(self, edges, dtype)
        position = torch.arange(edges.shape[-1], device=edges.device)
        masks["full_attention"] = additive_mask(edges & (position[None, :] <= position[:, None]), dtype)
        return masks

    def image_attention_layers(self, cfg: MLLMConfig) -> tuple[int, ...]:
        """The sliding-window layers: the only ones where Gemma 4's images see each other both ways."""
        types = self._hf_model.config.text_config.layer_types
        return tuple(layer for layer, kind in enumerate(types) if kind == "sliding_attention")

    def key_value_layer(self, cfg: MLLMConfig, layer: int) -> int:
        return storing_layers(self._hf_model.config.text_config).get(layer, layer)

    # ------------------------------------------------------------- names
    def canonical_name(self, name: str) -> str:
        """The bridge's names; a KV-sharing block's key and value points, which do not exist, are
        refused saying whose keys and values that block reads."""
        renamed = super().canonical_name(name)
        try:
            parsed = parse_hook_name(renamed)
        except HookNameError:  # outside the grammar, so not a block's name
            return renamed
        source = storing_layers(self._hf_model.config.text_config).get(parsed.layer) if parsed.in_llm_block else None
        if source is not None and parsed.site.startswith(SHARED_KEY_SITES):
            raise HookNameError(
                f"{name!r} does not exist: LLM block {parsed.layer} has no keys or values of its own, it reuses block "
                f"{source}'s (Gemma 4's KV sharing). Cache or patch blocks.{source}.{parsed.site}, which is what block "
                f"{parsed.layer} reads")
        return renamed

    def extend_by_one_token(self, extra: dict[str, Tensor]) -> dict[str, Tensor]:
        return type_ids_extended(extra, TYPES)

    # ------------------------------------------------------------- images -> tokens
    def layout(self, cfg: MLLMConfig, input_ids: Int[Tensor, "batch seq"], **inputs: Tensor) -> ImageTokenLayout:
        vc = self._hf_model.config.vision_config
        return gemma4_layout(input_ids.cpu(), inputs.get(POSITIONS), image_token_id=cfg.image_token_id,
                             markers=self.markers, patch_size=vc.patch_size, pooling=vc.pooling_kernel_size)

    def image_pixels(self, pixel_values: Tensor, image_index: int, **inputs: Tensor) -> Float[Tensor, "3 height width"]:
        """The image's patches put back in place (Hugging Face's patchify: rows, cols, then each
        patch's pixels row-major, channels last)."""
        (h, w), = patch_grids(inputs[POSITIONS][image_index : image_index + 1].cpu())
        p = self._hf_model.config.vision_config.patch_size
        patches = pixel_values[image_index, : h * w].view(h, w, p, p, -1)
        return patches.permute(4, 0, 2, 1, 3).reshape(-1, h * p, w * p)

    def mask_geometry(self, processor: Any) -> Gemma4Geometry:
        return Gemma4Geometry.from_processor(processor)

    def check_inputs(self, cfg: MLLMConfig, input_ids: Tensor, pixel_values: Tensor | None, **inputs: Tensor) -> None:
        n_tokens = int((input_ids == cfg.image_token_id).sum())
        if pixel_values is None:
            if n_tokens:
                raise InputError(f"{n_tokens} image tokens in input_ids but no pixel_values")
            return
        positions, vc = inputs.get(POSITIONS), self._hf_model.config.vision_config
        if pixel_values.ndim != 3 or positions is None or positions.shape != (*pixel_values.shape[:2], 2):
            raise InputError(
                f"Gemma 4 takes patchified pixel_values [n_images, max_patches, 3 * patch_size^2] with "
                f"image_position_ids [n_images, max_patches, 2]; got {tuple(pixel_values.shape)} and "
                f"{None if positions is None else tuple(positions.shape)}. Preprocess images with model.prepare(...)"
            )
        k = vc.pooling_kernel_size
        counts = [(h // k) * (w // k) for h, w in patch_grids(positions.cpu())]
        if n_tokens != sum(counts):
            raise InputError(f"image_position_ids make {sum(counts)} image tokens but input_ids hold {n_tokens}; the "
                             "prompts' placeholders and the images must match")
        if self.sliding_window is not None and max(counts, default=0) > self.sliding_window:
            raise InputError(
                f"an image of {max(counts)} soft tokens is longer than Gemma 4's sliding_window={self.sliding_window}: "
                "its sliding layers would cut the image apart, which the bidirectional-attention edit does not model; "
                "give the image processor a smaller max_soft_tokens"
            )

    def probe_inputs(self, cfg: MLLMConfig, seed: int = 0) -> dict[str, Tensor]:
        """Two rows, one image each, of different token grids (2x3 and 2x2; the second's patch row
        padded), each between its start and end markers, text around; equal lengths."""
        config = self._hf_model.config
        vc, k = config.vision_config, config.vision_config.pooling_kernel_size
        grids = [(2 * k, 3 * k), (2 * k, 2 * k)]
        longest = max(h * w for h, w in grids)
        positions = torch.full((len(grids), longest, 2), -1, dtype=torch.long)
        for i, (h, w) in enumerate(grids):
            y, x = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            positions[i, : h * w] = torch.stack([x.flatten(), y.flatten()], dim=-1)
        specials = {config.image_token_id, config.boi_token_id, config.eoi_token_id}
        text = [t for t in range(min(cfg.d_vocab, 32)) if t not in specials][:6]
        rows = []
        for i, (h, w) in enumerate(grids):
            image = [config.boi_token_id] + [config.image_token_id] * ((h // k) * (w // k)) + [config.eoi_token_id]
            rows.append(text[: i + 1] + image + text[i + 1 :])
        length = max(map(len, rows))
        ids = torch.tensor([row + text[: length - len(row)] for row in rows])
        generator = torch.Generator().manual_seed(seed)
        pixels = torch.rand(len(grids), longest, 3 * vc.patch_size**2, generator=generator)
        pixels[positions[..., 0] < 0] = 0.0  # the processor's padding patches are zeros
        return {"input_ids": ids, "pixel_values": pixels, "attention_mask": torch.ones_like(ids), POSITIONS: positions,
                TYPES: (ids == config.image_token_id).long()}
