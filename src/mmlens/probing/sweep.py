"""The layer-wise probing sweep over vision encoder -> adapter -> LLM.

One forward pass per image serves every site: hooks gather the image tokens as they pass and
either add them to ridge sufficient statistics or append them to a disk store (logistic).
Probes are fitted on training images, then applied inside the hooks on held-out images, whose
token predictions are scored at the pixel level. The split is by image and seeded; controls run
the same sweep with shuffled training labels (selectivity) or on a randomly initialised copy.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from .. import distributed
from ..data.schema import segmentation_info
from ..errors import InputError
from ..model import HookedMLLM, TokenGrid
from ..model.edits import Edit, edit_hooks
from .batches import pad_stack, rank_batches
from .linear import LinearProbe
from .logistic import DEFAULT_MEMORY_MB, fit_logistic_many
from .metrics import SegmentationScores, bootstrap_indices
from .ridge import RidgeStatistics
from .sites import Site, default_sites, gather_image_tokens
from .split import split_images
from .store import ActivationStore

ProbeKind = Literal["ridge", "logistic"]
Control = Literal["random_init", "shuffled_labels"]
CONTROLS = ("random_init", "shuffled_labels")


@dataclass
class SweepSettings:
    probe: ProbeKind = "logistic"
    test_fraction: float = 0.25
    seed: int = 0
    batch_size: int = 16
    prompt: str = ""
    alpha: float = 1e-2  # ridge penalty on standardised features, relative to n
    l2: float = 1e-3  # logistic penalty
    max_iter: int = 100
    min_valid_fraction: float = 0.5
    max_train_tokens_per_image: int | None = None  # logistic store subsample (bounds the store's disk)
    logistic_memory_mb: float = DEFAULT_MEMORY_MB  # features held at once while fitting a logistic probe
    n_boot: int = 200
    store_dir: str | None = None
    stats_device: str | None = None  # where ridge statistics live; default: the activations' device


@dataclass
class ProbeSweep:
    """Everything a probe sweep measured, and what is needed to re-plot or reuse it."""

    table: pd.DataFrame  # one row per (condition, site)
    per_class_iou: pd.DataFrame  # rows (condition, hook), columns class names
    confusion: dict[tuple[str, str], np.ndarray]  # (condition, hook) -> [true, predicted] pixels
    probes: dict[tuple[str, str], LinearProbe]
    predictions: dict[tuple[str, str], Tensor]  # (condition, hook) -> [n_test, n_tokens]
    sites: list[Site]
    class_names: tuple[str, ...]
    ignore_index: int
    # "vision" (patches) and "llm" (image tokens): the grid every image shares, or for images with their
    # own segments, per held-out image the prediction painting each pixel ([n_test, h, w], -1: none)
    grids: dict[str, TokenGrid | Tensor]
    test_indices: np.ndarray  # dataset rows of the held-out images
    train_indices: np.ndarray
    test_masks: np.ndarray  # [n_test, h, w] in the layout's canvas pixels (padded with ignore to the largest)
    settings: SweepSettings
    dataset: Any = field(repr=False, default=None)
    bootstrap: np.ndarray = field(repr=False, default=None)  # [n_boot, n_test] image resamples
    scores: dict[tuple[str, str], SegmentationScores] = field(repr=False, default_factory=dict)

    def probe(self, hook: str, condition: str = "model") -> LinearProbe:
        return self.probes[(condition, hook)]

    def summary(self, condition: str = "model") -> pd.DataFrame:
        """Drop at the adapter, recovery in the LLM, peak layer and fraction recovered, with
        bootstrap intervals over test images (paired: the same resamples for every site)."""
        from .summary import sweep_summary

        return sweep_summary(self, condition)

    def findings(self, condition: str = "model") -> list[str]:
        """The summary in sentences, each only as strong as its interval allows."""
        from .summary import summary_findings

        return summary_findings(self.summary(condition))

    def _repr_html_(self) -> str:
        from ..display import result_html

        try:
            findings, summary = self.findings(), {"summary": self.summary()}
        except ValueError:  # no adapter or LLM site to compare
            findings, summary = [], {}
        columns = ["condition", "site", "miou", "miou_low", "miou_high", "token_accuracy"]
        return result_html(f"ProbeSweep: {len(self.sites)} sites, {len(self.test_indices)} held-out images",
                           findings, {**summary, "probe table": self.table[columns]},
                           hint="mmlens.viz.plot_probe_curve(sweep) draws the curve; mmlens.probing.save_sweep(sweep, folder) keeps it.")


def probe_sweep(
    model: HookedMLLM,
    dataset,
    sites: str | list[str] = "all",
    probe: ProbeKind = "logistic",
    *,
    control: Control | Iterable[Control] | None = None,
    intervention: Edit | None = None,
    progress: bool = True,
    group: Any = None,
    **settings: Any,
) -> ProbeSweep:
    """Probe every site for each image token's class and score it at the pixel level.

    `dataset` is a segmentation dataset in mmlens's schema (`mmlens.data.load_segmentation`).
    `control` adds "shuffled_labels" (same features, labels permuted among each batch's training
    tokens) and/or "random_init" (the same sweep on a randomly initialised copy of the model).
    `intervention(inputs)` returns forward hooks (a list of (name, hook) or an object with a
    `hooks` list, such as `knockout(...)` or `bidirectional_image_attention(...)`) that run in
    every forward of the sweep, training and test images alike: probes then describe the edited
    model. Other keywords are `SweepSettings` fields.

    Under torch.distributed (torchrun, or `group`, a process group), each rank runs its share of
    the image batches; ridge statistics and logistic gradients are summed over ranks and the
    held-out scores gathered in batch order, so every rank returns the sweep one process would
    (per-image results exactly, fitted probes up to float rounding of the sums).
    """
    cfg = SweepSettings(probe=probe, **settings)
    if cfg.probe not in ("ridge", "logistic"):
        raise ValueError(f"probe must be 'ridge' or 'logistic', got {cfg.probe!r}")
    controls = [control] if isinstance(control, str) else list(control or [])
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise ValueError(f"unknown control(s) {sorted(unknown)}; choose from {CONTROLS}")
    if intervention is not None and "random_init" in controls:
        raise ValueError(
            "the random_init control cannot take the intervention: an edit is built for the trained model "
            "(its token groups and probes). Run the random-init control without intervention= in a separate sweep"
        )
    info = segmentation_info(dataset)
    n_classes = len(info.class_names)
    resolved = default_sites(model, sites)
    if not resolved:
        raise InputError("sites is empty: pass 'all', a stage ('vision', 'adapter', 'llm') or a list of hook names")
    train_idx, test_idx = split_images(len(dataset), cfg.test_fraction, cfg.seed)
    runs = [("model", ["model"] + (["shuffled_labels"] if "shuffled_labels" in controls else []))]
    if "random_init" in controls:
        runs.append(("random_init", ["random_init"]))
    results: dict[tuple[str, str], tuple[LinearProbe, SegmentationScores, Tensor]] = {}
    for which, conditions in runs:
        run_model = model if which == "model" else randomly_initialised(model, cfg.seed)
        runner = _SweepRun(run_model, dataset, resolved, cfg, n_classes, info.ignore_index, conditions, progress,
                           intervention if which == "model" else None, group)
        found, test_masks, grids = runner.run(train_idx, test_idx)
        results.update(found)
    return _assemble(results, resolved, info, cfg, train_idx, test_idx, test_masks, grids, dataset)


def randomly_initialised(model: HookedMLLM, seed: int) -> HookedMLLM:
    """The same architecture with fresh random weights (HF's own initialisation), seeded."""
    torch.manual_seed(seed)
    hf = type(model.hf_model)(copy.deepcopy(model.hf_model.config)).to(model.cfg.device, model.cfg.dtype).eval()
    return HookedMLLM.from_hf(hf, model.processor)


class _SweepRun:
    """One model's pass: train images -> fit probes -> test images -> scores."""

    def __init__(self, model, dataset, sites, cfg, n_classes, ignore_index, conditions, progress, intervention=None,
                 group=None):
        self.model, self.dataset, self.sites, self.cfg, self.group = model, dataset, sites, cfg, group
        self.intervention = intervention
        self.n_classes, self.ignore_index, self.conditions = n_classes, ignore_index, conditions
        self.progress = progress

    def _batches(self, indices: np.ndarray, desc: str, every_rank: bool = False):
        """This rank's batches (all of them in one process), each with its number in the
        single-process order: batch b goes to rank b mod world size, with the same images.
        `every_rank`: each rank must get one (training: every rank holds every site's sums)."""
        cfg = self.cfg
        if every_rank and len(indices) and len(indices) <= cfg.batch_size * (distributed.world_size(self.group) - 1):
            raise InputError(f"{len(indices)} training images make fewer batches of {cfg.batch_size} than there are ranks "
                             f"({distributed.world_size(self.group)}); lower batch_size or use fewer processes")
        for number, batch in rank_batches(self.model, self.dataset, indices, batch_size=cfg.batch_size, group=self.group,
                                          prompt=cfg.prompt, min_valid_fraction=cfg.min_valid_fraction,
                                          progress=self.progress, desc=desc):
            yield number, batch.inputs, batch.masks, batch.labels

    def _label_sets(self, labels, rng) -> dict[str, list[Tensor]]:
        """Per grid: the true labels of valid tokens, and a within-batch permutation of them."""
        out = {}
        for grid, lab in labels.items():
            y = lab.labels[lab.valid]
            sets = [y]
            if "shuffled_labels" in self.conditions:
                sets.append(y[torch.from_numpy(rng.permutation(len(y)))])
            out[grid] = sets
        return out

    def _keep(self, valid: Tensor, rng) -> Tensor:
        """Which valid training tokens go to the logistic store (optional per-image subsample)."""
        cap = self.cfg.max_train_tokens_per_image
        if cap is None or self.cfg.probe == "ridge":
            return torch.ones(int(valid.sum()), dtype=torch.bool)
        keep = []
        for row in valid:
            n = int(row.sum())
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[torch.from_numpy(rng.permutation(n)[:cap])] = True
            keep.append(chosen)
        return torch.cat(keep)

    @torch.no_grad()
    def run(self, train_idx, test_idx):
        cfg, model = self.cfg, self.model
        n_sets = len(self.conditions)
        accumulators: dict[str, RidgeStatistics | ActivationStore] = {}
        # several ranks on one machine share store_dir: each writes its own files
        suffix = f".rank{distributed.rank(self.group)}" if distributed.active(self.group) else ""

        def train_hook(site: Site, labels, label_sets, keep):
            def hook(activation, hook):
                x = gather_image_tokens(site, activation, inputs.layout)
                valid = labels[site.grid].valid.to(x.device)
                rows = _finite(x[valid], site, "training")
                acc = accumulators.get(site.hook)
                if acc is None:
                    acc = accumulators[site.hook] = (
                        RidgeStatistics(x.shape[-1], self.n_classes, n_sets, device=cfg.stats_device or x.device)
                        if cfg.probe == "ridge"
                        else ActivationStore(x.shape[-1], n_sets, cfg.store_dir, name=site.hook + suffix)
                    )
                if cfg.probe == "ridge":
                    acc.update(rows, *label_sets[site.grid])
                else:
                    k = keep[site.grid].to(x.device)
                    acc.append(rows[k], *(y[k.cpu()] for y in label_sets[site.grid]))
            return hook

        for number, inputs, _, labels in self._batches(train_idx, "probe sweep: train images", every_rank=True):
            # one generator per batch, from its number: the same draws whichever rank runs it
            rng = np.random.default_rng([cfg.seed + 1, number])
            label_sets = self._label_sets(labels, rng)
            keep = {grid: self._keep(labels[grid].valid, rng) for grid in labels}
            model.run_with_hooks(inputs, fwd_hooks=edit_hooks(self.intervention, inputs)[0]
                                 + [(s.hook, train_hook(s, labels, label_sets, keep)) for s in self.sites],
                                 return_type=None)

        probes: dict[tuple[str, str], LinearProbe] = {}
        keys = [(condition, site.hook) for site in self.sites for condition in self.conditions]
        if cfg.probe == "ridge":
            for site in self.sites:
                accumulators[site.hook].all_reduce(self.group)
                for k, condition in enumerate(self.conditions):
                    probes[(condition, site.hook)] = accumulators[site.hook].solve(cfg.alpha, label_set=k)
        else:
            problems = [accumulators[site.hook].features(k) for site in self.sites for k in range(n_sets)]
            fitted = fit_logistic_many(problems, self.n_classes, l2=cfg.l2, max_iter=cfg.max_iter,
                                       progress=self.progress, names=[f"{h} ({c})" for c, h in keys],
                                       memory_mb=cfg.logistic_memory_mb, group=self.group,
                                       device=model.cfg.device)
            for site in self.sites:
                accumulators[site.hook].close()
            probes = dict(zip(keys, fitted))
        probes = {key: probe.to(model.cfg.device) for key, probe in probes.items()}

        def test_hook(site: Site, labels, masks, found):
            def hook(activation, hook):
                x = gather_image_tokens(site, activation, inputs.layout)
                grid = inputs.layout.pixels(site.stage)
                present = inputs.layout.table(site.stage).present
                lab = labels[site.grid]
                _finite(x, site, "held-out")
                for condition in self.conditions:
                    key = (condition, site.hook)
                    pred = probes[key].predict(x.flatten(0, 1).float()).view(x.shape[:2]).cpu()
                    pred[~present] = -1  # padding rows of images with fewer tokens
                    found[key][0].add(pred, lab.labels, lab.valid, masks, grid)
                    found[key][1].extend(pred.to(torch.int16))
            return hook

        # per test batch: its scores, predictions, masks and (for images with their own grids) the
        # pixel maps, gathered from every rank in batch order
        parts = []
        for number, inputs, masks, labels in self._batches(test_idx, "probe sweep: test images"):
            found = {key: (SegmentationScores(self.n_classes, self.ignore_index), []) for key in probes}
            model.run_with_hooks(inputs, fwd_hooks=edit_hooks(self.intervention, inputs)[0]
                                 + [(s.hook, test_hook(s, labels, masks, found)) for s in self.sites],
                                 return_type=None)
            layout = inputs.layout
            if layout.uniform:
                grids = {"vision": layout.grid_of("vision"), "llm": layout.grid_of("llm")}
            else:  # per held-out image, which prediction paints each pixel
                grids = {grid: list(layout.pixel_map(grid)) for grid in ("vision", "llm")}
            kept_masks = list(masks.to(torch.uint8) if self.ignore_index < 256 else masks)
            parts.append((number, (found, kept_masks, grids)))
        parts = distributed.gather_in_order(parts, self.group)
        # rows past an image's tokens are -1, masks past its canvas the ignore index
        found = {key: (probes[key], _merged([p[0][key][0] for p in parts], self.n_classes, self.ignore_index),
                       pad_stack([row for p in parts for row in p[0][key][1]], -1)) for key in probes}
        masks = pad_stack([m for p in parts for m in p[1]], self.ignore_index)
        if all(isinstance(p[2]["llm"], list) for p in parts):
            grids = {grid: pad_stack([m for p in parts for m in p[2][grid]], -1) for grid in ("vision", "llm")}
        elif any(isinstance(p[2]["llm"], list) for p in parts):
            raise InputError("held-out batches mix images of one fixed grid with images of their own grids")
        else:
            grids = parts[-1][2]
        return found, masks.numpy(), grids


def _merged(parts: list[SegmentationScores], n_classes: int, ignore_index: int) -> SegmentationScores:
    """Batch scores added in batch order: integer counts, so the same as one running total."""
    total = SegmentationScores(n_classes, ignore_index)
    for part in parts:
        total.tokens_correct += part.tokens_correct
        total.tokens_valid += part.tokens_valid
        total.confusion += part.confusion
        total.per_image.extend(part.per_image)
    return total


def _finite(x: Tensor, site: Site, which: str) -> Tensor:
    """`x`, after checking it holds no NaN or inf: a probe fitted on them is NaN and its predictions
    a constant class, which would be scored as if it were a finding."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(-1).sum())
        raise InputError(
            f"{bad} {which} image tokens have NaN or inf activations at {site.hook}; the model overflows or its "
            "inputs hold NaN (float16 overflows easily: run in float32 or bfloat16, and check pixel_values)"
        )
    return x


def _assemble(results, sites, info, cfg, train_idx, test_idx, test_masks, grids, dataset) -> ProbeSweep:
    resamples = bootstrap_indices(len(test_idx), cfg.n_boot, cfg.seed)
    rows, class_rows = [], []
    order = {s.hook: i for i, s in enumerate(sites)}
    for (condition, hook), (probe, scores, _) in results.items():
        site = sites[order[hook]]
        boot = scores.bootstrap_miou(resamples)
        rows.append({
            "condition": condition, "depth": order[hook], "stage": site.stage, "layer": site.layer,
            "site": site.label, "hook": hook, "n_test_tokens": scores.tokens_valid,
            "token_accuracy": scores.token_accuracy, "pixel_accuracy": scores.pixel_accuracy,
            "miou": scores.miou, "miou_low": float(np.nanpercentile(boot, 2.5)),
            "miou_high": float(np.nanpercentile(boot, 97.5)),
        })
        class_rows.append({"condition": condition, "hook": hook, **dict(zip(info.class_names, scores.class_iou()))})
    table = pd.DataFrame(rows).sort_values(["condition", "depth"]).reset_index(drop=True)
    per_class = pd.DataFrame(class_rows).set_index(["condition", "hook"])
    return ProbeSweep(
        table=table,
        per_class_iou=per_class,
        confusion={key: scores.confusion for key, (_, scores, _) in results.items()},
        probes={key: probe for key, (probe, _, _) in results.items()},
        predictions={key: pred for key, (_, _, pred) in results.items()},
        sites=sites,
        class_names=tuple(info.class_names),
        ignore_index=info.ignore_index,
        grids=grids,
        test_indices=test_idx,
        train_indices=train_idx,
        test_masks=test_masks,
        settings=cfg,
        dataset=dataset,
        bootstrap=resamples,
        scores={key: scores for key, (_, scores, _) in results.items()},
    )
