"""The test tier every model family passes. A family's test file makes its fixtures with
`fixtures(variants)` (each variant builds a fresh Hugging Face model and processor from a config,
random weights, fixed seed, for an attention implementation) and imports the tier's tests
(`from family_tier import *`), which then run on its own models.

Parity: hooks off = Hugging Face bit for bit; an identity hook on every point = Hugging Face
within 1e-5. Layout: every image placeholder is one grid token of one image, pixel boxes tile the
processed image. Attention: a knockout equals Hugging Face run with the equivalent 4D mask. Spec:
a wrong block spec is refused at load. Analyses: every study runs end to end.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from mmlens import HookedMLLM, MultimodalInputs
from mmlens.errors import HookNameError, UnsupportedModelError
from mmlens.experiments import anchor_knockout, conflicting_pairs, find_recovery_heads, position_study
from mmlens.interventions import CacheMetric, Run, TokenGroup, bidirectional_image_attention, head_sweep, knockout, recovery_blocked
from mmlens.model.architectures import Architecture
from mmlens.model.runtime.attention_masks import additive_mask
from mmlens.model.runtime.instrument import AttentionSpec
from mmlens.model.images.layout import IMAGE_BLOCK_KINDS
from mmlens.model.images.preprocess import MaskGeometry
from mmlens.probing import probe_sweep
from mmlens.sae import SAE, SAEConfig

from conftest import random_images

PROMPTS = ["what is in the image ?", "how many", "the colour of the left shape is ?"]
__all__ = [
    "test_bidirectional_edit_equals_the_bidirectional_mode",
    "test_bridge_aliases_resolve_to_real_hook_points",
    "test_cache_equals_hf_hidden_states",
    "test_family_keywords_travel_everywhere",
    "test_hooks_off_equal_hf_bit_for_bit",
    "test_identity_hooks_everywhere_equal_hf",
    "test_knockout_equals_hf_with_its_mask",
    "test_layout_contract",
    "test_llm_keywords_reach_every_run_from_merged_embeddings",
    "test_mask_geometry_is_a_mask_geometry",
    "test_sae_with_error_term_keeps_logits",
    "test_wrong_spec_is_refused",
]
Builder = Callable[[str], tuple[nn.Module, Any]]  # attention implementation -> (HF model, processor)


@dataclass
class Family:
    model: HookedMLLM
    reference: nn.Module
    inputs: MultimodalInputs


def build_family(make: Callable[[], tuple[nn.Module, Any]], padding_side: str = "left", n_images: int = 3) -> Family:
    hf_model, processor = make()
    processor.tokenizer.padding_side = padding_side
    reference = copy.deepcopy(hf_model)
    model = HookedMLLM.from_hf(hf_model, processor)
    inputs = model.prepare(random_images(n_images), PROMPTS[:n_images])
    assert inputs.attention_mask.min() == 0, "the batch must contain padding"
    return Family(model, reference, inputs)


def assert_bridge_aliases(model: HookedMLLM, inputs: MultimodalInputs, names: dict[str, str]) -> None:
    """TransformerBridge's names (keys) resolve to ours (values) and cache under ours."""
    for bridge, ours in names.items():
        assert model.resolve_hook_name(bridge) == ours
    _, by_bridge = model.run_with_cache(inputs, names_filter=list(names))
    assert set(by_bridge.keys()) == set(names.values())


def verified_vision_knockout(model: HookedMLLM, inputs: MultimodalInputs) -> tuple[Any, torch.Tensor]:
    """Every image token's edges to the top-left LLM token's patches blocked in every tower block,
    verified to leave no attention on them: the knockout and the logits it gives."""
    layers = range(model.cfg.vision.n_layers)
    ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.box(0, 0, 1, 1), layers=layers,
                  stage="vision", verify=True)
    with ko:
        logits = model(inputs)
    assert ko.n_blocked_edges > 0 and set(ko.blocked_mass) == set(layers)
    assert all(mass == 0.0 for mass in ko.blocked_mass.values())
    return ko, logits


