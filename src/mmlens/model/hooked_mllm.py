"""HookedMLLM: one TransformerLens-style hooked model across vision encoder, adapter and LLM.

The Hugging Face model runs its own code; hook points are threaded through it in place (see
`instrument`), named as in TransformerLens (`blocks.{l}.attn.hook_pattern`) for the LLM and with
`vision.` and `adapter.` prefixes for the other stages. `run_with_cache`, `run_with_hooks` and
`hooks()` come from TransformerLens's `HookedRootModule`; inputs are a `MultimodalInputs` or
the Hugging Face keywords.
"""

from __future__ import annotations

import difflib
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from PIL import Image
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from ..errors import HookNameError, InputError, LayoutMismatchError
from .architectures import architecture_for
from .architectures.base import BASE_INPUT_NAMES
from .architectures.bridge_aliases import WITHHELD_BRIDGE_NAMES
from .cache import MultimodalActivationCache
from .caching_hooks import plain_caching_hooks
from .config import MLLMConfig
from .generation import Generation
from .hook_contract import CheckedHookPoint
from .hook_names import RESULT_SITE, parse_hook_name
from .hook_tree import AdapterHooks, BlockHooks, MoEHooks, VisionHooks, use_moe_hooks
from .images.layout import ImageTokenLayout
from .images.preprocess import MaskGeometry
from .inputs import MultimodalInputs
from .loading import load_hf_checkpoint
from .runtime.allocator import tune_allocator
from .runtime.devices import input_device
from .runtime.layer_runs import check_layer, layer_range, run_or_stop, silenced
from .runtime.norms import FinalNormHooks
from .runtime.spec_check import verify_blocks
from .tl_versions import CACHING_HOOKS_DROP_BATCH_DIM_SAFELY, drop_batch_dim
from .tl_view import WithImages
from .tokens import TokenHelpers
from .weights import Embed, LanguageModelWeights, Unembed

ReturnType = Literal["logits", "loss", "both"] | None
ImageLike = Image.Image | np.ndarray | Tensor


