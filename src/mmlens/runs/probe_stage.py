"""Stage 1, the probe sweep, and how a `ProbeSweep` is written to and rebuilt from a run folder.

Later stages need the sweep itself (probes, held-out images, confusion, predictions), not only
its table. Everything a `ProbeSweep` holds is saved exactly (tensors in safetensors, tables in
parquet, settings and site list in JSON) except the dataset, which is regenerated from the
config: the same loader with the same settings gives the same rows. A resumed run therefore
feeds the later stages the very probes the first run fitted, bit for bit.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from ..model.layout import TokenGrid
from ..probing import ProbeSweep, SegmentationScores, Site, SweepSettings, probe_sweep
from ..probing.linear import LinearProbe
from .outputs import StageFigure, StageOutput, StoredOutput
from .stages import StageContext, register_stage

PROBE_FIELDS = ("mean", "scale", "weight", "bias")
CURVE_HOW_TO_READ = (
    "Each point is a linear probe trained to predict every image token's class from the activation at "
    "one site, scored as mIoU on held-out images after painting each token's prediction over its pixels. "
    "Sites run left to right through the pipeline: vision encoder (blue band), adapter (red), LLM (green). "
    "The study's finding is a drop inside the adapter and a recovery across LLM layers. Shaded bands are "
    "95% bootstrap intervals over test images. The controls (dashed: random-weight model; dotted: "
    "shuffled training labels) show how much a probe gets without learned features or without real "
    "labels; only the gap above them is information the model carries."
)
PREDICTIONS_HOW_TO_READ = (
    "One held-out image, its ground-truth segmentation and the probes' predicted segmentation at a few "
    "sites (each token's predicted class painted over its pixel box; colours are classes). Compare the "
    "adapter's input and output to see what the adapter blurs, and the last LLM layer to see what the "
    "LLM restores."
)


def _key(condition: str, hook: str, part: str = "") -> str:
    return f"{condition}|{hook}" + (f"|{part}" if part else "")


def sweep_output(sweep: ProbeSweep) -> StageOutput:
    """Tables, tensors, settings and figures of a sweep, ready for the run folder."""
    from ..viz import plot_probe_curve, plot_probe_predictions

    probes, predictions, scores = {}, {}, {}
    for (condition, hook), probe in sweep.probes.items():
        for part in PROBE_FIELDS:
            probes[_key(condition, hook, part)] = getattr(probe, part)
        predictions[_key(condition, hook)] = sweep.predictions[(condition, hook)]
        score = sweep.scores[(condition, hook)]
        scores[_key(condition, hook, "per_image")] = torch.from_numpy(np.stack(score.per_image))
        scores[_key(condition, hook, "confusion")] = torch.from_numpy(np.asarray(sweep.confusion[(condition, hook)]))
        scores[_key(condition, hook, "tokens")] = torch.tensor([score.tokens_correct, score.tokens_valid])
    split = {
        "train_indices": torch.from_numpy(np.asarray(sweep.train_indices, dtype=np.int64)),
        "test_indices": torch.from_numpy(np.asarray(sweep.test_indices, dtype=np.int64)),
        "test_masks": torch.from_numpy(np.ascontiguousarray(sweep.test_masks)),
        "bootstrap": torch.from_numpy(np.asarray(sweep.bootstrap, dtype=np.int64)),
    }
    description = {
        "settings": dataclasses.asdict(sweep.settings),
        "sites": [dataclasses.asdict(s) for s in sweep.sites],
        "class_names": list(sweep.class_names),
        "ignore_index": sweep.ignore_index,
        "grids": {name: [g.rows, g.cols, *g.image_size] for name, g in sweep.grids.items()},
        "probe_kinds": {_key(c, h): p.kind for (c, h), p in sweep.probes.items()},
    }
    tables = {"probe_table": sweep.table, "per_class_iou": sweep.per_class_iou.reset_index()}
    summary_lines = []
    try:
        summary = sweep.summary()
    except ValueError:  # the sweep lacks the adapter or LLM sites the summary compares
        summary = None
    if summary is not None:
        tables["summary"] = summary.reset_index()
        s = summary["value"]
        summary_lines = [
            f"mIoU {s['adapter_in_miou']:.3f} at the adapter input, {s['adapter_out_miou']:.3f} at its output "
            f"(drop {s['drop_at_adapter']:.3f} [{summary.loc['drop_at_adapter', 'low']:.3f}, "
            f"{summary.loc['drop_at_adapter', 'high']:.3f}])",
            f"LLM peak {s['peak_llm_miou']:.3f} at layer {int(s['peak_llm_layer'])}: recovers "
            f"{s['recovery_in_llm']:.3f} [{summary.loc['recovery_in_llm', 'low']:.3f}, "
            f"{summary.loc['recovery_in_llm', 'high']:.3f}]",
        ]
    else:
        best = sweep.table[sweep.table.condition == "model"].sort_values("miou").iloc[-1]
        summary_lines = [f"best site {best.hook}: mIoU {best.miou:.3f}"]
    figures = {
        "probe_curve": StageFigure(plot_probe_curve(sweep), CURVE_HOW_TO_READ, title="Drop-off and recovery of "
                                   "segmentation along the pipeline", table="summary" if summary is not None else None),
        "probe_predictions": StageFigure(plot_probe_predictions(sweep, example=0), PREDICTIONS_HOW_TO_READ,
                                         title="What the probes see on one held-out image"),
    }
    return StageOutput(tables=tables, figures=figures, data={"sweep": description},
                       tensors={"probes": probes, "predictions": predictions, "scores": scores, "split": split},
                       summary=summary_lines, result=sweep)


def sweep_from_stored(stored: StoredOutput, dataset, device: torch.device | str = "cpu") -> ProbeSweep:
    """The `ProbeSweep` a finished probe stage saved; `dataset` is regenerated by the caller."""
    description = stored.data["sweep"]
    probes_t, scores_t, split = stored.tensors["probes"], stored.tensors["scores"], stored.tensors["split"]
    class_names = tuple(description["class_names"])
    ignore_index = description["ignore_index"]
    keys = [tuple(k.split("|")) for k in description["probe_kinds"]]
    probes, predictions, scores, confusion = {}, {}, {}, {}
    for condition, hook in keys:
        parts = [probes_t[_key(condition, hook, p)] for p in PROBE_FIELDS]
        probes[(condition, hook)] = LinearProbe(*parts, kind=description["probe_kinds"][_key(condition, hook)]).to(device)
        predictions[(condition, hook)] = stored.tensors["predictions"][_key(condition, hook)]
        matrix = scores_t[_key(condition, hook, "confusion")].numpy()
        correct, valid = scores_t[_key(condition, hook, "tokens")].tolist()
        scores[(condition, hook)] = SegmentationScores(
            len(class_names), ignore_index, per_image=list(scores_t[_key(condition, hook, "per_image")].numpy()),
            confusion=matrix.copy(), tokens_correct=correct, tokens_valid=valid)
        confusion[(condition, hook)] = matrix
    per_class = stored.tables["per_class_iou"].set_index(["condition", "hook"])
    return ProbeSweep(
        table=stored.tables["probe_table"],
        per_class_iou=per_class,
        confusion=confusion,
        probes=probes,
        predictions=predictions,
        sites=[Site(**s) for s in description["sites"]],
        class_names=class_names,
        ignore_index=ignore_index,
        grids={name: TokenGrid(rows, cols, (h, w)) for name, (rows, cols, h, w) in description["grids"].items()},
        test_indices=split["test_indices"].numpy(),
        train_indices=split["train_indices"].numpy(),
        test_masks=split["test_masks"].numpy(),
        settings=SweepSettings(**description["settings"]),
        dataset=dataset,
        bootstrap=split["bootstrap"].numpy(),
        scores=scores,
    )


def _restore(context: StageContext, stored: StoredOutput) -> ProbeSweep:
    return sweep_from_stored(stored, context.dataset, context.model.cfg.device)


@register_stage("probe_sweep", title="Probe sweep", restore=_restore, sections=("probe",))
def probe_sweep_stage(context: StageContext) -> StageOutput:
    """Layer-wise probes over vision encoder, adapter and LLM, with the configured controls."""
    config, probe = context.config, context.config.probe
    with torch.no_grad():
        sweep = probe_sweep(
            context.model, context.dataset, sites=probe.sites, probe=probe.kind, control=probe.controls,
            progress=context.progress, test_fraction=probe.test_fraction, seed=context.seed,
            batch_size=config.batch_size, prompt=config.prompt, alpha=probe.alpha, l2=probe.l2,
            max_iter=probe.max_iter, min_valid_fraction=probe.min_valid_fraction,
            max_train_tokens_per_image=probe.max_train_tokens_per_image, n_boot=config.n_boot,
            stats_device=probe.stats_device,
        )
    return sweep_output(sweep)


__all__ = ["probe_sweep_stage", "sweep_from_stored", "sweep_output"]