def assert_vision_knockout_equals_hf_attention(family: Family, monkeypatch, hf_module: Any, attention: str) -> None:
    """A tower knockout = Hugging Face's model with the blocked edges as the additive mask of its eager
    vision attention function `hf_module.<attention>` (for towers whose layers pass no mask)."""
    model, inputs, reference = family.model, family.inputs, family.reference
    ko, ours = verified_vision_knockout(model, inputs)
    unedited = model(inputs)  # before the patch below, which reaches this model's unhooked tower too
    mask = additive_mask(~ko.blocked.cpu())
    plain = getattr(hf_module, attention)
    monkeypatch.setattr(hf_module, attention,
                        lambda module, q, k, v, attention_mask, **kw: plain(module, q, k, v, mask, **kw))
    theirs = reference(**inputs.hf_kwargs()).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - unedited)[valid].abs().max() > 1e-4, "the knockout changed something"


def fixtures(variants: dict[str, Builder], attns: tuple[str, ...] = ("eager", "sdpa"), eager_variants: list[str] | None = None):
    """The fixtures the tier's tests take: `family` (every variant under every attention
    implementation), `eager` (the `eager_variants`, default all, with eager attention) and
    `builder` (a function building a fresh eager model of each variant)."""

    @pytest.fixture(scope="module", params=[(v, a) for v in variants for a in attns], ids=lambda p: "-".join(p))
    def family(request):
        variant, attn = request.param
        return build_family(lambda: variants[variant](attn))

    @pytest.fixture(scope="module", params=eager_variants or list(variants))
    def eager(request):
        return build_family(lambda: variants[request.param]("eager"))

    @pytest.fixture(params=list(variants))
    def builder(request):
        return lambda: variants[request.param]("eager")

    return family, eager, builder


@torch.no_grad()
def test_hooks_off_equal_hf_bit_for_bit(family: Family) -> None:
    ours = family.model(family.inputs)
    theirs = family.reference(**family.inputs.hf_kwargs()).logits
    assert torch.equal(ours, theirs)


def run_with_identity_hooks_everywhere(model, inputs) -> tuple[torch.Tensor, set[str]]:
    """(logits, names of the points that fired) of a run with an identity hook on every point,
    per-head attention results included."""
    model.set_use_attn_result(True)
    fired = set()

    def identity(x, hook):
        fired.add(hook.name)
        return x.clone()

    try:
        return model.run_with_hooks(inputs, fwd_hooks=[(lambda name: True, identity)]), fired
    finally:
        model.set_use_attn_result(False)


@torch.no_grad()
def test_identity_hooks_everywhere_equal_hf(family: Family) -> None:
    model = family.model
    ours, fired = run_with_identity_hooks_everywhere(model, family.inputs)
    theirs = family.reference(**family.inputs.hf_kwargs()).logits
    valid = family.inputs.attention_mask.bool()  # sdpa leaves fully padded query rows undefined
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert fired == set(model.hook_names()), f"never fired: {sorted(set(model.hook_names()) - fired)[:5]}"


@torch.no_grad()
def test_cache_equals_hf_hidden_states(eager: Family) -> None:
    model, inputs = eager.model, eager.inputs
    _, cache = model.run_with_cache(inputs)
    ref = eager.reference(**inputs.hf_kwargs(), output_hidden_states=True)
    for layer in range(model.cfg.n_layers):
        torch.testing.assert_close(cache[f"blocks.{layer}.hook_resid_pre"], ref.hidden_states[layer], atol=1e-5, rtol=0)
    d_model = model.cfg.d_model
    adapter, merged = cache["adapter.hook_out"], cache["hook_multimodal_embed"]
    if not isinstance(ref.image_hidden_states, torch.Tensor):  # SmolVLM returns the image encoder's output
        ref.image_hidden_states = torch.cat(list(ref.image_hidden_states.pooler_output))
    if adapter.numel() == ref.image_hidden_states.numel():
        torch.testing.assert_close(adapter.reshape(-1, d_model), ref.image_hidden_states.reshape(-1, d_model), atol=1e-5, rtol=0)
    else:  # the model reshapes the adapter's output (tiles joined, unpadded, newlines): compare where it lands
        placeholders = inputs.input_ids == model.cfg.image_token_id
        torch.testing.assert_close(merged[placeholders], ref.image_hidden_states.reshape(-1, d_model), atol=1e-5, rtol=0)
    # the layout's adapter addressing lands on its LLM positions: what the adapter made is what the LLM got
    layout = inputs.layout
    present = layout.table("llm").present
    assert torch.equal(layout.gather("adapter", adapter)[present], layout.gather("llm", merged)[present])


