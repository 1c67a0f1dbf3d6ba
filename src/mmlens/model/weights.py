"""The TransformerLens weight surface, as views of the Hugging Face parameters.

TL keeps attention weights per head (`W_Q[l]` is `[n_heads, d_model, d_head]`), MLP weights as
`[d_model, d_mlp]` / `[d_mlp, d_model]`, the unembedding as `[d_model, d_vocab]`. Here each is a
rearranged view of the HF `nn.Linear` it comes from (no copy: gradients flow, in-place writes
edit the model), with TL's conventions: absent biases are zeros, grouped-query keys and values
are repeated per query head (`_W_K` keeps the kv heads), `QK`/`OV` are `FactoredMatrix`es.
Block weights are not folded: a block's norm keeps its weight `w`, its `hook_normalized` holds the
weighted output, and `apply_ln_to_stack` applies that weight too. The final norm follows TL's
`fold_ln`: `W_U` is `w[:, None] * lm_head.weight.T` and `b_U` adds `b @ W_U` (LayerNorm), new tensors
computed from the parameters on each read (so, unlike the views, a write into them edits nothing),
which take the unweighted normalised residual (`ln_final.hook_normalized`) to the logits.
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from jaxtyping import Float
from torch import Tensor, nn
from accelerate.utils import align_module_device
from transformer_lens.FactoredMatrix import FactoredMatrix

from ..errors import InputError, UnsupportedModelError

# What TransformerLens's own `ActivationCache` reads to scale a head's or a neuron's result into the
# residual stream (a scalar); a block that normalises or scales its outputs per channel makes that
# impossible, so reading it refuses instead of letting TL's class return unnormalised results.
_TL_CANNOT_DECOMPOSE = (
    "this block {why}, which depends on the position (or channel) and cannot be TL's scalar "
    "`{attr}`: TransformerLens's own ActivationCache would stack un-normalised results here. Use the cache "
    "`model.run_with_cache` returns, whose stack_head_results / stack_neuron_results / "
    "get_full_resid_decomposition decompose through it exactly")


def _bound(group: nn.Module, what: str) -> Any:
    source = getattr(group, "_weight_source", None)
    if source is None:
        raise AttributeError(f"{type(group).__name__} has no {what}: its Hugging Face module was not bound")
    return source


def _present(module: Any) -> Any:
    """The module, once it is known to hold its weights: accelerate leaves a disk- or CPU-offloaded
    module's weights as `meta` tensors (no values) outside its forward, and a view of those would
    fail later, far from here, or be mistaken for the weights."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, Tensor) and weight.is_meta:
        raise InputError(
            f"this {type(module).__name__}'s weights are offloaded by accelerate (device_map), so the TL weight views "
            "cannot read them (they exist only while the layer runs); read them in a hook during a forward, or "
            "load the model without offloading this layer")
    return module