class HookedMLLM(TokenHelpers, Generation, LanguageModelWeights, HookedRootModule):
    """A multimodal LLM with TransformerLens hooks on every stage.

    Build one with `from_pretrained` (shipped name, local folder or hub id) or `from_hf` (an
    in-memory Hugging Face model, which is instrumented in place). Both return it in eval mode.
    The TL weight surface (`W_U`, `blocks[l].attn.W_Q`, `model.vision.W_O` ...), token helpers
    and `unembed` read the Hugging Face parameters (see `weights`, `tokens`).
    """

    cfg: MLLMConfig

    def __init__(self, hf_model: nn.Module, processor: Any = None, *, verify: bool = True):
        super().__init__()
        self.architecture = architecture_for(hf_model)
        self.architecture.check_special_tokens(hf_model)
        self.cfg = self.architecture.build_config(hf_model)
        tokenizer = getattr(processor, "tokenizer", None)
        self.cfg = replace(self.cfg, **MLLMConfig.tl_fields(hf_model.config.get_text_config(), tokenizer))
        if getattr(hf_model, "hf_device_map", None):  # split or offloaded: inputs go where the forward starts
            self.cfg = replace(self.cfg, device=input_device(hf_model))
        self.hf_model = hf_model
        self.processor = processor
        if processor is not None:
            self.architecture.use_processor(processor)
        self.image_attention = self.architecture.own_attention_mode(hf_model)
        v, llm = self.cfg.vision, self.cfg.llm
        self.vision = VisionHooks(v)
        self.adapter = AdapterHooks(has_hidden=self.cfg.adapter.d_hidden is not None)
        self.hook_embed = CheckedHookPoint()
        self.hook_multimodal_embed = CheckedHookPoint()
        self.blocks = nn.ModuleList(
            BlockHooks(rotary=llm.positional_embedding_type == "rotary", gated_mlp=llm.gated_mlp,
                       sandwich_norms=llm.use_normalization_before_and_after, qk_norm=llm.use_qk_norm)
            for _ in range(llm.n_layers)
        )
        # the blocks the config marks as mixture-of-experts get expert points in place of a dense
        # MLP's, whatever the family, before it hooks its modules onto them
        moe_spec = getattr(getattr(self.architecture, "llm_block", None), "moe", None)
        use_moe_hooks(self.blocks, llm, shared_gate=moe_spec is not None and moe_spec.shared_expert_gate is not None)
        self.ln_final = FinalNormHooks()  # fires before its weight, which W_U carries (TL's fold_ln)
        self._handles = self.architecture.instrument(hf_model, self)
        self._stages = self.architecture.stage_modules(hf_model)
        self.unembed = Unembed(self._stages["llm"].unembed, self.ln_final)
        self.embed = Embed(self._stages["llm"].embed)
        self.setup()
        if self.cfg.device.type == "cpu":
            tune_allocator()
        # Largest relative difference between hooked and bare blocks on a probe batch (None: not checked).
        self.spec_difference = verify_blocks(self) if verify else None

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_hf(cls, hf_model: nn.Module, processor: Any = None, *, verify: bool = True) -> "HookedMLLM":
        """Wrap an in-memory Hugging Face model. The model is instrumented in place (its outputs
        are unchanged while no hook is active); `model.hf_model` is the same object.

        `verify` runs a small probe batch with and without an identity hook on every point and
        refuses (UnsupportedModelError, naming the block) a model whose hooked maths differs."""
        return cls(hf_model.eval(), processor, verify=verify).eval()

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        attn_implementation: str | None = None,
        load_processor: bool = True,
        verify: bool = True,
        device_map: str | dict[str, str | int] | None = None,
        max_memory: dict[str | int, str | int] | None = None,
        offload_folder: str | os.PathLike | None = None,
    ) -> "HookedMLLM":
        """Load a shipped model by name, a local Hugging Face checkpoint folder, or a hub id.

        Respects `HF_HUB_OFFLINE`; never installs packages. `attn_implementation` ("eager",
        "sdpa") is passed to Hugging Face; hooked layers always compute attention explicitly.
        `device_map` ("auto", or module name -> device, "cpu" or "disk"), `max_memory` and
        `offload_folder` split a model too large for one device through accelerate, as in
        Hugging Face; hooks then see each activation on the device of the layer that made it.
        """
        hf_model, processor = load_hf_checkpoint(
            name_or_path,
            device=device,
            dtype=dtype,
            attn_implementation=attn_implementation,
            load_processor=load_processor,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
        )
        return cls(hf_model, processor, verify=verify).eval()

    def setup(self) -> None:
        """Index our hook points only; the Hugging Face modules keep their own names."""
        self.mod_dict, self.hook_dict = {}, {}
        for name, module in self.named_modules():
            if not name or name == "hf_model" or name.startswith("hf_model."):
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def to(self, *args: Any, **kwargs: Any) -> "HookedMLLM":
        super().to(*args, **kwargs)
        param = next(self.hf_model.parameters())
        self.cfg = replace(self.cfg, device=param.device, dtype=param.dtype)
        return self

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Compute per-head outputs at `attn.hook_result` (memory: batch x pos x heads x d_model)."""
        self.cfg = replace(self.cfg, use_attn_result=use_attn_result)

    def tl_named_parameters(self) -> Iterator[tuple[str, Tensor]]:
        """The weights under TransformerLens's names (`embed.W_E`, `blocks.{l}.attn.W_Q` (`cross_attn`
        in a cross-attention block), `blocks.{l}.ln1.w`, `blocks.{l}.mlp.W_in`, `unembed.W_U` ...), then
        the tower's under `vision.`: views of the Hugging Face parameters (see `weights`), so a gradient or an in-place
        edit reaches the model. Grouped kv heads are `_W_K`/`_W_V` (TL's parameter names; `W_K`
        repeats them per query head); a norm's `w` is the factor it applies (`1 + weight` for Gemma's
        RMSNorms, a new tensor); `b` only for LayerNorms. As after TL's `fold_ln`, the final norm has
        no `w` / `b`: `unembed.W_U` / `unembed.b_U` carry them (new tensors, gradients still flow)."""
        yield "embed.W_E", self.W_E
        for prefix, stage in (("", self), ("vision.", self.vision)):
            if prefix:
                yield from _norm_parameters("vision.ln_pre", getattr(stage, "ln_pre", None))
            for layer, block in enumerate(stage.blocks):
                name = f"{prefix}blocks.{layer}"
                for norm in ("ln1", "ln2", "ln1_post", "ln2_post"):
                    yield from _norm_parameters(f"{name}.{norm}", getattr(block, norm, None))
                # a cross-attention block (Mllama) lists its weights under `cross_attn`; a linear-attention
                # block (Qwen3.5) has no attention weights in TL's vocabulary: its gated delta net's
                # parameters are the Hugging Face module's own
                for mixer in ("attn", "cross_attn"):
                    if mixer in block._modules:
                        yield from _attention_parameters(f"{name}.{mixer}", block._modules[mixer])
                gated = (self.cfg.llm if stage is self else self.cfg.vision).gated_mlp
                yield from _mlp_parameters(f"{name}.mlp", block.mlp, gated)
            if prefix:
                yield from _norm_parameters("vision.ln_post", getattr(stage, "ln_post", None))
        yield "unembed.W_U", self.W_U
        yield "unembed.b_U", self.b_U

    def enable_compatibility_mode(
        self,
        disable_warnings: bool = False,
        no_processing: bool = False,
        fold_ln: bool = True,
        center_writing_weights: bool = True,
        center_unembed: bool = True,
        fold_value_biases: bool = True,
        refactor_factored_attn_matrices: bool = False,
    ) -> None:
        """Accepted for TransformerLens 4's demos, which call it first; it changes nothing.

        In TL 4 it turns a `TransformerBridge` into a `HookedTransformer` look-alike: TL's hook
        names (this model has them already) and processed weights. Here one fold is always in
        place, whatever the arguments: the LLM's final norm is folded as TL's `fold_ln` folds it
        (`W_U = w[:, None] * lm_head.weight.T`, `b_U = lm_head.bias + b @ lm_head.weight.T` where the
        norm has a bias `b`, Gemma's `w` being `1 + weight`), so `ln_final.hook_normalized`,
        `apply_ln_to_stack(stack, -1)` and `accumulated_resid(apply_ln=True)` are the residual
        normalised without that weight, and `@ model.W_U + model.b_U` gives the logits. Nothing else
        is folded: block norms keep their weights (`blocks.{l}.ln1.hook_normalized` is weighted, so
        `@ W_Q` gives `hook_q`), no centring (`center_writing_weights`, `center_unembed`), no
        value-bias folding. A warning says which steps asked for are not applied (none with
        `no_processing=True`; silenced with `disable_warnings=True`).
        """
        asked = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights, "center_unembed": center_unembed,
                 "fold_value_biases": fold_value_biases, "refactor_factored_attn_matrices": refactor_factored_attn_matrices}
        skipped = [] if no_processing else [step for step, wanted in asked.items() if wanted]
        if skipped and not disable_warnings:
            warnings.warn(
                f"enable_compatibility_mode: hook names are already TransformerLens's; weight processing "
                f"({', '.join(skipped)}) is not applied beyond the final norm's weight, which W_U and b_U always carry "
                "(TL's fold_ln there); block weights are the checkpoint's own. Decompositions and direct logit "
                "attribution through the cache apply the norms as folded weights would. Pass "
                "no_processing=True to state that, or disable_warnings=True to silence this", stacklevel=2)

    # ----------------------------------------------------------------- hook names
    def hook_names(self, stage: Literal["vision", "adapter", "llm"] | None = None) -> list[str]:
        names = list(self.hook_dict)
        if stage is None:
            return names
        if stage not in ("vision", "adapter", "llm"):
            raise ValueError(f"stage must be 'vision', 'adapter' or 'llm', got {stage!r}")
        return [n for n in names if parse_hook_name(n).stage == stage]

    def resolve_hook_name(self, name: str) -> str:
        """The canonical name of a hook point, accepting TransformerBridge aliases."""
        if name in self.hook_dict:
            return name
        canonical = self.architecture.canonical_name(name)
        if canonical in self.hook_dict:
            return canonical
        if name in WITHHELD_BRIDGE_NAMES:
            raise HookNameError(f"{name!r} is not an alias here: {WITHHELD_BRIDGE_NAMES[name]}")
        close = difflib.get_close_matches(name, list(self.hook_dict), n=5, cutoff=0.5)
        raise HookNameError(
            f"unknown hook name {name!r}. Closest: {close or 'none'}. "
            "model.hook_names() lists them all (docs/hooks.md explains each)."
        )

    def _checked_name(self, name: str) -> str:
        canonical = self.resolve_hook_name(name)
        if parse_hook_name(canonical).site == RESULT_SITE and not self.cfg.use_attn_result:
            raise ValueError(
                f"{canonical} only fires after model.set_use_attn_result(True) "
                "(it materialises one d_model vector per head and position)"
            )
        return canonical

    def _name_filter(self, names_filter: Any) -> Callable[[str], bool]:
        """A predicate on canonical names; listed names are checked, per-head results are only
        cached when enabled."""
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if isinstance(names_filter, (list, tuple, set)):
            wanted = {self._checked_name(n) for n in names_filter}
            return wanted.__contains__
        if names_filter is None:
            names_filter = lambda name: True  # noqa: E731
        if not callable(names_filter):
            raise TypeError(f"names_filter must be a name, a list of names or a predicate, got {type(names_filter).__name__}")
        if self.cfg.use_attn_result:
            return names_filter
        return lambda name: parse_hook_name(name).site != RESULT_SITE and names_filter(name)

    # Route every way TransformerLens adds a hook by name through the alias/typo check.
    def _enable_hook_with_name(self, name: str, hook: Callable, dir: Literal["fwd", "bwd"]):
        super()._enable_hook_with_name(self._checked_name(name), hook, dir)

    def remove_all_hook_fns(
        self, direction: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        # TL resets every point after each hooked run; a model has hundreds and few listen, and
        # nn.Module.__setattr__ on each empty one cost about 3% of a small forward
        for point in self.hook_dict.values():
            if point.fwd_hooks or point.bwd_hooks:
                point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def add_hook(self, name: Any, hook: Callable, dir: Literal["fwd", "bwd"] = "fwd", **kwargs: Any):
        if isinstance(name, str):
            name = self._checked_name(name)
        return super().add_hook(name, hook, dir=dir, **kwargs)

    # ----------------------------------------------------------------- inputs
    def layout(
        self, input_ids: Int[Tensor, "batch seq"] | MultimodalInputs, **family_inputs: Tensor
    ) -> ImageTokenLayout:
        """Positions, grid cells and pixel boxes of every image's tokens in `input_ids`
        (`family_inputs`: the family's own keywords, such as `image_sizes`, where it needs them)."""
        if isinstance(input_ids, MultimodalInputs):
            return input_ids.layout
        return self.architecture.layout(self.cfg, torch.as_tensor(input_ids), **family_inputs)

    def prepare(
        self,
        images: ImageLike | Sequence[ImageLike] | Sequence[Sequence[ImageLike]],
        prompts: str | Sequence[str] = "",
    ) -> MultimodalInputs:
        """Tokenise prompts and preprocess images into one padded batch with its layout.

        `images` is one image, one image per prompt, or a list of images per prompt. A prompt
        without the image placeholder gets the chat template (or the placeholder) inserted; a
        single prompt string is used for every image.
        """
        processor = self._require_processor()
        per_prompt = _images_per_prompt(images)
        if not per_prompt:
            raise ValueError("empty batch: give at least one image")
        if isinstance(prompts, str):
            prompts = [prompts] * len(per_prompt)
        if isinstance(prompts, (bytes, Mapping)) or not isinstance(prompts, Sequence) \
                or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be a string or a list of strings (\"\" for no text); got {prompts!r:.80}")
        prompts = list(prompts)
        if len(prompts) != len(per_prompt):
            raise ValueError(
                f"{len(per_prompt)} image groups but {len(prompts)} prompts; give one prompt per "
                "image (or per list of images), or a single prompt string for all"
            )
        token = processor.image_token
        texts = []
        for i, (prompt, group) in enumerate(zip(prompts, per_prompt)):
            text = prompt if token in prompt else self._with_placeholders(prompt, len(group))
            if text.count(token) != len(group):
                raise ValueError(
                    f"prompt {i} has {text.count(token)} {token} placeholder(s) but {len(group)} "
                    "image(s); use one placeholder per image or none (then they are inserted)"
                )
            texts.append(text)
        nested = [[_to_pil(img, f"image {i}.{j}") for j, img in enumerate(g)] for i, g in enumerate(per_prompt)]
        batch = processor(images=self.architecture.processor_images(nested), text=texts, padding=True, return_tensors="pt")
        input_ids = batch["input_ids"]
        device = self.cfg.device
        extra = {k: batch[k] for k in self.architecture.extra_input_names if k in batch}
        layout_only = self.architecture.layout_inputs(nested)  # what the processor does not return
        return MultimodalInputs(
            input_ids=input_ids.to(device),
            pixel_values=batch["pixel_values"].to(device=device, dtype=self.cfg.dtype),
            attention_mask=batch["attention_mask"].to(device),
            layout=self.layout(input_ids, **extra, **layout_only),
            prompts=tuple(texts),
            extra={k: v.to(device) for k, v in extra.items()},
            layout_inputs={k: v.to(device) for k, v in layout_only.items()},
        )

    @property
    def geometry(self) -> MaskGeometry:
        """The processor's resize / pad / crop (or anyres tiling), to bring label masks into the
        pixels the layout's boxes live in."""
        if getattr(self, "_geometry", None) is None:
            self._geometry = self.architecture.mask_geometry(self._require_processor())
        return self._geometry

    def transform_mask(self, mask: Any, ignore_index: int = 255) -> np.ndarray:
        """A label mask in the pixels the layout's boxes live in: the preprocessed image for a fixed
        grid (nearest-neighbour; padding = ignore), the original image for anyres tiles."""
        return self.geometry.transform_mask(mask, ignore_index=ignore_index)

    def _require_processor(self) -> Any:
        if self.processor is None:
            raise ValueError(
                "this model has no processor: pass processor= to HookedMLLM.from_hf, or call "
                "the model with input_ids=, pixel_values=, attention_mask= directly"
            )
        return self.processor

    def _with_placeholders(self, prompt: str, n_images: int) -> str:
        processor = self.processor
        if getattr(processor, "chat_template", None):
            content = [{"type": "image"}] * n_images + ([{"type": "text", "text": prompt}] if prompt else [])
            return processor.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
        return (processor.image_token + "\n") * n_images + prompt

    def _coerce_inputs(
        self,
        inputs: MultimodalInputs | Mapping[str, Tensor] | Tensor | None,
        input_ids: Tensor | None,
        pixel_values: Tensor | None,
        attention_mask: Tensor | None,
        check_images: bool = True,
    ) -> dict[str, Tensor]:
        family_names = self.architecture.extra_input_names + self.architecture.layout_input_names
        if isinstance(inputs, MultimodalInputs):
            kwargs = inputs.keywords()
        elif isinstance(inputs, Mapping):
            names = BASE_INPUT_NAMES + family_names
            kwargs = {k: inputs[k] for k in names if k in inputs}
        elif isinstance(inputs, Tensor):
            kwargs = {"input_ids": inputs}
        elif inputs is None:
            kwargs = {}
        else:
            raise TypeError(
                f"expected MultimodalInputs (from model.prepare), a mapping of Hugging Face inputs or "
                f"input_ids; got {type(inputs).__name__}"
            )
        for key, value in (("input_ids", input_ids), ("pixel_values", pixel_values), ("attention_mask", attention_mask)):
            if value is not None:
                kwargs[key] = value
        ids = kwargs.get("input_ids")
        if ids is None:
            raise ValueError("no input_ids: pass MultimodalInputs from model.prepare(...) or input_ids=")
        if ids.ndim != 2 or ids.shape[0] == 0:
            raise ValueError(f"input_ids must be a non-empty [batch, seq] tensor, got shape {tuple(ids.shape)}")
        self._check_context(ids.shape[1])
        if check_images:
            pixel_values = kwargs.get("pixel_values")
            if pixel_values is None and bool((ids == self.cfg.image_token_id).any()):
                raise InputError(
                    f"these input_ids hold {int((ids == self.cfg.image_token_id).sum())} image tokens but no images. "
                    "Pass the MultimodalInputs from model.prepare(...) instead of its ids (TransformerLens's "
                    "patching.get_act_patch_* take it in place of the tokens), or model.with_images(inputs) as "
                    "the model for helpers that pass ids only")
            family = {k: kwargs[k] for k in family_names if k in kwargs}
            self.architecture.check_inputs(self.cfg, ids, pixel_values, **family)
            if pixel_values is not None and pixel_values.is_floating_point() and not torch.isfinite(pixel_values).all():
                bad = [i for i, image in enumerate(pixel_values) if not torch.isfinite(image).all()]
                raise InputError(f"pixel_values of image(s) {bad} hold NaN or inf; every activation downstream "
                                 "would be NaN. Check the images (or the code that built pixel_values)")
        return kwargs

    @property
    def context_length(self) -> int | None:
        """The LLM's longest sequence (`cfg.n_ctx`: its text config's `max_position_embeddings`; None if it has none)."""
        return self.cfg.n_ctx

    def _check_context(self, length: int, new_tokens: int = 0) -> None:
        """Refuse a sequence longer than the LLM's positions reach: past the limit a model runs on
        positions it never saw in training and answers without a word of warning."""
        limit = self.context_length
        if limit is not None and length + new_tokens > limit:
            asked = f"{length} tokens" + (f" + {new_tokens} new tokens" if new_tokens else "")
            raise InputError(
                f"the inputs are {asked} long (image tokens inserted, padded to the batch's longest row), but "
                f"{self.cfg.architecture}'s LLM takes at most {limit} (max_position_embeddings). Shorten the "
                "prompt, use fewer or smaller images" + (", or generate fewer tokens" if new_tokens else "")
            )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        inputs: MultimodalInputs | Mapping[str, Tensor] | Tensor | str | list[str] | None = None,
        *,
        input_ids: Int[Tensor, "batch seq"] | None = None,
        pixel_values: Float[Tensor, "n_images 3 h w"] | None = None,
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        return_type: ReturnType = "logits",
        llm_inputs_embeds: Float[Tensor, "batch seq d_model"] | None = None,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
        tokens: MultimodalInputs | Int[Tensor, "batch seq"] | None = None,
        loss_per_token: bool = False,
        prepend_bos: bool | None = None,
        padding_side: Literal["left", "right"] | None = None,
    ) -> Any:
        """Logits [batch, seq, d_vocab] (or the next-token loss over text tokens, or both).

        `inputs`: a `MultimodalInputs` (from `prepare`), Hugging Face keywords, token ids, or
        text (`"a string"` or a list: tokenised by `to_tokens` with `prepend_bos` and
        `padding_side`, no images). As in TransformerLens, `stop_at_layer=l` returns the
        residual entering LLM block `l`; `start_at_layer=l` takes that residual as `inputs`
        and runs the rest (`tokens=` the ids or `MultimodalInputs` it came from: they give the
        padding mask, the image-attention mask and the loss targets). `loss_per_token=True`
        gives `[batch, seq - 1]` losses (`loss_fn`: zero at image targets and where the prediction
        or its target is padding).

        `llm_inputs_embeds`: the LLM's input (`hook_multimodal_embed`, i.e. text embeddings with
        the adapter's output at the image tokens) from an earlier run of the same inputs; only
        the LLM runs, so vision and adapter hooks do not fire. With `start_at_layer=l` it is the
        residual entering block `l` instead, and `inputs` are the tokens it came from.
        """
        if return_type not in ("logits", "loss", "both", None):
            raise ValueError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")
        text = isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, str) for t in inputs))
        if text:
            inputs = self._text_inputs(inputs, prepend_bos, padding_side)
        elif prepend_bos is not None or padding_side is not None:
            raise InputError("prepend_bos and padding_side apply to text inputs; these inputs are already tokenised")
        n_layers = self.cfg.n_layers
        start = check_layer(start_at_layer, n_layers, "start_at_layer")
        stop = check_layer(stop_at_layer, n_layers, "stop_at_layer")
        if start is not None and llm_inputs_embeds is None:
            if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
                raise InputError("with start_at_layer, inputs is the residual [batch, seq, d_model] entering that layer")
            llm_inputs_embeds, inputs = inputs, tokens
            if inputs is None:
                inputs = torch.zeros(llm_inputs_embeds.shape[:2], dtype=torch.long, device=llm_inputs_embeds.device)
                if self.image_attention != "causal":
                    raise InputError("this model attends bidirectionally among image tokens: pass tokens= so they are known")
                if return_type in ("loss", "both"):
                    raise InputError("a loss needs the targets: pass tokens= with start_at_layer")
        elif tokens is not None:
            raise InputError("tokens= goes with start_at_layer and a residual as inputs; otherwise pass the ids or "
                             "MultimodalInputs as inputs")
        kwargs = self._coerce_inputs(inputs, input_ids, pixel_values, attention_mask, check_images=llm_inputs_embeds is None)
        run_kwargs = self._with_image_attention(kwargs)
        embeds_points: tuple = ()
        if llm_inputs_embeds is not None:
            expected = (*kwargs["input_ids"].shape, self.cfg.d_model)
            if tuple(llm_inputs_embeds.shape) != expected:
                raise ValueError(f"llm_inputs_embeds must be [batch, seq, d_model] = {expected} for these inputs, "
                                 f"got {tuple(llm_inputs_embeds.shape)}")
            keep = ("attention_mask", *self.architecture.llm_input_names)
            run_kwargs = {"inputs_embeds": llm_inputs_embeds, **{k: run_kwargs[k] for k in keep if k in run_kwargs},
                          **self.architecture.llm_keywords(self.hf_model, kwargs)}
            if start:  # the residual at a later layer is not the LLM's input embedding
                embeds_points = (self.hook_embed, self.hook_multimodal_embed)
        layers = self._stages["llm"].layers
        # block `start` takes the residual as given: a decoder may add to its input before block 0 (OPT's positions)
        given = llm_inputs_embeds if start is not None else None
        with layer_range(layers, start, stop, given), silenced(*embeds_points):
            out, residual = run_or_stop(lambda: self.architecture.forward(self.hf_model, **run_kwargs))
        if residual is not None:
            return residual
        logits = out.logits
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = self.loss_fn(logits, kwargs["input_ids"], kwargs.get("attention_mask"), per_token=loss_per_token)
        return loss if return_type == "loss" else (logits, loss)

    def _text_inputs(self, text: str | list[str], prepend_bos: bool | None, padding_side: str | None) -> dict[str, Tensor]:
        ids, mask = self.text_batch(text, prepend_bos, padding_side)
        return {"input_ids": ids.to(self.cfg.device), "attention_mask": mask.to(self.cfg.device)}

    def run_vision(
        self,
        input: Float[Tensor, "n_images 3 h w"] | Float[Tensor, "n_images n_patches d_vision"],
        *,
        stop_at_layer: int | None = None,
        start_at_layer: int | None = None,
    ) -> Float[Tensor, "n_images n_patches d_vision"]:
        """The vision tower alone, TL style: pixels (or, with `start_at_layer=l`, the residual
        entering block `l`) in, the residual entering block `stop_at_layer` out (default: leaving
        the last block, before any post-norm). Vision hooks fire; wrap in `model.hooks(...)`."""
        if not self.cfg.vision.image_size:
            raise InputError(f"run_vision takes images of one fixed size; {self.cfg.architecture} reads each image at its "
                             "own resolution: run the model with hooks on vision.* points, or stop_at_layer in the LLM")
        n_layers = self.cfg.vision.n_layers
        start = check_layer(start_at_layer, n_layers, "start_at_layer")
        stop = check_layer(stop_at_layer, n_layers, "stop_at_layer")
        stop = n_layers if stop is None else stop
        residual = None
        if start is not None:
            residual, size = input, self.cfg.vision.image_size
            input = torch.zeros(len(residual), 3, size, size, dtype=self.cfg.dtype, device=residual.device)
            if start == stop:
                return residual
        silent = (self.vision.hook_embed, *([self.vision.ln_pre.hook_scale, self.vision.ln_pre.hook_normalized] if self.cfg.vision.has_ln_pre else []))
        with layer_range(self._stages["vision"].layers, start, stop, residual), silenced(*(silent if start is not None else ())):
            _, out = run_or_stop(lambda: self._stages["vision"].tower(input))
        return out

    @contextmanager
    def using_image_attention(self, mode: Literal["causal", "bidirectional"] | str) -> Iterator["HookedMLLM"]:
        """Run every forward inside the block with image tokens attending causally or both ways,
        whatever the checkpoint was trained with (`model.image_attention` is its own mode; a
        family with its own rule, such as PaliGemma's "prefix", lists it in
        `model.architecture.attention_modes`)."""
        modes = self.architecture.attention_modes
        if mode not in modes:
            raise ValueError(f"mode must be one of {modes}, got {mode!r}")
        own, self.image_attention = self.image_attention, mode
        try:
            yield self
        finally:
            self.image_attention = own

    def _with_image_attention(self, kwargs: dict[str, Tensor]) -> dict[str, Tensor]:
        """The keywords with the current attention mode in force (a 4D mask where it differs from
        Hugging Face's own rule); a 4D mask given by the caller is kept as is."""
        mask = kwargs.get("attention_mask")
        if mask is not None and (not isinstance(mask, Tensor) or mask.ndim == 4):  # 4D, or per layer type
            return kwargs
        family_inputs = {k: v for k, v in kwargs.items() if k not in BASE_INPUT_NAMES}
        layout = lambda: self.layout(kwargs["input_ids"], **family_inputs)  # noqa: E731 - only if a mask needs it
        return self.architecture.attention_kwargs(self.image_attention, kwargs, layout, self.cfg.dtype)

    def attention_edges(self, inputs: MultimodalInputs) -> Bool[Tensor, "batch query key"]:
        """True where a query may read a key under the current attention mode (padding respected)."""
        return self.architecture.attention_edges(self.image_attention, inputs.layout, inputs.attention_mask, dict(inputs.extra))

    def loss_fn(
        self,
        logits: Float[Tensor, "batch seq d_vocab"],
        tokens: Int[Tensor, "batch seq"] | MultimodalInputs,
        attention_mask: Int[Tensor, "batch seq"] | None = None,
        per_token: bool = False,
    ) -> Float[Tensor, ""] | Float[Tensor, "batch seq_minus_1"]:
        """TL's `loss_fn`: the mean next-token cross-entropy, over positions whose target is text.

        As in TL, a prediction counts where both it and its target are real (attention mask 1:
        `tokens`' own when it is a `MultimodalInputs`); and an image token is never a target (the
        model is not trained to predict the image placeholder). `per_token`: each position's loss
        `[batch, seq - 1]`, zero where it does not count.
        """
        if isinstance(tokens, MultimodalInputs):
            attention_mask = tokens.attention_mask if attention_mask is None else attention_mask
            tokens = tokens.input_ids
        tokens = torch.as_tensor(tokens, device=logits.device)
        if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
            raise InputError(f"loss_fn takes logits [batch, pos, d_vocab] and tokens [batch, pos] of the same batch and "
                             f"length; got {tuple(logits.shape)} and {tuple(tokens.shape)}")
        targets = tokens[:, 1:]
        keep = targets != self.cfg.image_token_id
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, device=logits.device).bool()
            keep &= mask[:, 1:] & mask[:, :-1]
        losses = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none"
        )
        losses = losses * keep.flatten()
        if per_token:
            return losses.view(targets.shape)
        return losses.sum() / keep.sum().clamp(min=1)

    def get_caching_hooks(
        self, names_filter: Any = None, incl_bwd: bool = False, device: Any = None, remove_batch_dim: bool = False,
        cache: dict | None = None, pos_slice: Any = None,
    ) -> tuple[dict, list, list]:
        """TransformerLens's caching hooks; where a run asks for no device, position slice, batch-dimension
        drop or gradients, hooks that store each activation as it is (`caching_hooks.py`), which is the same."""
        sliced = pos_slice is not None and getattr(pos_slice, "mode", None) != "identity"  # TL's Slice(None) is identity
        if incl_bwd or device is not None or remove_batch_dim or sliced:
            return super().get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache, pos_slice)
        self.is_caching = True  # as TransformerLens's own sets it, until the hooks are reset
        return plain_caching_hooks(list(self.hook_dict), names_filter, cache)

    def run_with_cache(
        self, *model_args: Any, names_filter: Any = None, return_cache_object: bool = True, **kwargs: Any
    ) -> tuple[Any, MultimodalActivationCache | dict[str, Tensor]]:
        """Run and cache activations of every stage (or those `names_filter` selects)."""
        ids = self._batch_ids(model_args, kwargs)
        remove_batch_dim = bool(kwargs.get("remove_batch_dim"))
        if remove_batch_dim:
            batch = 1 if isinstance(ids, str) else len(ids) if ids is not None else 1
            assert batch == 1, f"Cannot remove batch dimension from cache with batch size {batch}"
            # TL 3.9's caching hook slices positions by an entry's rank before it drops the batch
            kwargs["remove_batch_dim"] = CACHING_HOOKS_DROP_BATCH_DIM_SAFELY
        out, cache = super().run_with_cache(*model_args, names_filter=self._name_filter(names_filter), **kwargs)
        if remove_batch_dim and not CACHING_HOOKS_DROP_BATCH_DIM_SAFELY:
            cache = {name: drop_batch_dim(value) for name, value in cache.items()}
        if not return_cache_object:
            return out, cache
        cache_object = MultimodalActivationCache(cache, self, has_batch_dim=not remove_batch_dim)
        if isinstance(ids, MultimodalInputs):
            cache_object.layout = ids.layout
        elif isinstance(ids, Tensor):
            try:  # bare ids lack the keywords some families' layouts need (LLaVA-NeXT's, InternVL's image_sizes)
                cache_object.layout = self.layout(ids)
            except (LayoutMismatchError, InputError):
                cache_object.layout = None
        return out, cache_object

    # ----------------------------------------------------------------- SAEs (SAELens's names; mmlens.sae does
    # the work, imported when called because it builds on this package)
    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        from ..sae import add_sae
        add_sae(self, sae, use_error_term)

    def reset_saes(self, act_names: str | Sequence[str] | None = None, prev_saes: Sequence[Any] | None = None) -> None:
        from ..sae import reset_saes
        reset_saes(self, act_names, prev_saes)

    def saes(self, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None):
        from ..sae import spliced
        return spliced(self, saes, reset_saes_end, use_error_term)

    def run_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs: Any) -> Any:
        from ..sae import run_with_saes
        return run_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                             use_error_term=use_error_term, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs: Any) -> Any:
        from ..sae import run_with_cache_with_saes
        return run_with_cache_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end,
                                        use_error_term=use_error_term, **kwargs)

    def run_with_hooks_with_saes(self, *model_args: Any, saes: Any = (), reset_saes_end: bool = True, **kwargs: Any) -> Any:
        from ..sae import run_with_hooks_with_saes
        return run_with_hooks_with_saes(self, *model_args, saes=saes, reset_saes_end=reset_saes_end, **kwargs)

    def with_images(self, inputs: MultimodalInputs) -> WithImages:
        """A view whose forwards on token ids carry `inputs`' images, for TransformerLens's own
        helpers (`transformer_lens.patching`) that pass ids only."""
        return WithImages(self, inputs)

    @staticmethod
    def _batch_ids(model_args: tuple, kwargs: dict) -> Any:
        """What a forward's arguments say the batch is: MultimodalInputs, ids, text or None."""
        first = model_args[0] if model_args else kwargs.get("inputs", kwargs.get("input_ids"))
        if kwargs.get("start_at_layer") is not None:
            first = kwargs.get("tokens")
        if isinstance(first, Mapping):
            first = first.get("input_ids")
        if isinstance(first, Tensor) and first.is_floating_point():
            return None
        return first

    def __repr__(self) -> str:
        return f"HookedMLLM({self.cfg.summary()}, {len(self.hook_dict)} hook points)"