def test_mask_geometry_is_a_mask_geometry(eager: Family) -> None:
    """The family's mask geometry for its own processor keeps the `MaskGeometry` protocol, and a
    mask of an image's size goes through it to a 2-D label array."""
    geometry = eager.model.geometry
    assert isinstance(geometry, MaskGeometry), f"{type(geometry).__name__} is not a MaskGeometry"
    image = random_images(1)[0]
    height, width = geometry.image_size(image)
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2] = 1
    labels = geometry.transform_mask(mask)
    assert labels.ndim == 2 and set(np.unique(labels)) <= {0, 1, 255} and (labels == 1).any()


def test_layout_contract(eager: Family) -> None:
    """Every placeholder is one grid token or one special token (CLS, register, newline) of one
    image; each segment's boxes tile the image's canvas; special tokens are in no grid."""
    model, inputs = eager.model, eager.inputs
    layout = inputs.layout
    placeholders = inputs.input_ids.cpu() == model.cfg.image_token_id
    labelled = torch.zeros_like(placeholders, dtype=torch.long)
    for span in layout.spans:
        labelled[span.row, span.positions] += 1
        for positions in span.special.values():
            labelled[span.row, positions] += 1
        assert len(span.positions) == sum(len(s.tokens) for s in span.segments)
        assert len(span.prefix_positions) == model.architecture.llm_prefix_tokens(model.cfg)
        height, width = span.canvas
        for segment in span.segments:
            for grid in (segment.tokens, segment.patches):
                cover = torch.zeros(height, width, dtype=torch.long)
                for y0, x0, y1, x1 in grid.boxes.tolist():
                    cover[y0:y1, x0:x1] += 1
                assert (cover == 1).all(), f"the {segment.kind} segment's pixel boxes tile the image"
    # specials with their own token (Gemma 3's start/end of image, Idefics3's separators and tile
    # tags) are labelled once, never as a grid token, and outside the image's attention block
    assert (labelled[placeholders] == 1).all() and (labelled <= 1).all(), "every image placeholder belongs to exactly one image"
    markers = labelled.bool() & ~placeholders  # specials with their own token (Gemma 3's start/end of image)
    for span in layout.spans:
        for kind, positions in span.special.items():
            assert not markers[span.row, positions].any() or kind not in IMAGE_BLOCK_KINDS, f"{kind} must be a placeholder"
    grid_tokens = layout.image_token_mask()
    assert torch.equal(grid_tokens & ~placeholders, torch.zeros_like(placeholders)), "no text in a grid"
    for kind in {k for s in layout.spans for k in s.special}:
        assert not (layout.special_positions(kind) & grid_tokens).any(), f"{kind} tokens are in no grid"
    if layout.uniform:
        assert tuple(inputs.pixel_values.shape[-2:]) == layout.token_grid.image_size
    gathered = layout.gather("llm", inputs.input_ids[..., None])
    table = layout.table("llm")
    assert gathered.shape[:2] == table.present.shape == (layout.n_images, layout.n_rows("llm"))
    assert (gathered[table.present] == model.cfg.image_token_id).all() and (gathered[~table.present] == 0).all()