def ungated_linears(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """An ungated MLP's input and output linears: `fc1`/`fc2` (CLIP, SigLIP, Qwen2-VL's tower) or
    `linear_fc1`/`linear_fc2` (Qwen3-VL's tower)."""
    if hasattr(mlp, "fc1"):
        return mlp.fc1, mlp.fc2
    return mlp.linear_fc1, mlp.linear_fc2


class FusedSlice:
    """Part `index` of `parts` equal row blocks of a fused linear (a packed tower's `qkv`: q, k, v;
    GLM-4V's `gate_up_proj`: gate, then up) as a view with `weight`, `bias` and `out_features`, which
    the weight surface reads like a linear's: in-place edits of the view edit the model."""

    def __init__(self, fused: nn.Linear, index: int, parts: int):
        self._fused, self._index, self._parts = fused, index, parts

    @property
    def out_features(self) -> int:
        return self._fused.out_features // self._parts

    def _rows(self, tensor: Tensor) -> Tensor:
        n = self.out_features
        return tensor[self._index * n : (self._index + 1) * n]

    @property
    def weight(self) -> Tensor:
        return self._rows(self._fused.weight)

    @property
    def bias(self) -> Tensor | None:
        return None if self._fused.bias is None else self._rows(self._fused.bias)


def wrapped_linear(module: nn.Module) -> nn.Module:
    """The `nn.Linear` a wrapper keeps at `.linear` (Gemma 4's clippable linears), else the module."""
    inner = getattr(module, "linear", None)
    return inner if isinstance(inner, nn.Linear) and not hasattr(module, "weight") else module


def gated_linears(mlp: nn.Module) -> tuple[Any, nn.Linear, Any]:
    """A gated MLP's (up, down, gate) linears: `up_proj`, `down_proj`, `gate_proj` (each unwrapped
    from a clipping wrapper), or for one fused `gate_up_proj` (GLM-4V) its halves as `FusedSlice` views."""
    if hasattr(mlp, "gate_up_proj"):
        return FusedSlice(mlp.gate_up_proj, 1, 2), mlp.down_proj, FusedSlice(mlp.gate_up_proj, 0, 2)
    return wrapped_linear(mlp.up_proj), wrapped_linear(mlp.down_proj), wrapped_linear(mlp.gate_proj)


def _bias(linear: nn.Linear) -> Tensor:
    if linear.bias is not None:
        return linear.bias
    return torch.zeros(linear.out_features, device=linear.weight.device, dtype=linear.weight.dtype)


def _own_keys(k_proj: nn.Linear | None) -> nn.Linear:
    """The attention's key projection; an attention reusing an earlier layer's keys and values (KV
    sharing) has none, and its weight views say so instead of falling through as a missing attribute."""
    if k_proj is None:
        raise UnsupportedModelError(
            "this attention reuses an earlier layer's keys and values (KV sharing), so it has no key or value "
            "weights of its own (W_K, W_V, QK, OV); read the storing layer's: "
            "model.architecture.key_value_layer(model.cfg, layer)")
    return k_proj


class FactoredCircuits:
    """`QK` (`W_Q W_K^T`) and `OV` (`W_V W_O`) as TL's `FactoredMatrix`, per head (and layer)."""

    @property
    def QK(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-2, -1))

    @property
    def OV(self) -> FactoredMatrix:
        return FactoredMatrix(self.W_V, self.W_O)


class AttentionContribution:
    """`_result_contribution_scale`, the scalar TL's `ActivationCache` multiplies head results by."""

    _output_transform: str | None = None  # what the block does to the attention output, when anything

    @property
    def _result_contribution_scale(self) -> float:
        if self._output_transform:
            raise UnsupportedModelError(_TL_CANNOT_DECOMPOSE.format(why=self._output_transform, attr="_result_contribution_scale"))
        return 1.0


class AttentionWeights(AttentionContribution, FactoredCircuits):
    """`W_Q/W_K/W_V` `[n_heads, d_model, d_head]`, `W_O` `[n_heads, d_head, d_model]`, biases, `QK`, `OV`."""

    def bind_attention(self, module: nn.Module, q: str, k: str, v: str, o: str) -> None:
        # a tuple, so nn.Module does not adopt the HF module as a child of the hook tree
        self._weight_source = tuple(getattr(module, n) for n in (q, k, v, o)) + (module.head_dim,)

    def _linears(self) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear, int]:
        *linears, d_head = _bound(self, "attention weights")
        return (*map(_present, linears), d_head)

    @property
    def repeat_kv_heads(self) -> int:
        q, k, *_ = _bound(self, "attention weights")  # sizes only: an offloaded layer has them too
        return q.out_features // _own_keys(k).out_features

    def _expand(self, per_kv_head: Tensor) -> Tensor:
        n_rep = self.repeat_kv_heads
        return per_kv_head if n_rep == 1 else per_kv_head.repeat_interleave(n_rep, dim=0)

    def _per_head(self, index: int) -> Tensor:
        linear, d_head = self._linears()[index], self._linears()[-1]
        linear = _own_keys(linear) if index in (1, 2) else linear
        return einops.rearrange(linear.weight, "(h d) m -> h m d", d=d_head)

    def _per_head_bias(self, index: int) -> Tensor:
        linear, d_head = self._linears()[index], self._linears()[-1]
        linear = _own_keys(linear) if index in (1, 2) else linear
        return _bias(linear).view(-1, d_head)

    W_Q = property(lambda self: self._per_head(0), doc="[n_heads, d_model, d_head]")
    _W_K = property(lambda self: self._per_head(1), doc="[n_kv_heads, d_model, d_head]")
    _W_V = property(lambda self: self._per_head(2), doc="[n_kv_heads, d_model, d_head]")
    W_K = property(lambda self: self._expand(self._W_K), doc="[n_heads, d_model, d_head], kv heads repeated")
    W_V = property(lambda self: self._expand(self._W_V), doc="[n_heads, d_model, d_head], kv heads repeated")
    b_Q = property(lambda self: self._per_head_bias(0), doc="[n_heads, d_head]")
    _b_K = property(lambda self: self._per_head_bias(1), doc="[n_kv_heads, d_head]")
    _b_V = property(lambda self: self._per_head_bias(2), doc="[n_kv_heads, d_head]")
    b_K = property(lambda self: self._expand(self._b_K), doc="[n_heads, d_head]")
    b_V = property(lambda self: self._expand(self._b_V), doc="[n_heads, d_head]")

    @property
    def W_O(self) -> Float[Tensor, "n_heads d_head d_model"]:
        *_, o, d_head = self._linears()
        return einops.rearrange(o.weight, "m (h d) -> h d m", d=d_head)

    @property
    def b_O(self) -> Float[Tensor, "d_model"]:
        return _bias(self._linears()[3])