def _attention_parameters(name: str, attn: Any) -> Iterator[tuple[str, Tensor]]:
    """One attention's weights under TL's names (`_W_K` / `_W_V` where kv heads are grouped)."""
    grouped = attn.repeat_kv_heads > 1
    kv = ("_W_K", "_W_V", "_b_K", "_b_V") if grouped else ("W_K", "W_V", "b_K", "b_V")
    for weight in ("W_Q", kv[0], kv[1], "W_O", "b_Q", kv[2], kv[3], "b_O"):
        yield f"{name}.{weight}", getattr(attn, weight)
    for norm in ("q_ln", "k_ln"):
        yield from _norm_parameters(f"{name}.{norm}", getattr(attn, norm, None))


def _mlp_parameters(name: str, mlp: Any, gated: bool) -> Iterator[tuple[str, Tensor]]:
    """A dense MLP's weights, or a mixture of experts' under TL's MoE names: the router `W_gate`,
    then each expert's `experts.{e}.W_in` / `W_gate` / `W_out` (and a shared expert's weights)."""
    if not isinstance(mlp, MoEHooks):
        for weight in ("W_in", *(("W_gate",) if gated else ()), "b_in", "W_out", "b_out"):
            yield f"{name}.{weight}", getattr(mlp, weight)
        return
    yield f"{name}.W_gate", mlp.W_gate
    for e, expert in enumerate(mlp.experts):
        for weight in ("W_in", "W_gate", "W_out"):
            yield f"{name}.experts.{e}.{weight}", getattr(expert, weight)
    if hasattr(mlp, "shared_expert"):
        yield from _mlp_parameters(f"{name}.shared_expert", mlp.shared_expert, gated=True)


