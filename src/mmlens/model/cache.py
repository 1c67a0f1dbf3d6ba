"""TransformerLens's `ActivationCache` over all three stages, correct at image positions.

TL's decompositions assume the residual stream starts at `hook_embed`; in a multimodal LLM the
LLM's input is `hook_multimodal_embed` (the adapter's output at image tokens), so every
decomposition here uses it as the embedding term and sums exactly to the residual everywhere.
`stage="vision"` runs the same TL helpers on the vision tower (its first block's input as the
embedding). Applying a norm to a stack gives what that norm's `hook_normalized` would hold: a
block's norm divides by the cached scale and multiplies by the norm's own weight (block weights are
not folded), the LLM's final norm only divides, as in TL, since `model.W_U` carries its weight.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import Slice, get_act_name

from ..errors import HookNameError, InputError, UnsupportedModelError
from .decompose import carried, full_decomposition, ln_projection, neuron_results, residual_parts, stack_heads
from .hook_names import parse_hook_name
from .images.layout import ImageTokenLayout
from .tl_versions import REMOVE_BATCH_DIM_TAKES_A_SIZE, drop_batch_dim
from .weights import StackedWeights

Stage = Literal["llm", "vision"]


def _as_slice(pos_slice: Any) -> Slice:
    """TL's position slice: an int picks one position and drops the dimension."""
    return pos_slice if isinstance(pos_slice, Slice) else Slice(pos_slice)
_STAGE_PREFIX = {"vision": "vision.", "adapter": "adapter."}


class VisionStage(StackedWeights):
    """The vision tower seen as a TL model: its config under TL names, blocks, final norm."""

    def __init__(self, model: Any):
        vision = model.cfg.vision
        self.cfg = SimpleNamespace(**asdict(vision), attn_only=False, device=model.cfg.device, dtype=model.cfg.dtype)
        self.blocks = model.vision.blocks
        self.ln_final = getattr(model.vision, "ln_post", None)  # None: a tower without a final norm