class MLPWeights:
    """`W_in` (and `W_gate` when gated) `[d_model, d_mlp]`, `W_out` `[d_mlp, d_model]`, biases."""

    def bind_mlp(self, module: nn.Module, gated: bool) -> None:
        if gated:
            self._weight_source = gated_linears(module)
        else:
            self._weight_source = ungated_linears(module)

    def _linear(self, index: int) -> nn.Linear:
        linears = _bound(self, "MLP weights")
        if index >= len(linears):
            raise AttributeError("this MLP is not gated: it has W_in and W_out only")
        return _present(linears[index])

    W_in = property(lambda self: self._linear(0).weight.T, doc="[d_model, d_mlp]")
    b_in = property(lambda self: _bias(self._linear(0)), doc="[d_mlp]")
    W_out = property(lambda self: self._linear(1).weight.T, doc="[d_mlp, d_model]")
    b_out = property(lambda self: _bias(self._linear(1)), doc="[d_model]")
    W_gate = property(lambda self: self._linear(2).weight.T, doc="[d_model, d_mlp], gated MLPs only")


class ExpertWeights:
    """One expert of a mixture-of-experts block as TL's MoE names its `GatedMLP`: `W_in` (up) and
    `W_gate` `[d_model, d_expert]`, `W_out` `[d_expert, d_model]`, zero biases; views of the fused
    3-D parameters (`gate_up_proj` [experts, 2 d_expert, d_model] holding gate then up, and
    `down_proj`; `transposed` for the [experts, d_model, 2 d_expert] layout)."""

    def bind_expert(self, experts: nn.Module, index: int, transposed: bool) -> None:
        self._weight_source = (experts, index, transposed)

    def _part(self, name: str) -> Tensor:
        experts, index, transposed = _bound(self, "expert weights")
        weight = getattr(experts, name)[index]
        return weight if transposed else weight.T

    def _gate_up(self, half: int) -> Tensor:
        both = self._part("gate_up_proj")
        width = both.shape[-1] // 2
        return both[:, half * width:(half + 1) * width]

    W_gate = property(lambda self: self._gate_up(0), doc="[d_model, d_expert]")
    W_in = property(lambda self: self._gate_up(1), doc="[d_model, d_expert]")
    W_out = property(lambda self: self._part("down_proj"), doc="[d_expert, d_model]")
    b_in = property(lambda self: self.W_in.new_zeros(self.W_in.shape[-1]), doc="[d_expert], zeros")
    b_out = property(lambda self: self.W_out.new_zeros(self.W_out.shape[-1]), doc="[d_model], zeros")