@torch.no_grad()
def test_knockout_equals_hf_with_its_mask(eager: Family) -> None:
    model, inputs = eager.model, eager.inputs
    corner = TokenGroup.box(0, 0, 2, 2)
    ko = knockout(model, inputs, queries=TokenGroup.image() - corner, keys=corner,
                  layers=range(model.cfg.n_layers), verify=True)
    with ko:
        ours = model(inputs)
    assert ko.n_blocked_edges > 0 and all(mass == 0.0 for mass in ko.blocked_mass.values())
    allowed = model.attention_edges(inputs) & ~ko.blocked.cpu()
    assert torch.equal(ko.effective_mask(), allowed.to(ko.blocked.device))
    rules = ("attention_mask", *model.architecture.llm_input_names)  # replaced by the 4D mask
    plain = {k: v for k, v in inputs.hf_kwargs().items() if k not in rules}
    # what the LLM reads off the 2-D mask, given explicitly (Qwen2-VL's M-RoPE positions)
    plain.update(model.architecture.llm_keywords(model.hf_model, inputs.hf_kwargs()))
    theirs = eager.reference(**plain, attention_mask=model.architecture.hf_attention_mask(allowed)).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(ours[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (ours - model(inputs))[valid].abs().max() > 1e-4, "the knockout changed something"


def test_wrong_spec_is_refused(builder: Callable[[], tuple[nn.Module, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A spec that ignores the rotary embedding leaves plain logits exact; loading must refuse it."""
    import mmlens.model.hooked_mllm as hooked

    hf_model, processor = builder()
    right = hooked.architecture_for(hf_model)

    class WithoutRotary(type(right)):
        llm_block = replace(right.llm_block, attention=AttentionSpec(rotary=False))

    monkeypatch.setattr(hooked, "architecture_for", lambda _model: WithoutRotary())
    with pytest.raises(UnsupportedModelError, match=r"blocks\.0 .*does not match its block spec"):
        HookedMLLM.from_hf(hf_model, processor)


@torch.no_grad()
def test_family_keywords_travel_everywhere(eager: Family) -> None:
    """Repeats, the LLM-only shortcut and generation carry the family's own keywords."""
    model, inputs = eager.model, eager.inputs
    logits = model(inputs)
    repeated = inputs.repeat(2)
    assert set(repeated.extra) == set(inputs.extra)
    torch.testing.assert_close(model(repeated), logits.repeat(2, 1, 1), atol=1e-5, rtol=0)
    _, cache = model.run_with_cache(inputs, names_filter="hook_multimodal_embed")
    shortcut = model(inputs, llm_inputs_embeds=cache["hook_multimodal_embed"])
    torch.testing.assert_close(shortcut, logits, atol=1e-5, rtol=0)
    ours = model.generate(inputs, max_new_tokens=3)
    theirs = eager.reference.generate(**inputs.hf_kwargs(), max_new_tokens=3, do_sample=False)
    assert ours == model.processor.batch_decode(theirs[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)


@torch.no_grad()
def test_llm_keywords_reach_every_run_from_merged_embeddings(eager: Family, monkeypatch: pytest.MonkeyPatch) -> None:
    """The family's LLM keywords (M-RoPE position ids for Qwen2-VL) go into every run that starts
    from the merged embeddings; these families need none, and a substitute that moves every token
    to position 0 changes the logits exactly as Hugging Face given the same positions."""
    model, inputs = eager.model, eager.inputs
    own = model.architecture.llm_keywords(model.hf_model, inputs.hf_kwargs())
    if type(model.architecture).llm_keywords is Architecture.llm_keywords:
        assert own == {}, "a family that does not override the hook adds nothing"
    zero = torch.zeros_like(own.get("position_ids", inputs.input_ids))  # M-RoPE ids are [3, batch, seq]
    _, cache = model.run_with_cache(inputs, names_filter=["hook_multimodal_embed", "blocks.1.hook_resid_pre"])
    embeds = cache["hook_multimodal_embed"]
    seen = []

    def at_zero(hf_model, keywords):
        seen.append(set(keywords))
        return {"position_ids": zero}

    monkeypatch.setattr(model.architecture, "llm_keywords", at_zero)
    moved = model(inputs, llm_inputs_embeds=embeds)
    rules = {k: inputs.extra[k] for k in model.architecture.llm_input_names}
    theirs = eager.reference(inputs_embeds=embeds, attention_mask=inputs.attention_mask, **rules,
                             position_ids=zero).logits
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(moved[valid], theirs[valid], atol=1e-5, rtol=0)
    assert (moved - model(inputs))[valid].abs().max() > 1e-4, "the positions were used"
    model(cache["blocks.1.hook_resid_pre"], start_at_layer=1, tokens=inputs)
    assert len(seen) == 2 and all({"input_ids", "attention_mask"} <= keys for keys in seen)
    assert set(inputs.extra) <= seen[0], "the hook sees the family's own keywords"


@torch.no_grad()
def test_bidirectional_edit_equals_the_bidirectional_mode(eager: Family) -> None:
    model, inputs = eager.model, eager.inputs
    with model.using_image_attention("bidirectional"):
        native = model(inputs)
    with model.using_image_attention("causal"):
        causal = model(inputs)
        with bidirectional_image_attention(model, inputs):
            edited = model(inputs)
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(edited[valid], native[valid], atol=1e-5, rtol=0)
    assert (edited - causal)[valid].abs().max() > 1e-4


def test_bridge_aliases_resolve_to_real_hook_points(eager: Family, request: pytest.FixtureRequest) -> None:
    """Every entry of the family's TransformerBridge alias table names hook points this model has,
    and each of the bridge's names for such a point resolves to it. Bridge names the family refuses
    on purpose are listed in its test module's `WITHHELD_BRIDGE_NAMES` and must be refused."""
    model = eager.model
    withheld = set(getattr(request.module, "WITHHELD_BRIDGE_NAMES", ()))
    refused = set()
    for alias in model.architecture.bridge_aliases:
        targets = [name for name in model.hook_names() if alias.ours.match(name) is not None]
        assert targets, f"{model.cfg.architecture}: the alias for {alias.ours.text} names no hook point of the model"
        for target in targets:
            for template in alias.bridge:
                bridge = template.fill(**alias.ours.match(target))
                if bridge in withheld:
                    with pytest.raises(HookNameError):
                        model.resolve_hook_name(bridge)
                    refused.add(bridge)
                else:
                    assert model.resolve_hook_name(bridge) == target, bridge
    assert refused == withheld


def every_analysis_runs(model: HookedMLLM, scenes, extra_sites: tuple[str, ...] = ()) -> Any:
    """Probe sweep, verified knockouts (LLM and vision), head sweep, anchor knockout, position
    study and recovery heads, end to end on a random-weight model (numbers are not the point).
    `extra_sites` joins the sweep (a second tower's points, probed on its own grid)."""
    n_layers = model.cfg.n_layers
    last = f"blocks.{n_layers - 1}.hook_resid_post"
    sites = ["vision.blocks.0.hook_resid_post", *extra_sites, "adapter.hook_out", "blocks.0.hook_resid_post", last]
    # a fixed penalty: on random weights a cross-validated one is the largest (the probe paints the majority
    # class), which leaves the anchor studies no confused pair to work on
    sweep = probe_sweep(model, scenes, sites=sites, probe="ridge", progress=False, alpha=1e-2,
                        control=["shuffled_labels", "control_task"])  # the label controls on every geometry
    assert np.isfinite(sweep.table.miou).all() and set(sweep.table.hook) >= set(sites)
    assert {"shuffled_labels", "control_task"} <= set(sweep.table.condition)

    inputs = model.prepare([scenes[i]["image"] for i in range(2)], "")
    for stage, layers in (("llm", range(n_layers)), ("vision", range(model.cfg.vision.n_layers))):
        ko = knockout(model, inputs, queries=TokenGroup.image(), keys=TokenGroup.box(0, 0, 1, 1),
                      layers=layers, stage=stage, verify=True)
        with ko:
            model(inputs)
        assert ko.n_blocked_edges > 0 and set(ko.blocked_mass) == set(layers)
        assert all(mass == 0.0 for mass in ko.blocked_mass.values())

    metric = CacheMetric(lambda acts, inp: acts[last][:, -1].norm(dim=-1), [last])
    effects = head_sweep(model, Run(inputs), recovery_blocked(model, inputs), metric)
    assert effects.shape == (n_layers, model.cfg.llm.n_heads, len(inputs)) and torch.isfinite(effects).all()
    # copies joining the batched forward at their own layer (the family's masks and positions cut
    # to the rows each block computes) = one forward per head
    one_at_a_time = head_sweep(model, Run(inputs), recovery_blocked(model, inputs), metric, chunk_size=1)
    torch.testing.assert_close(effects, one_at_a_time, atol=1e-5, rtol=1e-5)
    # and = a full forward patched by hand, though copies skip the attention of the layer they
    # patch (they join there at hook_z)
    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    _, clean = model.run_with_cache(inputs, names_filter=names)
    blocked = recovery_blocked(model, inputs).edit(inputs)
    for layer in range(n_layers):
        head = layer % model.cfg.llm.n_heads

        def put_head(z, hook, head=head):
            z = z.clone()
            z[:, :, head] = clean[hook.name][:, :, head]
            return z

        read: dict[str, torch.Tensor] = {}
        model.run_with_hooks(inputs, fwd_hooks=[*blocked.hooks, (names[layer], put_head),
                                                (last, lambda x, hook: read.__setitem__(last, x))])
        torch.testing.assert_close(effects[layer, head], metric(read, inputs), atol=1e-5, rtol=1e-5)

    # every scene (training ones too: the plumbing is the point): a random-weight probe gets few object tokens right
    pairs = conflicting_pairs(sweep, "adapter.hook_out", 4)  # given: the scored images include the training ones
    result = anchor_knockout(model, sweep, n_control=1, images=range(len(scenes)), pairs=pairs)
    assert result.blocked_mass == 0.0 and len(result.table)
    study = position_study(model, scenes, probe="ridge", sites=[last], exclude=[])  # background scored too: 6 images
    assert len(study.per_position) and set(study.gains.tokens) == {"early", "late"}
    heads = find_recovery_heads(model, sweep, corruption="counterfactual", n_images=None, tokens="all", n_maps=1, top_k=2)
    assert len(heads.table) == n_layers * model.cfg.llm.n_heads and len(heads.maps) == 1
    picture = heads.maps[0].image  # the image as the model saw it
    assert picture.ndim == 3 and picture.shape[-1] == 3 and min(picture.shape[:2]) >= min(heads.maps[0].grid)
    return heads


@torch.no_grad()
def test_sae_with_error_term_keeps_logits(eager: Family) -> None:
    """Random SAEs spliced at an LLM residual point and a vision block (mmlens.sae) with the error
    term: the logits are unchanged and the features are cached under the points' names."""
    model, inputs = eager.model, eager.inputs
    vision = [name for name in model.hook_names("vision") if name.endswith("hook_resid_post")][:1]
    widths = {"blocks.0.hook_resid_post": model.cfg.d_model, **{name: model.cfg.vision.d_model for name in vision}}
    torch.manual_seed(0)
    saes = [SAE(SAEConfig("standard", width, 2 * width, metadata={"hook_name": name})) for name, width in widths.items()]
    clean = model(inputs)
    features = [f"{name}.hook_sae_acts_post" for name in widths]
    spliced, cache = model.run_with_cache_with_saes(inputs, saes=saes, use_error_term=True, names_filter=features)
    valid = inputs.attention_mask.bool()
    torch.testing.assert_close(spliced[valid], clean[valid], atol=1e-5, rtol=0)
    assert set(cache.keys()) == set(features) and all(cache[name].abs().sum() > 0 for name in features)
    assert model.acts_to_saes == {}