class MultimodalActivationCache(ActivationCache):
    """An `ActivationCache` that accepts TransformerBridge names and short keys of every stage
    (`cache["pattern", 3, "vision"]`, `cache["out", "adapter"]`), carries the layout, and whose
    decompositions take `stage="llm"` (default) or `stage="vision"`."""

    layout: ImageTokenLayout | None = None

    def __init__(self, cache_dict: dict[str, Tensor], model: Any, has_batch_dim: bool = True):
        super().__init__(cache_dict, model, has_batch_dim=has_batch_dim)
        self._stage_of: MultimodalActivationCache | None = None  # set on a stage view: its parent

    # ------------------------------------------------------------------ keys
    def __getitem__(self, key: Any) -> Tensor:
        try:
            return self._lookup(key)
        except HookNameError:
            raise
        except KeyError:
            raise self._missing(key) from None

    def _lookup(self, key: Any) -> Tensor:
        if isinstance(key, tuple) and key and key[-1] in _STAGE_PREFIX:
            return self.cache_dict[self._stage_key(key[:-1], key[-1])]
        if isinstance(key, str) and key not in self.cache_dict:
            base, grad = (key[: -len("_grad")], "_grad") if key.endswith("_grad") else (key, "")
            try:
                canonical = self.model.resolve_hook_name(base) + grad
            except (HookNameError, AttributeError):
                canonical = None
            if canonical in self.cache_dict:
                return self.cache_dict[canonical]
        return super().__getitem__(key)

    def _missing(self, key: Any) -> HookNameError:
        """A missing key as a KeyError that says whether the name is a hook point left out of this
        cache or a misspelling, and lists the closest cached names."""
        name = key if isinstance(key, str) else self._long_name(key)
        base, grad = (name[: -len("_grad")], "_grad") if name.endswith("_grad") else (name, "")
        try:
            canonical = self.model.resolve_hook_name(base) + grad
        except (HookNameError, AttributeError):
            canonical = None
        cached = list(self.cache_dict)
        close = difflib.get_close_matches(name, cached, n=5, cutoff=0.5)
        if canonical is not None:
            why = (f"{canonical} is a hook point but this cache does not hold it (run_with_cache's names_filter "
                   "left it out): include it in names_filter")
        else:
            why = "no hook point has that name"
        return HookNameError(f"{key!r} is not in this cache: {why}. Closest cached: {close or 'none'} "
                             f"({len(cached)} cached; cache.keys() lists them)")

    def _long_name(self, key: Any) -> str:
        """The hook name a tuple key stands for (as TL's `get_act_name` spells it), else the key as text."""
        try:
            if isinstance(key, tuple) and key and key[-1] in _STAGE_PREFIX:
                return self._stage_key(key[:-1], key[-1])
            return get_act_name(*key) if isinstance(key, tuple) else str(key)
        except Exception:  # noqa: BLE001 - a key TL cannot spell either: show it as given
            return str(key)

    def _stage_key(self, key: tuple, stage: str) -> str:
        if stage == "adapter":
            if len(key) != 1:
                raise HookNameError(f"adapter short keys are (name, 'adapter'), e.g. ('out', 'adapter'); got {key + (stage,)}")
            return f"adapter.hook_{key[0]}"
        if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
            key = (key[0], self.model.cfg.vision.n_layers + key[1], *key[2:])
        return "vision." + get_act_name(*key)

    # ------------------------------------------------------------------ stages
    def stage(self, stage: Stage = "llm") -> "MultimodalActivationCache":
        """This cache as TL sees one stack: LLM (`hook_embed` = the LLM's real input) or vision
        (names without `vision.`, `hook_embed` = the first block's input)."""
        if self._stage_of is not None:
            return self
        if stage == "llm":
            entries = {k: v for k, v in self.cache_dict.items() if parse_hook_name(k).stage == "llm"}
            model, first = self.model, ("hook_multimodal_embed", "blocks.0.hook_resid_pre")
            if model.cfg.llm.positional_embedding_type == "learned":  # positions join inside the decoder (OPT)
                first = ("blocks.0.hook_resid_pre",)
        elif stage == "vision":
            parsed = [(parse_hook_name(k), v) for k, v in self.cache_dict.items()]
            entries = {name.name_in_stage: v for name, v in parsed if name.stage == "vision"}
            # the tower's final norm is TL's `ln_final` (what apply_ln_to_stack reads at the last layer)
            entries.update({f"ln_final.{name.point}": v for name, v in parsed
                            if name.stage == "vision" and name.site.startswith("ln_post.")})
            model, first = VisionStage(self.model), ("blocks.0.hook_resid_pre",)
        else:
            raise InputError(f"stage must be 'llm' or 'vision', got {stage!r}")
        embed = next((entries[name] for name in first if name in entries), None)
        entries.pop("hook_embed", None)
        if embed is not None:
            entries["hook_embed"] = embed
        view = MultimodalActivationCache(entries, model, has_batch_dim=self.has_batch_dim)
        view._stage_of, view.layout = self, self.layout
        return view

    def _view(self, stage: Stage, needs_embed: bool = True) -> "MultimodalActivationCache":
        view = self.stage(stage)
        if needs_embed and not view.has_embed:
            name = "hook_multimodal_embed (or blocks.0.hook_resid_pre)" if stage == "llm" else "vision.blocks.0.hook_resid_pre"
            raise KeyError(f"decomposing the {stage} residual needs {name} in the cache; include it in names_filter")
        return view

    def accumulated_resid(self, *args: Any, stage: Stage = "llm", **kwargs: Any):
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).accumulated_resid(*args, **kwargs)
        if kwargs.get("incl_mid", len(args) > 1 and args[1]) and not self._reads_resid_mid(True):
            raise HookNameError("incl_mid=True: this stack's blocks run attention and MLP in parallel (parallel_attn_mlp, "
                                "x + attn(ln1(x)) + mlp(ln1(x))), so no residual lies between them (no hook_resid_mid, as "
                                "in TL's parallel blocks); use incl_mid=False")
        if "mlp_input" in kwargs:  # what a parallel block's MLP reads is the layer's resid_pre, already the last entry
            kwargs["mlp_input"] = self._reads_resid_mid(kwargs["mlp_input"])
        return super().accumulated_resid(*args, **kwargs)

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all", apply_ln: bool = False,
                        pos_slice: Any = None, incl_embeds: bool = True, return_labels: bool = False, stage: Stage = "llm"):
        """TL's `decompose_resid` whose `embed` term is the stage's real input (at image
        tokens: the projected image features) and, on Qwen3-VL, with the deepstack terms
        (`{i}_deepstack`, after block i's MLP), so it sums to the residual everywhere."""
        if self._stage_of is None:
            return self._view(stage, needs_embed=incl_embeds).decompose_resid(
                layer, mlp_input, mode, apply_ln, pos_slice, incl_embeds, return_labels)
        layer, pos_slice, mlp_input = self._layer(layer), _as_slice(pos_slice), self._reads_resid_mid(mlp_input)
        parts, labels = residual_parts(self, layer, mlp_input, mode, incl_embeds)
        stack = torch.stack([pos_slice.apply(part, dim=-2) for part in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice: Any = None, apply_ln: bool = False, stage: Stage = "llm"):
        """Each head's share of the residual (`z W_O` per head through whatever the block applies to
        its attention output: layer scale, post-norm), so heads plus the `bias` term sum to `attn_out`."""
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).stack_head_results(layer, return_labels, incl_remainder, pos_slice, apply_ln)
        layer, pos_slice = self._layer(layer), _as_slice(pos_slice)
        stack, labels = stack_heads(self, layer, pos_slice)
        if incl_remainder:
            total = self[f"blocks.{layer}.hook_resid_pre"] if layer < self.model.cfg.n_layers else self[("resid_post", layer - 1)]
            stack = torch.cat([stack, (pos_slice.apply(total, dim=-2) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def _ensure_head_results(self) -> bool:
        """TL's `compute_head_results`: `z W_O` per head into `hook_result` where not cached (what the
        forward's `hook_result` holds: before `b_O` and before any layer scale or post-norm)."""
        all_cached, n_heads = True, self.model.cfg.n_heads
        for layer in range(self.model.cfg.n_layers):
            name = f"blocks.{layer}.attn.hook_result"
            cached = self.cache_dict.get(name)
            if isinstance(cached, Tensor) and cached.ndim == 3 + self.has_batch_dim and cached.shape[-2] == n_heads:
                continue
            all_cached = False
            z, w_o = self[("z", layer, "attn")], self.model.blocks[layer].attn.W_O
            dtype = torch.promote_types(z.dtype, w_o.dtype)
            self.cache_dict[name] = torch.einsum("...hd,hdm->...hm", z.to(dtype), w_o.to(dtype))
        return all_cached

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, stage: Stage = "llm"):
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).stack_activation(activation_name, layer, sublayer_type)
        return super().stack_activation(activation_name, layer, sublayer_type)

    def get_neuron_results(self, layer: int, neuron_slice: Any = None, pos_slice: Any = None,
                           project_output_onto: Tensor | None = None, stage: Stage = "llm") -> Tensor:
        """Each neuron's share of the residual, through the block's layer scale or post-norm (and,
        inside `stack_neuron_results`, through the output scalars of the blocks up to its layer)."""
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).get_neuron_results(layer, neuron_slice, pos_slice, project_output_onto)
        shares = neuron_results(self, layer, Slice.unwrap(neuron_slice), _as_slice(pos_slice), project_output_onto)
        into = getattr(self, "_neurons_into", None)
        return shares if into is None else carried(shares, self, layer, into)

    def _stack_neuron_results_apply_ln_projected(self, layer: int, pos_slice: Slice, neuron_slice: Slice,
                                                 project_2d: Tensor, mlp_input: bool = False) -> Tensor:
        into, scale = ln_projection(self, layer, self._reads_resid_mid(mlp_input), pos_slice, project_2d)
        per_layer = [carried(neuron_results(self, l, neuron_slice, pos_slice, into), self, l, layer) for l in range(layer)]
        if not per_layer:
            embed = pos_slice.apply(self["hook_embed"], dim=-2)
            return embed.new_zeros((0, *embed.shape[:-1], project_2d.shape[-1]))
        stacked = einops.rearrange(torch.cat(per_layer, dim=-2), "... component k -> component ... k")
        return stacked / scale

    def stack_neuron_results(self, layer: int, *args: Any, stage: Stage = "llm", **kwargs: Any):
        if self._stage_of is None:
            return self._view(stage).stack_neuron_results(layer, *args, **kwargs)
        self._neurons_into = self._layer(layer)  # TL's loop reads each layer's share as it enters this one
        try:
            return super().stack_neuron_results(layer, *args, **kwargs)
        finally:
            self._neurons_into = None

    def get_full_resid_decomposition(
        self,
        layer: int | None = None,
        mlp_input: bool = False,
        expand_neurons: bool = True,
        apply_ln: bool = False,
        pos_slice: Any = None,
        return_labels: bool = False,
        project_output_onto: Tensor | None = None,
        stage: Stage = "llm",
    ):
        """TL's full decomposition (heads, neurons, embed, deepstack terms, biases), through layer
        scales and post-norms, summing to the residual at every position, image tokens included.
        Behind a post-norm the `bias` term differs by position."""
        if self._stage_of is None:
            return self._view(stage).get_full_resid_decomposition(
                layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels, project_output_onto
            )
        project = None if project_output_onto is None else project_output_onto.reshape(project_output_onto.shape[0], -1)
        stack, labels = full_decomposition(self, self._layer(layer), self._reads_resid_mid(mlp_input), expand_neurons, apply_ln,
                                           _as_slice(pos_slice), project)
        if project_output_onto is not None and project_output_onto.ndim == 1:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack

    # ------------------------------------------------------------------ norms
    def _layer(self, layer: int | None) -> int:
        return self.model.cfg.n_layers if layer is None or layer == -1 else layer

    def _reads_resid_mid(self, mlp_input: bool) -> bool:
        """`mlp_input` where the MLP reads the residual after the attention; a parallel block's MLP
        (`parallel_attn_mlp`: x + attn(ln1(x)) + mlp(ln1(x))) reads the attention's own input and norm."""
        return mlp_input and not getattr(self.model.cfg, "parallel_attn_mlp", False)

    def _uses_ln_centering(self, layer: int | None) -> bool:
        """Whether the norm entering `layer` centres its input (LayerNorm, not RMSNorm; a final
        RMSNorm after LayerNorm blocks does not). TL 4's rule, kept here because TL 3.9 lacks it."""
        cfg = self.model.cfg
        final = self._layer(layer) == cfg.n_layers
        return cfg.normalization_type in ("LN", "LNPre") and not (final and getattr(cfg, "final_rms", False))

    def _norm(self, layer: int | None, mlp_input: bool) -> Any:
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1 or layer == n_layers:
            return self.model.ln_final
        block = self.model.blocks[layer]
        return block.ln2 if mlp_input else block.ln1

    def _applied_norm_weight(self, layer: int | None, mlp_input: bool) -> Tensor | None:
        """The weight `apply_ln_to_stack` multiplies in: the norm's own, except the LLM's final
        norm's, which the folded `model.W_U` carries (TL's `fold_ln`)."""
        final = self._layer(layer) == self.model.cfg.n_layers
        norm = self._norm(layer, mlp_input)
        if norm is None or (final and not isinstance(self.model, VisionStage)):
            return None
        return norm.w

    def apply_ln_to_stack(
        self,
        residual_stack: Float[Tensor, "num_components *batch_and_pos_dims d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
        pos_slice: Any = None,
        batch_slice: Any = None,
        has_batch_dim: bool = True,
        recompute_ln: bool = False,
        stage: Stage = "llm",
    ) -> Float[Tensor, "num_components *batch_and_pos_dims_out d_model"]:
        """TL's cached-scale norm of a stack: what the norm's `hook_normalized` would hold. Into a
        block's norm it is multiplied by the norm's weight (TL folds that weight into `W_Q` / `W_in`;
        here those weights are the model's own); into the LLM's final norm it is not, as in TL: the
        folded `model.W_U` and `tokens_to_residual_directions` carry it, so `apply_ln_to_stack(stack)
        @ model.W_U` and `. tokens_to_residual_directions(t)` are each component's logit share here
        and with TL's own `ActivationCache`. `recompute_ln` (the logit lens) normalises each
        component by its own statistics, the final norm's weight left out all the same."""
        if self._stage_of is None and stage != "llm":
            return self.stage(stage).apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
            )
        if stage == "llm" and self._layer(layer) == self.model.cfg.n_layers and \
                getattr(self.model.architecture, "unembeds_a_decoder", False):
            raise UnsupportedModelError(
                f"{self.model.cfg.architecture}: the LLM stage's blocks are an encoder, and the final norm and "
                "unembedding read its decoder's residual (decoder.blocks.*), not theirs, so a logit lens or a "
                "final-norm stack of the encoder's residual has no meaning; read decoder points by name")
        mlp_input = self._reads_resid_mid(mlp_input)
        stack = super().apply_ln_to_stack(
            residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )
        final = self._layer(layer) == self.model.cfg.n_layers
        weight = self._applied_norm_weight(layer, mlp_input)
        if (recompute_ln and final) or weight is None:
            return stack
        return stack * weight

    # ------------------------------------------------------------------ logits
    def logit_lens(
        self, layer: int | None = None, pos_slice: Any = None, incl_mid: bool = False
    ) -> tuple[Float[Tensor, "layers *batch_and_pos_dims d_vocab"], list[str]]:
        """Logits read from every accumulated residual through the final norm (recomputed per entry,
        without its weight) and `unembed` (folded `W_U`, `b_U`); the last entry equals the model's
        logits to float rounding. Returns (logits, labels)."""
        stack, labels = self.accumulated_resid(layer, incl_mid=incl_mid, apply_ln=True, pos_slice=pos_slice, return_labels=True)
        return self.model.unembed(stack), labels

    def remove_batch_dim(self, batch_size: int | None = None) -> "MultimodalActivationCache":
        """Drop the batch dimension of a one-row cache (asserts the batch is one row, as TL)."""
        if self.has_batch_dim and batch_size is None and self.layout is not None:
            batch_size = self.layout.batch_size
        if REMOVE_BATCH_DIM_TAKES_A_SIZE:
            super().remove_batch_dim(batch_size)
        elif batch_size is None or not self.has_batch_dim:
            super().remove_batch_dim()
        else:  # TL 3.9 would infer the batch from the entries' leading dims; the layout knows it
            assert batch_size == 1, f"Cannot remove batch dimension from cache with batch size {batch_size}"
            for key, value in self.cache_dict.items():
                self.cache_dict[key] = drop_batch_dim(value)
            self.has_batch_dim = False
        return self