_NO_DENSE_MLP = ("this block's mlp is a mixture of experts: it has no single `{attr}` (a dense tensor here would be "
                 "wrong); TL's MoE convention applies: `mlp.experts[e].W_in` / `W_gate` / `W_out` for each expert, "
                 "`mlp.W_gate` for the router [d_model, n_experts]")


class MoEWeights:
    """TL's MoE surface on a mixture-of-experts block: `W_gate` is the router `[d_model, n_experts]`
    (as TransformerLens's own `MoE` component), `experts[e]` carry the per-expert weights, `b_out`
    is zeros (the experts have no biases). `W_in` / `W_out` / `b_in` are refused by name."""

    def bind_moe(self, router: nn.Module) -> None:
        self._weight_source = router

    @property
    def W_gate(self) -> Float[Tensor, "d_model n_experts"]:
        return _present(_bound(self, "router weights")).weight.T

    @property
    def b_out(self) -> Float[Tensor, "d_model"]:
        return self.experts[0].b_out

    def _refused(self, attr: str):
        raise UnsupportedModelError(_NO_DENSE_MLP.format(attr=attr))

    W_in = property(lambda self: self._refused("W_in"))
    W_out = property(lambda self: self._refused("W_out"))
    b_in = property(lambda self: self._refused("b_in"))


class NormWeights:
    """`w` (and `b` for LayerNorm) of a norm; calling the group runs the norm with its hooks."""

    def bind_norm(self, module: nn.Module, kind: str, offset: float = 0.0) -> None:
        self._weight_source = (module, kind, offset)

    @property
    def kind(self) -> str:
        return _bound(self, "norm")[1]

    @property
    def w(self) -> Float[Tensor, "d_model"]:
        """The factor the norm applies: the parameter itself, or `1 + weight` (a new tensor) for
        norms that store an offset weight (Gemma's RMSNorms; TL's `rmsnorm_uses_offset`)."""
        module, _, offset = _bound(self, "norm weight")
        _present(module)
        return module.weight + offset if offset else module.weight

    @property
    def b(self) -> Float[Tensor, "d_model"]:
        module = _present(_bound(self, "norm bias")[0])
        return module.bias if getattr(module, "bias", None) is not None else torch.zeros_like(module.weight)

    @property
    def has_bias(self) -> bool:
        return getattr(_bound(self, "norm bias")[0], "bias", None) is not None

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return _bound(self, "forward")[0](x)


class BlockOutputs:
    """What a block does to its attention and MLP outputs before adding them to the residual: a
    per-channel layer scale (`layer_scale(0)`, `layer_scale(1)`; InternViT, DINOv2) and sandwich
    norms (`ln1_post`, `ln2_post`; Gemma 3). Both are linear given the norms' cached scales, so the
    cache decomposes through them (`mmlens.model.decompose`)."""

    def bind_outputs(self, layer: nn.Module, layer_scale: tuple[str, str] | None, output_scalar: str | None = None,
                     layer_scale_tanh: bool = False) -> None:
        """Called once the block is instrumented: `layer_scale` names the HF layer's scales, if any,
        `output_scalar` its factor on the whole block output (Gemma 4's `layer_scalar`)."""
        if layer_scale is not None:
            self._layer_scale_source = (layer, layer_scale)  # a tuple: the HF layer stays out of the hook tree
            self._layer_scale_tanh = layer_scale_tanh
        if output_scalar is not None:
            self._output_scalar_source = (layer, output_scalar)
        self._mark_transformed()

    def output_scalar(self) -> Tensor | None:
        """The factor on the block's whole output, residual included (`hook_resid_post = s * (resid_mid +
        mlp_out)`), or None: everything added to the residual before it is scaled by it too."""
        source = getattr(self, "_output_scalar_source", None)
        return None if source is None else getattr(*source)

    def layer_scale(self, sublayer: int) -> Float[Tensor, "d_model"] | None:
        """The per-channel factor on the attention (0) or MLP (1) output, or None."""
        source = getattr(self, "_layer_scale_source", None)
        if source is None:
            return None
        layer, names = source
        scale = getattr(layer, names[sublayer])
        if isinstance(scale, nn.Module):  # DINOv2's LayerScale module: x * lambda1
            return scale(torch.ones_like(next(scale.parameters())))
        return scale.tanh() if getattr(self, "_layer_scale_tanh", False) else scale

    def post_norm(self, sublayer: int) -> Any:
        """The norm on the attention (0) or MLP (1) output (TL's `ln1_post` / `ln2_post`), or None."""
        return getattr(self, ("ln1_post", "ln2_post")[sublayer], None)

    def _mark_transformed(self) -> None:
        what = []
        if getattr(self, "_layer_scale_source", None) is not None:
            what.append("scales its outputs per channel (layer scale)")
        if self.post_norm(0) is not None:
            what.append("normalises its attention and MLP outputs (post-norms)")
        if getattr(self, "_output_scalar_source", None) is not None:
            what.append("scales its whole output, the residual included, so every earlier term (block scalar)")
        self.attn._output_transform = " and ".join(what) or None

    @property
    def output_transformed(self) -> bool:
        return self.post_norm(0) is not None or any(
            getattr(self, source, None) is not None for source in ("_layer_scale_source", "_output_scalar_source"))

    @property
    def residual_contribution_scale(self) -> float:
        if self.output_transformed:
            raise UnsupportedModelError(_TL_CANNOT_DECOMPOSE.format(why=self.attn._output_transform,
                                                                    attr="residual_contribution_scale"))
        return 1.0


