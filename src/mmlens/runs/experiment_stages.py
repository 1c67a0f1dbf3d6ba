"""Stages 2 to 4: the anchor knockout and recovery heads (on the probe sweep's probes) and the
position study.

Each is one registered function: it calls the experiment in `mmlens.experiments` with the
config's settings and this unit's seed, and returns its tables, figures and headline numbers.
All three are distributed: under torchrun every rank runs its share of the image batches and
the per-image results go to rank 0 in batch order; rank 0 makes the tables and writes them, the
other ranks return an empty output.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch

from ..experiments import anchor_knockout, position_study
from .outputs import StageFigure, StageOutput
from .probe_stage import probe_settings, store_location
from .stages import StageContext, register_stage

KNOCKOUT_HOW_TO_READ = (
    "Tokens of the most confused class pairs that the reference probe already classifies correctly are the "
    "anchors. Solid red: attention from the anchors to every other image token is blocked in the LLM layers "
    "after the reference; blue: no edit; dashed grey: the same number of random tokens of the same classes "
    "blocked instead (the control). Each curve is the accuracy of the sweep's own probes on the remaining "
    "tokens of those classes at every later layer. If recovery is steered by the anchors, red falls below "
    "grey as depth grows; bands are 95% bootstrap intervals over images."
)
POSITION_HEATMAP_HOW_TO_READ = (
    "Probe accuracy of every image token over the image grid, per LLM site (columns) and attention mode "
    "(rows). Raster order starts at the top left: under causal attention those tokens see the fewest other "
    "image tokens, so a darker top-left corner in the causal row that lightens in the bidirectional row is "
    "the study's position effect. Background tokens are left out."
)
POSITION_CURVE_HOW_TO_READ = (
    "Accuracy per grid row in raster order at the last LLM site, for causal attention, bidirectional image "
    "attention (probes refitted) and causal probes read on the bidirectional run. A curve rising from left "
    "to right means early tokens are starved of context; bidirectional attention should flatten it. Bands "
    "are 95% bootstrap intervals over held-out images."
)


@register_stage("anchor_knockout", title="Anchor knockout", depends_on=("probe_sweep",),
                enabled=lambda config: config.knockout.enabled, sections=("knockout",), distributed=True)
def anchor_knockout_stage(context: StageContext) -> StageOutput:
    config, settings = context.config, context.config.knockout
    sweep = context.result("probe_sweep")
    with torch.no_grad():
        result = anchor_knockout(context.model, sweep, reference=settings.reference, layers=settings.layers,
                                 n_pairs=settings.n_pairs, n_control=settings.n_control, batch_size=config.batch_size,
                                 n_boot=config.n_boot, seed=context.seed, progress=context.progress)
    if result is None:  # a rank other than 0: rank 0 received its share
        return StageOutput()
    effects = result.effects
    summary = result.findings()
    figure = StageFigure(result.figure("target_accuracy"), KNOCKOUT_HOW_TO_READ,
                         title="Anchor knockout: are anchors steering recovery?", table="effects",
                         notes=f"Layers edited: {result.layers}. Largest attention left on a blocked edge: "
                               f"{result.blocked_mass}.")
    return StageOutput(
        tables={"pairs": result.pairs, "table": result.table,
                "effects": effects[effects.metric == "target_accuracy"].reset_index(drop=True),
                "all_effects": effects},
        figures={"anchor_knockout": figure},
        data={"knockout": {"reference": result.reference, "layers": result.layers,
                           "readouts": [s.hook for s in result.readouts], "anchors_per_image": result.anchors_per_image,
                           "targets_per_image": result.targets_per_image, "blocked_mass": result.blocked_mass,
                           "settings": result.settings}},
        summary=summary,
        result=result,
    )


@register_stage("position_study", title="Position study", enabled=lambda config: config.position.enabled,
                sections=("position", "probe"), distributed=True)
def position_study_stage(context: StageContext) -> StageOutput:
    config, settings, probe = context.config, context.config.position, context.config.probe
    with torch.no_grad():
        study = position_study(
            context.model, context.dataset, layers=settings.layers, probe=probe.kind,
            early_fraction=settings.early_fraction, exclude=settings.exclude, n_boot=config.n_boot, seed=context.seed,
            progress=context.progress, **probe_settings(config), store_dir=store_location(context),
        )
    if study is None:  # a rank other than 0: rank 0 received its share
        return StageOutput()
    summary_table = study.summary
    lines = study.findings()
    figures = study.figures()
    return StageOutput(
        tables={"summary": summary_table, "gains": study.gains, "per_position": study.per_position,
                "position_curve": study.position_curves()},
        figures={
            "position_heatmap": StageFigure(figures["position_heatmap"], POSITION_HEATMAP_HOW_TO_READ,
                                            title="Position study: accuracy over the image grid", table="summary"),
            "position_curve": StageFigure(figures["position_curve"], POSITION_CURVE_HOW_TO_READ,
                                          title="Position study: accuracy along raster order", table="gains"),
        },
        data={"position": {"grid": list(study.grid), "settings": study.settings}},
        summary=lines,
        result=study,
    )


RECOVERY_HEATMAP_HOW_TO_READ = (
    "Every LLM attention head (layer down, head across), coloured by how much of the probe's true-class "
    "margin at the readout layer it restores when its clean output is patched into a run where recovery "
    "was broken (the corruption named in the title). Bright cells are recovery heads. The right panel "
    "estimates the same effects in one backward pass (attribution patching); the Spearman correlation in "
    "the title says how far that cheap estimate can be trusted."
)
RECOVERY_MAP_HOW_TO_READ = (
    "Where the top recovery heads of each layer look on one image: attention from the tokens the adapter "
    "probe gets wrong and the readout probe gets right (crosses) to every image token, over the picture; "
    "circles mark the anchors. Attention gathered on anchors of the same class supports the study's "
    "account of recovery as cross-token refinement steered by anchors."
)


@register_stage("recovery_heads", title="Recovery heads", depends_on=("probe_sweep",),
                enabled=lambda config: config.recovery.enabled, sections=("recovery",), distributed=True)
def recovery_heads_stage(context: StageContext) -> StageOutput:
    try:
        from ..experiments.recovery_heads import find_recovery_heads
    except ImportError as error:
        raise RuntimeError(f"the recovery heads stage needs mmlens.experiments.recovery_heads ({error}); "
                           "set recovery.enabled: false to run the other stages") from error
    config, settings = context.config, context.config.recovery
    result = find_recovery_heads(
        context.model, context.result("probe_sweep"), corruption=settings.corruption, readout=settings.readout,
        reference=settings.reference, window=settings.window, tokens=settings.tokens, hook=settings.hook,
        n_images=settings.n_images, top_k=settings.top_k, attribution=settings.attribution, n_maps=settings.n_maps,
        n_boot=config.n_boot, batch_size=config.batch_size, chunk_size=settings.chunk_size, seed=context.seed,
        progress=context.progress,
    )
    s = result.summary
    lines = result.findings()
    figures = {}
    for name, figure in result.figures().items():
        if name == "head_heatmap":
            figures[name] = StageFigure(figure, RECOVERY_HEATMAP_HOW_TO_READ, title="Recovery heads: effect of "
                                        "patching each head", table="top_k")
        else:
            shown = result.maps[int(name.rsplit("_", 1)[-1])]
            figures[name] = StageFigure(figure, RECOVERY_MAP_HOW_TO_READ,
                                        title=f"Attention recovery map, dataset image {shown.dataset_index}")
    return StageOutput(
        tables={"heads": result.table, "top_k": result.top_k,
                "summary": pd.DataFrame([{"statistic": k, "value": float(v)} for k, v in s.items()])},
        figures=figures,
        data={"recovery": {"settings": result.settings, "layers": result.layers,
                           "top_heads": [[int(l), int(h)] for l, h in result.top_heads]}},
        summary=lines,
        result=result,
    )


TUNED_LENS_TEST_FRACTION = 0.25  # the SAE study's and probe sweep's default held-out share
LENS_HOW_TO_READ = (
    "The logit lens at every LLM layer over one image: each panel is the residual stream entering a layer (the last "
    "one leaving the final layer) at every image token, read through the final norm and the unembedding; each "
    "token's pixel box is coloured by the probability of its top token, and hovering shows that token. Where the "
    "top tokens turn into words for what the cell shows (a shape's name or colour), the LLM has made the image "
    "token legible to its vocabulary at that depth. A tuned lens (`lens.tuned`) first passes each layer's residual "
    "through an affine translator trained on other images to match the model's final prediction (Belrose et al. "
    "2023), so its panels show what a layer already encodes even where the raw residual is not yet in the final "
    "layer's basis."
)


@register_stage("sae_features", title="SAE features", enabled=lambda config: config.sae.enabled, sections=("sae",))
def sae_features_stage(context: StageContext) -> StageOutput:
    """An SAE at `sae.hook` (trained on the training images, or loaded from `sae.path`) studied on the
    held-out images (`mmlens.sae.sae_study`), and the report's feature page of its best-aligned features."""
    from ..sae import load_sae, sae_study
    from ..sae.feature_page import feature_cards
    from ..viz.report_features import FEATURE_PAGE_HOW_TO_READ, card_title, feature_page_table, plot_feature_card

    from ..errors import HookNameError
    from .config import sae_files_sha256

    config, settings, model = context.config, context.config.sae, context.model
    if settings.path is None:
        given, training = None, dict(architecture=settings.architecture, d_sae=settings.d_sae, k=settings.k,
                                     steps=settings.steps, lr=settings.lr, device=str(model.cfg.device))
    else:  # checked before the first stage (config_checks): it loads, reads sae.hook, at the site's width
        given, training = load_sae(Path(settings.path).expanduser(), device=model.cfg.device), {}
        try:
            own = given.cfg.hook_name and model.resolve_hook_name(given.cfg.hook_name)
        except HookNameError:  # another library's name for the point: the config's sae.hook says which
            own = None
        if not own:
            given.cfg.metadata["hook_name"] = settings.hook
    study = sae_study(model, context.dataset, settings.hook, sae=given, seed=context.seed,
                      n_boot=config.n_boot, batch_size=config.batch_size, prompt=config.prompt, **training)
    cards = feature_cards(context.model, study, context.dataset, n_features=settings.n_features,
                          n_images=settings.n_images, n_crops=settings.n_crops, prompt=config.prompt,
                          batch_size=config.batch_size)
    figures = {f"feature_{card.feature}": StageFigure(plot_feature_card(card), FEATURE_PAGE_HOW_TO_READ,
                                                      title=card_title(card), table="feature_page" if n == 0 else None)
               for n, card in enumerate(cards)}
    sae = study.sae
    return StageOutput(
        tables={"feature_page": feature_page_table(cards), "alignment": study.alignment, "ablation": study.ablation,
                "reconstruction": study.reconstruction},
        figures=figures,
        tensors={"sae": {name: tensor.detach().cpu().contiguous() for name, tensor in sae.state_dict().items()}},
        data={"sae": {"cfg": sae.cfg.to_sae_lens_dict(), "source": settings.path or "trained",
                      "sha256": None if settings.path is None else sae_files_sha256(settings.path),
                      "train_rows": [int(r) for r in study.train_rows], "test_rows": [int(r) for r in study.test_rows]}},
        summary=study.findings,
        result=study,
    )


