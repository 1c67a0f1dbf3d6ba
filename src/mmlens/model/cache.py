"""TransformerLens's `ActivationCache` over all three stages, correct at image positions.

TL's decompositions assume the residual stream starts at `hook_embed`; in a multimodal LLM the
LLM's input is `hook_multimodal_embed` (the adapter's output at image tokens), so every
decomposition here uses it as the embedding term and sums exactly to the residual everywhere.
`stage="vision"` runs the same TL helpers on the vision tower (its first block's input as the
embedding). Norms are not folded into weights, so applying a norm to a stack divides by the
cached scale and multiplies by the norm's own weight, which is what TL's folded weights give.
"""

from __future__ import annotations

import difflib
from contextlib import contextmanager
from dataclasses import asdict
from types import SimpleNamespace
from typing import Any, Iterator, Literal

from jaxtyping import Float
from torch import Tensor
from transformer_lens.ActivationCache import ActivationCache
from transformer_lens.utilities import get_act_name

from ..errors import HookNameError, InputError
from .layout import ImageTokenLayout
from .weights import StackedWeights

Stage = Literal["llm", "vision"]
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
        self._fold_norm_weight = True

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
            entries = {k: v for k, v in self.cache_dict.items() if not k.startswith(("vision.", "adapter."))}
            model, first = self.model, ("hook_multimodal_embed", "blocks.0.hook_resid_pre")
        elif stage == "vision":
            entries = {k[len("vision.") :]: v for k, v in self.cache_dict.items() if k.startswith("vision.")}
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
        return super().accumulated_resid(*args, **kwargs)

    def decompose_resid(self, *args: Any, stage: Stage = "llm", **kwargs: Any):
        """TL's `decompose_resid` whose `embed` term is the stage's real input (at image
        tokens: the projected image features, not the `<image>` placeholder's embedding)."""
        if self._stage_of is None:
            return self._view(stage).decompose_resid(*args, **kwargs)
        return super().decompose_resid(*args, **kwargs)

    def stack_head_results(self, *args: Any, stage: Stage = "llm", **kwargs: Any):
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).stack_head_results(*args, **kwargs)
        return super().stack_head_results(*args, **kwargs)

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None, stage: Stage = "llm"):
        if self._stage_of is None:
            return self._view(stage, needs_embed=False).stack_activation(activation_name, layer, sublayer_type)
        return super().stack_activation(activation_name, layer, sublayer_type)

    def stack_neuron_results(self, *args: Any, stage: Stage = "llm", **kwargs: Any):
        if self._stage_of is None:
            return self._view(stage).stack_neuron_results(*args, **kwargs)
        return super().stack_neuron_results(*args, **kwargs)

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
        """TL's full decomposition (heads, neurons, embed, biases), summing to the residual at
        every position, image tokens included."""
        if self._stage_of is None:
            return self._view(stage).get_full_resid_decomposition(
                layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels, project_output_onto
            )
        args = (layer, mlp_input, expand_neurons, apply_ln, pos_slice, return_labels)
        if not (apply_ln and project_output_onto is not None):
            return super().get_full_resid_decomposition(*args, project_output_onto)
        # TL folds the projection into an analytic cached-scale norm that ignores the norm's
        # weight; fold the weight into the projection instead and keep it out of the stack.
        weight = self._norm(layer, mlp_input).w
        projection = project_output_onto * (weight if project_output_onto.ndim == 1 else weight[:, None])
        with self._norm_weight_unfolded():
            return super().get_full_resid_decomposition(*args, projection)

    # ------------------------------------------------------------------ norms
    def _norm(self, layer: int | None, mlp_input: bool) -> Any:
        n_layers = self.model.cfg.n_layers
        if layer is None or layer == -1 or layer == n_layers:
            return self.model.ln_final
        block = self.model.blocks[layer]
        return block.ln2 if mlp_input else block.ln1

    @contextmanager
    def _norm_weight_unfolded(self) -> Iterator[None]:
        self._fold_norm_weight = False
        try:
            yield
        finally:
            self._fold_norm_weight = True

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
        """TL's cached-scale norm of a stack, times the norm's weight (TL folds that weight into
        `W_U` / `W_Q` ...; here weights are the model's own, so it is applied here). With the
        recomputed final norm (logit lens) the model's own norm runs, weight included."""
        if self._stage_of is None and stage != "llm":
            return self.stage(stage).apply_ln_to_stack(
                residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
            )
        stack = super().apply_ln_to_stack(
            residual_stack, layer, mlp_input, pos_slice, batch_slice, has_batch_dim, recompute_ln
        )
        n_layers = self.model.cfg.n_layers
        final = layer is None or layer == -1 or layer == n_layers
        if (recompute_ln and final) or not self._fold_norm_weight:
            return stack
        return stack * self._norm(layer, mlp_input).w

    # ------------------------------------------------------------------ logits
    def logit_lens(
        self, layer: int | None = None, pos_slice: Any = None, incl_mid: bool = False
    ) -> tuple[Float[Tensor, "layers *batch_and_pos_dims d_vocab"], list[str]]:
        """Logits read from every accumulated residual through the final norm and `unembed`;
        the last entry equals the model's logits. Returns (logits, labels)."""
        stack, labels = self.accumulated_resid(layer, incl_mid=incl_mid, apply_ln=True, pos_slice=pos_slice, return_labels=True)
        return self.model.unembed(stack), labels

    def remove_batch_dim(self, batch_size: int | None = None) -> "MultimodalActivationCache":
        """Drop the batch dimension of a one-row cache (asserts the batch is one row, as TL)."""
        if self.has_batch_dim and batch_size is None and self.layout is not None:
            batch_size = self.layout.batch_size
        super().remove_batch_dim(batch_size)
        return self