def _stack(blocks: Any, part: str, name: str) -> Tensor:
    per_layer = [getattr(getattr(block, part), name) for block in blocks]
    shapes = [tuple(weight.shape) for weight in per_layer]
    if len(set(shapes)) > 1:
        sizes = ", ".join(f"{shape} at layers {[l for l, s in enumerate(shapes) if s == shape]}" for shape in dict.fromkeys(shapes))
        raise UnsupportedModelError(
            f"the stacked `{name}` needs every layer's {part}.{name} in one [n_layers, ...] tensor, but this stack's layers "
            f"have their own sizes ({sizes}; e.g. a head size per layer type): read each "
            f"layer's own, `blocks[l].{part}.{name}` (model.blocks[l] in the LLM, model.vision.blocks[l] in the tower)")
    return torch.stack(per_layer)


class StackedWeights(FactoredCircuits):
    """Model-level TL names: every layer's weights stacked, `[n_layers, ...]` (a copy, as in TL)."""

    blocks: nn.ModuleList

    W_Q = property(lambda self: _stack(self.blocks, "attn", "W_Q"))
    W_K = property(lambda self: _stack(self.blocks, "attn", "W_K"))
    W_V = property(lambda self: _stack(self.blocks, "attn", "W_V"))
    W_O = property(lambda self: _stack(self.blocks, "attn", "W_O"))
    b_Q = property(lambda self: _stack(self.blocks, "attn", "b_Q"))
    b_K = property(lambda self: _stack(self.blocks, "attn", "b_K"))
    b_V = property(lambda self: _stack(self.blocks, "attn", "b_V"))
    b_O = property(lambda self: _stack(self.blocks, "attn", "b_O"))
    W_in = property(lambda self: _stack(self.blocks, "mlp", "W_in"))
    W_gate = property(lambda self: _stack(self.blocks, "mlp", "W_gate"))
    W_out = property(lambda self: _stack(self.blocks, "mlp", "W_out"))
    b_in = property(lambda self: _stack(self.blocks, "mlp", "b_in"))
    b_out = property(lambda self: _stack(self.blocks, "mlp", "b_out"))

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> Float[Tensor, "d_model"]:
        """Sum of attention-out and MLP-out biases of the layers before `layer` (as TL). Refused
        where a block normalises or scales its outputs: the bias's share then depends on the
        position (`cache.get_full_resid_decomposition` gives it as its `bias` term)."""
        for block in self.blocks[: layer + 1]:
            if getattr(block, "output_transformed", False):
                raise UnsupportedModelError(
                    f"accumulated_bias: a block here {block.attn._output_transform}, so the biases' share of the "
                    "residual depends on the position; the `bias` term of cache.get_full_resid_decomposition() "
                    "(from model.run_with_cache) gives it exactly")
        first = self.blocks[0].attn.b_O
        total = torch.zeros_like(first)
        for block in self.blocks[:layer]:
            total = total + block.attn.b_O
            if include_mlp_biases:
                total = total + block.mlp.b_out
        if mlp_input:
            if layer >= len(self.blocks):
                raise ValueError("mlp_input=True needs a layer below n_layers: the unembed has no MLP")
            total = total + self.blocks[layer].attn.b_O
        return total