@register_stage("logit_lens", title="Logit lens over the image", enabled=lambda config: config.lens.enabled,
                sections=("lens",))
def logit_lens_stage(context: StageContext) -> StageOutput:
    """The logit lens at every LLM layer over the first `lens.n_images` images, one figure each; with
    `lens.tuned`, a tuned lens trained on the study's other training images drawn beside it."""
    from ..probing.split import split_images
    from ..sae import canvas_picture, logit_lens_maps
    from ..sae.tuned_lens import train_tuned_lens

    config, model = context.config, context.model
    rows = list(range(min(config.lens.n_images, len(context.dataset))))
    images = [context.dataset[row]["image"] for row in rows]
    inputs = model.prepare(images, [config.prompt] * len(images))
    lenses = {"logit_lens": logit_lens_maps(model, inputs)}
    tensors, data = {}, {"lens": {"labels": lenses["logit_lens"].labels, "rows": rows}}
    if config.lens.tuned:  # the seeded split by image the probe sweep and SAE study use, less the drawn images
        train_rows = [int(row) for row in split_images(len(context.dataset), TUNED_LENS_TEST_FRACTION, context.seed)[0]
                      if row not in rows]
        tuned = train_tuned_lens(model, [context.dataset[row]["image"] for row in train_rows], prompt=config.prompt,
                                 image_batch_size=config.batch_size, seed=context.seed)
        lenses["tuned_lens"] = logit_lens_maps(model, inputs, lens=tuned)
        tensors["tuned_lens"] = {name: t.detach().cpu().contiguous() for name, t in tuned.state_dict().items()}
        data["tuned_lens"] = {**tuned.config(), "train_rows": train_rows}
    figures, tables = {}, []
    for kind, lens in lenses.items():
        name = lens.lens.capitalize()
        figures |= {f"{kind}_{row}": StageFigure(lens.figure(n, tokenizer=model.tokenizer,
                                                             picture=canvas_picture(model, images[n])),
                                                 LENS_HOW_TO_READ, title=f"{name} over dataset image {row}")
                    for n, row in enumerate(rows)}
        present = lens.table.present.float()  # images with fewer tokens are padded
        top = (lens.top_probability * present).sum(-1) / present.sum(-1)  # [entries, images]: mean over its tokens
        tables += [{"lens": lens.lens, "entry": label, "image": row, "mean_top_probability": float(top[e, n])}
                   for e, label in enumerate(lens.labels) for n, row in enumerate(rows)]
        tensors["lens" if kind == "logit_lens" else "tuned_lens_maps"] = {
            "top_token": lens.top_token, "top_probability": lens.top_probability}
    return StageOutput(tables={"lens": pd.DataFrame(tables)}, figures=figures, tensors=tensors, data=data,
                       result=lenses["logit_lens"])
