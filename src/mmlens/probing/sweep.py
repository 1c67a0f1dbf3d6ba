"""The layer-wise probing sweep over vision encoder -> adapter -> LLM.

One forward pass per image serves every site: hooks gather the image tokens as they pass and
either add them to ridge sufficient statistics or append them to a disk store (logistic).
Each probe's penalty is chosen by k-fold cross-validation over the training images, then the
probes are applied inside the hooks on held-out images, whose token predictions are scored at the
pixel level beside each grid's token-resolution ceiling. The split is by image and seeded, every
random draw is keyed to images, and the split is refused when images repeat across it. Controls
run the same sweep with labels shuffled within each training image, with a re-drawn LLM behind
the trained vision tower and adapter, or on a randomly initialised copy.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from ..progress import progress_bar

from .. import distributed
from ..data.integrity import check_classes, check_split_independent
from ..data.schema import segmentation_info
from ..errors import InputError
from ..model import HookedMLLM, PixelMap
from ..model.edits import Edit, edit_hooks
from .batches import N_VISUAL_TYPES, pad_stack, rank_batches
from .controls import random_llm, randomly_initialised
from .linear import LinearProbe
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, check_n_boot, percentile_interval
from .logistic import DEFAULT_MEMORY_MB, MAX_ITER, chunk_rows, fit_logistic_many
from .metrics import SegmentationScores
from .penalty import (DEFAULT_FOLDS, LOGISTIC_L2S, RIDGE_ALPHAS, PenaltyChoice, RidgeFolds, check_grid,
                      choose_logistic_l2, image_folds)
from .sites import Site, default_sites, gather_image_tokens, site_layout
from .sparse import SPARSE_KS, check_sparse_saes, sparse_problem
from .split import split_images
from .store import ActivationStore, store_folder

ProbeKind = Literal["ridge", "logistic", "sparse"]
Control = Literal["random_init", "random_llm", "shuffled_labels", "control_task"]
CONTROLS = ("random_init", "random_llm", "shuffled_labels", "control_task")
LABEL_CONTROLS = ("shuffled_labels", "control_task")  # other labels for the same features, in the model's run
MODEL_CONTROLS = ("random_init", "random_llm")  # controls that are another model, run in a sweep of their own
# the summary's probes refitted a decade either side of their penalty (conditions of the "model" run)
SENSITIVITY = {"penalty/10": 0.1, "penalty*10": 10.0}
# logistic probes are fitted in float64: a float32 L-BFGS stops wherever float32 steps stall, and
# that point moved with the last-bit differences between batch sizes (mIoU in the third decimal)
FIT_DTYPE = torch.float64


@dataclass
class SweepSettings:
    """How a probe sweep fits: probe kind, split, seed, batch size, prompt and penalty choice."""

    probe: ProbeKind = "ridge"
    test_fraction: float = 0.25
    seed: int = 0
    batch_size: int = 16
    prompt: str = ""
    # penalties: a number, or "cv" for the candidate with the lowest k-fold held-out loss on the
    # training images, chosen per site and label set (`mmlens.probing.penalty`)
    alpha: float | str = "cv"  # ridge penalty on standardised features, relative to n
    l2: float | str = "cv"  # logistic penalty
    alphas: tuple[float, ...] = RIDGE_ALPHAS  # ridge candidates
    l2s: tuple[float, ...] = LOGISTIC_L2S  # logistic candidates
    cv_folds: int = DEFAULT_FOLDS
    # the LLM layer whose probe the recovery reads: fixed before any test image is seen ("last", or a layer)
    recovery_layer: int | str = "last"
    sensitivity: bool = True  # also fit the summary's probes a decade either side of their penalty
    max_iter: int = MAX_ITER  # a guard: logistic fits stop at their convergence tolerances
    min_valid_fraction: float = 0.5
    max_train_tokens_per_image: int | None = None  # logistic store subsample (bounds the store's disk)
    logistic_memory_mb: float = DEFAULT_MEMORY_MB  # features held at once while fitting a logistic probe
    n_boot: int = DEFAULT_N_BOOT
    store_dir: str | None = None
    stats_device: str | None = None  # where ridge statistics live; default: the activations' device
    # sparse probes (`mmlens.probing.sparse`): k per class, a number or "cv" (chosen from sparse_ks on
    # the training images); `sae`: SAEs (or their paths) whose features are the basis at their sites
    sparse_k: int | str = "cv"
    sparse_ks: tuple[int, ...] = SPARSE_KS
    sae: Any = field(default=None, repr=False)

    @property
    def penalty(self) -> float | str:
        return {"ridge": self.alpha, "sparse": self.sparse_k}.get(self.probe, self.l2)

    @property
    def candidates(self) -> tuple[float, ...]:
        name = {"ridge": "alphas", "sparse": "sparse_ks"}.get(self.probe, "l2s")
        return check_grid(getattr(self, name), name)

    def check(self) -> None:
        if self.probe not in ("ridge", "logistic", "sparse"):
            raise InputError(f"probe must be 'ridge', 'logistic' or 'sparse', got {self.probe!r}")
        if self.sae is not None and self.probe != "sparse":
            raise InputError(f"sae is the basis of sparse probes only; pass probe='sparse' (got {self.probe!r})")
        check_n_boot(self.n_boot)
        name = {"ridge": "alpha", "sparse": "sparse_k"}.get(self.probe, "l2")
        penalty = self.penalty
        if isinstance(penalty, str):
            if penalty != "cv":
                raise InputError(f"{name} must be a positive number or 'cv' (chosen on the training images), "
                                 f"got {penalty!r}")
            self.candidates  # noqa: B018  (validates the grid)
            if self.cv_folds < 2:
                raise InputError(f"cv_folds must be at least 2, got {self.cv_folds}")
        elif not (isinstance(penalty, (int, float)) and np.isfinite(penalty) and penalty > 0):
            raise InputError(f"{name} must be a positive number or 'cv', got {penalty!r}")
        if not (self.recovery_layer == "last" or (isinstance(self.recovery_layer, (int, np.integer))
                                                  and not isinstance(self.recovery_layer, bool))):
            raise InputError(f"recovery_layer must be 'last' or an LLM layer number, got {self.recovery_layer!r}")
        whole = [k for k in (self.sparse_k, *self.sparse_ks) if k != "cv" and not float(k).is_integer()]
        if self.probe == "sparse" and whole:
            raise InputError(f"sparse_k and sparse_ks count features per class: whole numbers, got {whole}")


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
    # "vision" (patches), "llm" (image tokens) and a second tower's grid where a site reads it (its
    # prefix, e.g. "vision.high_res"): which prediction paints each pixel of the held-out images (the
    # grid every image shares, or per image its own map), all on the layout's canvas
    grids: dict[str, PixelMap]
    test_indices: np.ndarray  # dataset rows of the held-out images
    train_indices: np.ndarray
    test_masks: np.ndarray  # [n_test, h, w] in the layout's canvas pixels (padded with ignore to the largest)
    settings: SweepSettings
    dataset: Any = field(repr=False, default=None)
    bootstrap: np.ndarray = field(repr=False, default=None)  # [n_boot, n_test] image resamples
    scores: dict[tuple[str, str], SegmentationScores] = field(repr=False, default_factory=dict)
    # one row per (condition, hook, candidate penalty): its k-fold held-out loss on training images
    penalties: pd.DataFrame = field(repr=False, default=None)
    # per grid ("vision", "llm"): the token-resolution ceiling, each token painting its box's majority class
    ceilings: dict[str, SegmentationScores] = field(repr=False, default_factory=dict)
    # True on ranks other than 0 of a distributed sweep: the probes, split and settings every rank
    # fitted alike and rank 0's confusion matrices, without the per-image held-out results, which
    # went to rank 0 as they were made
    rank_share: bool = False

    def probe(self, hook: str, condition: str = "model") -> LinearProbe:
        return self.probes[(condition, hook)]

    def _require_results(self) -> None:
        if self.rank_share:
            raise InputError(f"this is rank {distributed.rank()}'s share of a distributed sweep: its probes and split, "
                             "not its held-out results, which were sent to rank 0; read tables and summaries on rank 0 "
                             "(distributed.is_main())")

    def summary(self, condition: str = "model") -> pd.DataFrame:
        """Drop at the adapter, recovery at the LLM layer fixed in the settings, the fraction
        recovered, their values a decade either side of the chosen penalties, and the recovery over a
        re-drawn LLM's when the sweep has that control, with bootstrap intervals over test images
        (paired: the same resamples for every site)."""
        self._require_results()
        from .summary import sweep_summary

        return sweep_summary(self, condition)

    def layer_recoveries(self, condition: str = "model") -> pd.DataFrame:
        """Recovery over the adapter output at every LLM site, with pointwise and simultaneous
        (max-statistic over the layers) 95% intervals."""
        self._require_results()
        from .summary import layer_recoveries

        return layer_recoveries(self, condition)

    def findings(self, condition: str = "model") -> list[str]:
        """The summary in sentences, each only as strong as its interval allows."""
        from .summary import summary_findings

        return summary_findings(self.summary(condition), self.layer_recoveries(condition))

    def _repr_html_(self) -> str:
        from ..display import result_html

        if self.rank_share:
            return result_html(f"ProbeSweep: rank {distributed.rank()}'s share ({len(self.probes)} probes)", [], {},
                               hint="the held-out results are on rank 0")

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
    probe: ProbeKind = "ridge",
    *,
    control: Control | Iterable[Control] | None = None,
    intervention: Edit | None = None,
    progress: bool = True,
    group: Any = None,
    **settings: Any,
) -> ProbeSweep:
    """Probe every site for each image token's class and score it at the pixel level.

    `dataset` is a segmentation dataset in mmlens's schema (`mmlens.data.load_segmentation`).
    Penalties are chosen per site by k-fold cross-validation on the training images (settings
    `alpha` / `l2` = "cv", the default; a number fixes them). `control` adds "shuffled_labels" (the
    same features, each training image's token labels permuted among its own tokens),
    "random_llm" (the trained vision tower and adapter with a re-drawn LLM: the control for "the
    LLM recovers") and/or "random_init" (a randomly initialised copy of the whole model).
    `intervention(inputs)` returns forward hooks (a list of (name, hook) or an object with a
    `hooks` list, such as `knockout(...)` or `bidirectional_image_attention(...)`) that run in
    every forward of the sweep, training and test images alike: probes then describe the edited
    model. Other keywords are `SweepSettings` fields.

    Every random draw is keyed to the seed and the dataset rows (images), never to batches or
    processes: the numbers do not depend on `batch_size`, threads or ranks beyond float rounding.
    Under torch.distributed (torchrun, or `group`, a process group), each rank runs its share of
    the image batches; ridge statistics and logistic gradients are summed over ranks, so every rank
    fits the same probes, and the held-out results go to rank 0 batch by batch: rank 0 returns the
    sweep one process would (per-image results exactly, fitted probes up to float rounding of the
    sums), the other ranks a `rank_share` sweep: the probes, the split and the confusion matrices, no
    per-image held-out results.
    """
    cfg = SweepSettings(probe=probe, **settings)
    cfg.check()
    controls = [control] if isinstance(control, str) else list(control or [])
    unknown = set(controls) - set(CONTROLS)
    if unknown:
        raise InputError(f"unknown control(s) {sorted(unknown)}; choose from {CONTROLS}")
    if intervention is not None and set(controls) & set(MODEL_CONTROLS):
        raise InputError(
            "the random_init and random_llm controls cannot take the intervention: an edit is built for the trained "
            "model (its token groups and probes). Run those controls without intervention= in a separate sweep"
        )
    info = segmentation_info(dataset)
    n_classes = len(info.class_names)
    resolved = default_sites(model, sites)
    if not resolved:
        raise InputError("sites is empty: pass 'all', a stage ('vision', 'adapter', 'llm') or a list of hook names")
    from .summary import recovery_site

    recovery = recovery_site(resolved, cfg.recovery_layer, required=False)  # refuses a layer the sweep lacks
    cfg.sae = check_sparse_saes(cfg.sae, [s.hook for s in resolved], model.resolve_hook_name) or None
    train_idx, test_idx = split_images(len(dataset), cfg.test_fraction, cfg.seed)
    check_split(dataset, train_idx, test_idx)
    bootstrap = bootstrap_indices(len(test_idx), cfg.n_boot, cfg.seed)
    summary_hooks = [s.hook for s in resolved if s.hook in ("adapter.hook_in", "adapter.hook_out")]
    summary_hooks += [recovery.hook] if recovery is not None else []
    runs = [("model", ["model"] + [c for c in LABEL_CONTROLS if c in controls])]
    runs += [(which, [which]) for which in MODEL_CONTROLS if which in controls]
    results: dict[tuple[str, str], tuple[LinearProbe, SegmentationScores, Tensor]] = {}
    choices: dict[tuple[str, str], PenaltyChoice] = {}
    for which, conditions in runs:
        run_model = model if which == "model" else control_model(model, which, cfg.seed)
        runner = _SweepRun(run_model, dataset, resolved, cfg, n_classes, info.ignore_index, conditions, progress,
                           intervention if which == "model" else None, group,
                           summary_hooks if which == "model" and cfg.sensitivity and probe != "sparse" else [])
        found, test_masks, grids, chosen, ceilings = runner.run(train_idx, test_idx)
        results.update(found)
        choices.update(chosen)
    if test_masks is None:  # a rank other than 0: rank 0 holds the held-out results
        return _rank_share(results, resolved, info, cfg, train_idx, test_idx, dataset, bootstrap)
    return _assemble(results, resolved, info, cfg, train_idx, test_idx, test_masks, grids, dataset, bootstrap,
                     choices, ceilings)


def control_model(model: HookedMLLM, which: str, seed: int) -> HookedMLLM:
    """The model a model control runs: "random_init" (all weights re-drawn) or "random_llm"."""
    return randomly_initialised(model, seed) if which == "random_init" else random_llm(model, seed)


def check_split(dataset, train_idx: np.ndarray, test_idx: np.ndarray) -> None:
    """Refuse a split no honest score can come from: duplicate images across it, or one class."""
    check_split_independent(dataset, train_idx, test_idx)
    check_classes(dataset, train_idx)


def _row_generator(seed: int, purpose: int, row: int) -> np.random.Generator:
    """A generator for one image's draws: keyed to the dataset row, so batches and ranks agree."""
    return np.random.default_rng([seed + 1, purpose, int(row)])


_SHUFFLE, _SUBSAMPLE, _CONTROL_TASK = 1, 2, 3  # what a seeded generator draws for


class _SweepRun:
    """One model's pass: train images -> choose penalties and fit probes -> test images -> scores."""

    def __init__(self, model, dataset, sites, cfg, n_classes, ignore_index, conditions, progress, intervention=None,
                 group=None, sensitivity_hooks=()):
        self.model, self.dataset, self.sites, self.cfg, self.group = model, dataset, sites, cfg, group
        self.intervention = intervention
        self.n_classes, self.ignore_index, self.conditions = n_classes, ignore_index, conditions
        self.progress = progress
        self.sensitivity_hooks = list(sensitivity_hooks)
        # the grids scored and painted: the layout's own two and a second tower's where a site reads it
        # (only those are labelled: `_batches`)
        self.grid_names = ("vision", "llm", *dict.fromkeys(s.vision_grid for s in sites if s.vision_grid))
        self.cv = isinstance(cfg.penalty, str)
        self.n_folds = cfg.cv_folds if self.cv else 1
        # the control task's fixed random class for each visual type (Hewitt and Liang, 2019)
        self.control_labels = torch.from_numpy(
            np.random.default_rng([cfg.seed + 1, _CONTROL_TASK]).integers(0, n_classes, N_VISUAL_TYPES))

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
                                          progress=self.progress, desc=desc,
                                          visual_types="control_task" in self.conditions,
                                          vision_grids=self.grid_names[2:]):
            yield number, batch

    def _label_sets(self, batch) -> dict[str, list[Tensor]]:
        """Per grid, one label set per condition for the valid tokens: the true labels; for the
        shuffled-labels control the same labels permuted among each image's own valid tokens
        (seeded by its dataset row); for the control task each token's visual type's fixed class."""
        out = {}
        for grid, lab in batch.labels.items():
            sets = [lab.labels[lab.valid]]
            if "shuffled_labels" in self.conditions:
                shuffled = []
                for image, row in enumerate(batch.indices):
                    y = lab.labels[image][lab.valid[image]]
                    shuffled.append(y[torch.from_numpy(_row_generator(self.cfg.seed, _SHUFFLE, row).permutation(len(y)))])
                sets.append(torch.cat(shuffled))
            if "control_task" in self.conditions:
                sets.append(self.control_labels[batch.types[grid][lab.valid]])
            out[grid] = sets
        return out

    def _scored_against(self, condition: str, batch, grid: str):
        """(token labels, pixel masks) a condition's predictions are scored against: the truth,
        except for the control task, scored on its own task."""
        lab = batch.labels[grid]
        if condition != "control_task":
            return lab.labels, batch.masks
        # tokens of padding have no type (the ignore index): they are not valid, whatever they index
        tokens = torch.where(lab.valid, self.control_labels[batch.types[grid].clamp(0, N_VISUAL_TYPES - 1)], lab.labels)
        pixels = self.control_labels[batch.type_masks.clamp(0, N_VISUAL_TYPES - 1)]
        return tokens, torch.where(batch.masks != self.ignore_index, pixels, batch.masks.long())

    def _keep(self, valid: Tensor, rows: np.ndarray) -> Tensor:
        """Which valid training tokens go to the logistic store (optional per-image subsample)."""
        cap = self.cfg.max_train_tokens_per_image
        if cap is None or self.cfg.probe == "ridge":
            return torch.ones(int(valid.sum()), dtype=torch.bool)
        keep = []
        for mask, row in zip(valid, rows):
            n = int(mask.sum())
            chosen = torch.zeros(n, dtype=torch.bool)
            chosen[torch.from_numpy(_row_generator(self.cfg.seed, _SUBSAMPLE, row).permutation(n)[:cap])] = True
            keep.append(chosen)
        return torch.cat(keep)

    @torch.no_grad()
    def run(self, train_idx, test_idx):
        """Probes fitted on the training images, then the held-out results, sent to rank 0 batch
        by batch: (found, masks, grids, choices, ceilings) on rank 0, and on other ranks the probes
        and choices with None for what rank 0 alone holds."""
        # logistic stores live in this rank's folder, removed on every way out of the fit
        with store_folder(self.cfg.store_dir, distributed.rank(self.group)) if self.cfg.probe != "ridge" \
                else nullcontext() as folder:
            probes, choices = self._train(train_idx, folder)
        return self._test(test_idx, probes, choices)

    def _train(self, train_idx, store_root):
        cfg, model = self.cfg, self.model
        n_sets = len(self.conditions)
        accumulators: dict[str, RidgeFolds | ActivationStore] = {}
        folds = image_folds(len(train_idx), self.n_folds, cfg.seed) if self.cv else np.zeros(len(train_idx), np.int64)
        fold_of_row = dict(zip(np.asarray(train_idx).tolist(), folds.tolist()))

        def train_hook(site: Site, labels, label_sets, keep, token_folds):
            def hook(activation, hook):
                x = gather_image_tokens(site, activation, inputs.layout)
                valid = labels[site.grid].valid.to(x.device)
                rows = _finite(x[valid], site, "training")
                acc = accumulators.get(site.hook)
                if acc is None:
                    acc = accumulators[site.hook] = (
                        RidgeFolds(x.shape[-1], self.n_classes, n_sets, self.n_folds, device=cfg.stats_device or x.device)
                        if cfg.probe == "ridge"
                        else ActivationStore(x.shape[-1], n_sets, store_root, name=site.hook)
                    )
                if cfg.probe == "ridge":
                    acc.update(rows, token_folds[site.grid], *label_sets[site.grid])
                else:
                    k = keep[site.grid].to(x.device)
                    acc.append(rows[k], *(y[k.cpu()] for y in label_sets[site.grid]), fold=token_folds[site.grid][k.cpu()])
            return hook

        try:
            for number, batch in self._batches(train_idx, "probe sweep: train images", every_rank=True):
                inputs, labels = batch.inputs, batch.labels
                label_sets = self._label_sets(batch)
                keep = {grid: self._keep(labels[grid].valid, batch.indices) for grid in labels}
                image_fold = torch.tensor([fold_of_row[int(r)] for r in batch.indices], dtype=torch.int32)
                token_folds = {grid: image_fold[:, None].expand_as(lab.valid)[lab.valid] for grid, lab in labels.items()}
                model.run_with_hooks(inputs, fwd_hooks=edit_hooks(self.intervention, inputs)[0]
                                     + [(s.hook, train_hook(s, labels, label_sets, keep, token_folds)) for s in self.sites],
                                     return_type=None)
            probes, choices = self._fit(accumulators)
        finally:
            for acc in accumulators.values():
                if isinstance(acc, ActivationStore):
                    acc.close()
        return {key: probe.to(model.cfg.device) for key, probe in probes.items()}, choices

    def _test(self, test_idx, probes, choices):
        model = self.model
        keys_at = {site.hook: [key for key in probes if key[1] == site.hook] for site in self.sites}

        def test_hook(site: Site, batch, found):
            def hook(activation, hook):
                x = gather_image_tokens(site, activation, inputs.layout)
                view = site_layout(site, inputs.layout)
                grid, present = view.pixels(site.stage), view.table(site.stage).present
                valid = batch.labels[site.grid].valid
                _finite(x, site, "held-out")
                for key in keys_at[site.hook]:
                    pred = probes[key].predict(x.flatten(0, 1).float()).view(x.shape[:2]).cpu()
                    pred[~present] = -1  # padding rows of images with fewer tokens
                    tokens, pixels = self._scored_against(key[0], batch, site.grid)
                    found[key][0].add(pred, tokens, valid, pixels, grid)
                    found[key][1].extend(pred.to(torch.int16))
            return hook

        # per test batch: its scores, predictions, masks, ceilings and pixel maps, sent to rank 0 as
        # each round of batches finishes
        to_main = distributed.ToMain(len(test_idx), self.cfg.batch_size, self.group)
        for number, batch in self._batches(test_idx, "probe sweep: test images"):
            inputs, masks, labels = batch.inputs, batch.masks, batch.labels
            found = {key: (SegmentationScores(self.n_classes, self.ignore_index), []) for key in probes}
            model.run_with_hooks(inputs, fwd_hooks=edit_hooks(self.intervention, inputs)[0]
                                 + [(s.hook, test_hook(s, batch, found)) for s in self.sites],
                                 return_type=None)
            layout = inputs.layout
            grids = {grid: _grid_pixels(layout, grid) for grid in self.grid_names}
            ceilings = {grid: _ceiling(labels[grid], layout, grid, masks, self.n_classes, self.ignore_index)
                        for grid in self.grid_names}
            kept_masks = list(masks.to(torch.uint8) if self.ignore_index < 256 else masks)
            to_main.add(number, (found, kept_masks, grids, ceilings))
        parts = to_main.finish().items
        main = distributed.is_main(self.group)
        scores = {key: _merged([p[0][key][0] for p in parts], self.n_classes, self.ignore_index) for key in probes} \
            if main else None
        # the confusion matrices (classes x classes per probe) are what later stages read on every
        # rank (conflicting pairs, anchors): small, so rank 0 shares them
        confusion = distributed.broadcast_object({key: s.confusion for key, s in scores.items()} if main else None,
                                                 self.group)
        if not main:
            return {key: (probe, confusion[key], None) for key, probe in probes.items()}, None, None, choices, None
        # rows past an image's tokens are -1, masks past its canvas the ignore index
        found = {key: (probes[key], scores[key], pad_stack([row for p in parts for row in p[0][key][1]], -1))
                 for key in probes}
        ceilings = {grid: _merged([p[3][grid] for p in parts], self.n_classes, self.ignore_index)
                    for grid in self.grid_names}
        masks = pad_stack([m for p in parts for m in p[1]], self.ignore_index)
        grids = {grid: PixelMap.concat([p[2][grid] for p in parts]) for grid in self.grid_names}
        return found, masks.numpy(), grids, choices, ceilings

    def _fit(self, accumulators) -> tuple[dict, dict]:
        """Every site's probes (one per label set, plus the sensitivity refits) and the penalty
        each one's cross-validation chose."""
        cfg = self.cfg
        probes, choices = {}, {}
        problems = [(site, k, condition) for site in self.sites for k, condition in enumerate(self.conditions)]
        bar = progress_bar(total=len(problems), desc="probe sweep: choosing penalties and fitting" if self.cv else
                           "probe sweep: fitting probes", unit="probe", enabled=self.progress)
        for site, k, condition in problems:
            acc = accumulators[site.hook]
            bar.set_postfix_str(f"{site.hook} ({condition})", refresh=False)
            if cfg.probe == "sparse":  # k, not a penalty, is chosen by cross-validation
                choice, solve = sparse_problem(acc, k, site.hook, cfg, self.n_classes, self.n_folds,
                                               self._logistic_fit(site.hook), self.group)
            elif cfg.probe == "ridge":
                if k == 0:
                    acc.all_reduce(self.group)
                    total = acc.total()
                choice = (acc.choose(cfg.candidates, k, total) if self.cv
                          else PenaltyChoice((cfg.alpha,), (np.nan,), cfg.alpha))

                def solve(penalty, init=None, k=k, total=total):
                    return total.solve(penalty, label_set=k)
            else:
                fit = self._logistic_fit(site.hook)
                rows = chunk_rows(acc.d, self.n_classes, cfg.logistic_memory_mb, FIT_DTYPE.itemsize)
                choice = (choose_logistic_l2(acc, k, cfg.candidates, self.n_folds, fit, rows, self.group) if self.cv
                          else PenaltyChoice((cfg.l2,), (np.nan,), cfg.l2))

                def solve(penalty, init=None, k=k, fit=fit, acc=acc):
                    return fit([acc.features(k)], penalty, [init])[0]
            probes[(condition, site.hook)] = fitted = solve(choice.chosen)
            choices[(condition, site.hook)] = choice
            if condition == "model" and site.hook in self.sensitivity_hooks:
                for name, factor in SENSITIVITY.items():
                    probes[(name, site.hook)] = solve(choice.chosen * factor, fitted)
                    choices[(name, site.hook)] = PenaltyChoice(choice.candidates, choice.losses, choice.chosen * factor)
            bar.update(1)
        bar.close()
        return probes, choices

    def _logistic_fit(self, name: str):
        cfg = self.cfg

        def fit(sources, l2, inits):
            return fit_logistic_many(sources, self.n_classes, l2=l2, max_iter=cfg.max_iter, progress=False,
                                     names=[name] * len(sources), memory_mb=cfg.logistic_memory_mb, group=self.group,
                                     device=self.model.cfg.device, inits=inits, dtype=FIT_DTYPE)
        return fit


def _ceiling(labels, layout, grid: str, masks: Tensor, n_classes: int, ignore_index: int) -> SegmentationScores:
    """The best a probe on this grid could do at pixel level: each token paints the majority
    class of its own box (what the token grid can represent, whatever the activations hold)."""
    oracle = labels.fractions.argmax(-1)
    oracle[~layout.on_grid(grid).table(_grid_stage(grid)).present] = -1
    scores = SegmentationScores(n_classes, ignore_index)
    scores.add(oracle, labels.labels, labels.valid, masks, _grid_pixels(layout, grid))
    return scores


def _grid_stage(grid: str) -> str:
    """The stage whose rows a grid holds: the LLM's tokens, or a vision grid's patches."""
    return "llm" if grid == "llm" else "vision"


def _grid_pixels(layout, grid: str) -> PixelMap:
    """What paints a grid's rows onto the layout's canvas."""
    return layout.on_grid(grid).pixels(_grid_stage(grid))


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


def _rank_share(results, sites, info, cfg, train_idx, test_idx, dataset, resamples) -> ProbeSweep:
    return ProbeSweep(
        table=pd.DataFrame(), per_class_iou=pd.DataFrame(), sites=sites,
        confusion={key: confusion for key, (_, confusion, _) in results.items()},
        probes={key: probe for key, (probe, _, _) in results.items()}, predictions={},
        class_names=tuple(info.class_names), ignore_index=info.ignore_index, grids={}, test_indices=test_idx,
        train_indices=train_idx, test_masks=np.zeros((0, 0, 0), dtype=np.uint8), settings=cfg, dataset=dataset,
        bootstrap=resamples, rank_share=True,
    )


def _assemble(results, sites, info, cfg, train_idx, test_idx, test_masks, grids, dataset, resamples, choices,
              ceilings) -> ProbeSweep:
    rows, class_rows, penalty_rows = [], [], []
    order = {s.hook: i for i, s in enumerate(sites)}
    ceiling_miou = {grid: scores.miou for grid, scores in ceilings.items()}
    for (condition, hook), (probe, scores, _) in results.items():
        site = sites[order[hook]]
        low, high = percentile_interval(scores.bootstrap_miou(resamples))
        choice = choices[(condition, hook)]
        rows.append({
            "condition": condition, "depth": order[hook], "stage": site.stage, "grid": site.grid, "layer": site.layer,
            "site": site.label, "hook": hook, "n_test_tokens": scores.tokens_valid,
            "token_accuracy": scores.token_accuracy, "pixel_accuracy": scores.pixel_accuracy,
            "miou": scores.miou, "miou_low": low, "miou_high": high,
            "penalty": choice.chosen, "penalty_at_grid_edge": choice.at_edge,
            "ceiling": ceiling_miou[site.grid], "miou_of_ceiling": scores.miou / ceiling_miou[site.grid],
        })
        class_rows.append({"condition": condition, "hook": hook, **dict(zip(info.class_names, scores.class_iou()))})
        if condition in SENSITIVITY:
            continue
        for candidate, loss in zip(choice.candidates, choice.losses):
            penalty_rows.append({"condition": condition, "hook": hook, "site": site.label, "candidate": candidate,
                                 "cv_loss": loss, "chosen": candidate == choice.chosen})
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
        penalties=pd.DataFrame(penalty_rows, columns=["condition", "hook", "site", "candidate", "cv_loss", "chosen"]),
        ceilings=ceilings,
    )