class Unembed:
    """`model.unembed(x)`: the LLM's unembedding with the final norm's weight folded in (TL's `fold_ln`),
    taking the normalised residual before that weight (`ln_final.hook_normalized`) to the logits.
    `W_U` and `b_U` are new tensors computed on each read: gradients reach the parameters, but a
    write into them does not edit the model (write into `lm_head` or the norm's weight instead)."""

    def __init__(self, module: nn.Linear, final_norm: NormWeights):
        self._module = module
        self._final_norm = final_norm

    def _norm_factors(self, device: torch.device) -> tuple[Tensor, Tensor | None]:
        """The final norm's `w` and its bias (None without one) on `device`. An offloaded norm
        (device_map: the last modules are offloaded first) is read while accelerate holds its
        weights, which are otherwise `meta`; a norm on another device than the head is moved."""
        norm = self._final_norm
        with align_module_device(_bound(norm, "norm weight")[0]):
            return norm.w.to(device), (norm.b.to(device) if norm.has_bias else None)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        """`lm_head`'s weight times the final norm's `w` per row (a new tensor, as TL's folded `W_U`)."""
        weight = _present(self._module).weight
        w, _ = self._norm_factors(weight.device)
        return weight.T * w[:, None]

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        """`lm_head`'s bias (zeros without one), plus the final norm's bias through `lm_head` (LayerNorm)."""
        head = _present(self._module)
        _, b = self._norm_factors(head.weight.device)
        return _bias(head) if b is None else _bias(head) + b @ head.weight.T

    def directions(self, tokens: Tensor | int) -> Float[Tensor, "... d_model"]:
        """Columns `W_U[:, tokens]`, d_model last, without folding the whole matrix."""
        weight = _present(self._module).weight
        w, _ = self._norm_factors(weight.device)
        return weight[tokens] * w

    def __call__(self, residual: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_vocab"]:
        # `residual @ W_U + b_U`, computed as `lm_head(w * residual + b)`: the same sum, through the
        # model's own head (accelerate's hook on it, if any, loads its weights and moves the input),
        # without a d_model x d_vocab copy
        w, b = self._norm_factors(residual.device)
        return self._module(residual * w if b is None else residual * w + b)


class Embed:
    """`model.embed(tokens)`: token embeddings (the `<image>` placeholder's own at image tokens)."""

    def __init__(self, module: nn.Embedding):
        self._module = module

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return _present(self._module).weight

    def __call__(self, tokens: Tensor) -> Float[Tensor, "... d_model"]:
        return self._module(tokens)


class LanguageModelWeights(StackedWeights):
    """The LLM's TL weights on the model itself: `W_E`, `W_U`, `b_U`, the stacked block weights."""

    unembed: Unembed
    embed: Embed

    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, "d_vocab"]:
        return self.unembed.b_U

    def tokens_to_residual_directions(self, tokens: str | int | Tensor) -> Float[Tensor, "... d_model"]:
        """The residual directions of `tokens` (a string must be one token), d_model last: columns of
        the folded `W_U` (`lm_head`'s times the final norm's weight), as in TL. Dotted with
        `cache.apply_ln_to_stack(stack)` or `cache.accumulated_resid(apply_ln=True)` (the final norm
        without its weight, as in TL) they give each component's share of the logits, for our cache
        and for TL's own `ActivationCache` alike."""
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.unembed.directions(tokens)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, Tensor):
            token = int(tokens.item())
        else:
            token = int(tokens)
        return self.unembed.directions(token)