def _norm_parameters(name: str, norm: Any) -> Iterator[tuple[str, Tensor]]:
    if norm is None or getattr(norm, "_weight_source", None) is None:
        return
    yield f"{name}.w", norm.w
    if norm.kind == "LN":
        yield f"{name}.b", norm.b


def _images_per_prompt(images: Any) -> list[list[Any]]:
    if isinstance(images, (Image.Image, np.ndarray, Tensor)):
        return [[images]]
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise TypeError(
            f"images must be a PIL image, an HxWx3 uint8 array, a 3xHxW tensor, or a list of them; "
            f"got {type(images).__name__}"
        )
    return [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]


def _to_pil(image: Any, where: str) -> Image.Image:
    size = image.size if isinstance(image, Image.Image) else tuple(getattr(image, "shape", (1, 1, 1)))
    if 0 in tuple(size):
        raise InputError(f"{where} is empty (size {tuple(size)}); every image needs at least one pixel")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.ndim == 3 and image.shape[0] == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        if image.dtype != np.uint8:
            if not np.isfinite(image).all():
                raise InputError(f"{where} holds NaN or inf; float images must be finite, in [0, 1]")
            if image.min() < 0 or image.max() > 1:
                raise ValueError(f"{where}: float images must be in [0, 1]; got range [{image.min()}, {image.max()}]")
            image = (image * 255).round().astype(np.uint8)
        return Image.fromarray(image)
    shape = getattr(image, "shape", None)
    raise TypeError(
        f"{where} is a {type(image).__name__}{f' of shape {shape}' if shape is not None else ''}; "
        "expected a PIL image, an HxWx3 array or a 3xHxW tensor"
    )
