"""The SAE study on image tokens: reconstruction, class-aligned features and their ablation.

An SAE is trained on one split of a segmentation dataset's images and everything is scored on the
other (the probe sweep's seeded split by image). Three tables: how much of the held-out tokens'
variance the SAE explains; for each class the feature whose thresholded map over the token grid
best matches the class mask on training images (IoU; Bricken et al. 2023 and the feature maps of
vision SAEs), scored on held-out images against random live features; and whether zeroing that
feature at the image tokens, in the forward spliced with the error term (so nothing else changes),
lowers a ridge probe's pixel IoU for the class more than zeroing a live feature of the same
firing frequency. Intervals are percentile bootstraps over held-out images, the same resamples
for every compared quantity (paired), and are worded by `mmlens.findings`.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..data.schema import segmentation_info
from ..errors import InputError
from ..findings import effect_phrase, verdict, with_interval
from ..model import HookedMLLM
from ..probing.batches import labelled_batches
from ..probing.linear import LinearProbe
from ..probing.metrics import SegmentationScores
from ..probing.ridge import RidgeStatistics
from ..probing.sites import Site, gather_image_tokens, site_for, site_layout
from ..probing.split import split_images
from ..probing.sweep import check_split
from ..resampling import DEFAULT_N_BOOT, bootstrap_indices, check_n_boot, percentile_interval, resample_counts
from .activations import TokenActivations, image_token_positions
from .alignment import feature_class_iou
from .config import SAEConfig
from .sae import SAE
from .maps import FEATURES_POINT
from .splice import expected_width
from .training import SAETraining, TrainingSettings, evaluate_sae, train_sae_on_activations


@dataclass
class SAEStudy:
    """What `sae_study` measured; every table's intervals come from the same image resamples."""

    training: SAETraining
    reconstruction: pd.DataFrame  # one row: held-out variance explained, L0, dead features
    alignment: pd.DataFrame  # per class: aligned feature, held-out IoU vs random features
    ablation: pd.DataFrame  # per class: probe IoU drop, aligned feature vs frequency-matched one
    findings: list[str] = field(default_factory=list)
    train_rows: np.ndarray = field(repr=False, default=None)
    test_rows: np.ndarray = field(repr=False, default=None)

    @property
    def sae(self) -> SAE:
        return self.training.sae


@dataclass
class _Split:
    """One side of the split: SAE-site activations with their classes, and the probe's sums."""

    tokens: TokenActivations
    ridge: RidgeStatistics | None  # the probe site's sums over labelled tokens (training images)


def sae_study(
    model: HookedMLLM,
    scenes: Any,
    hook_name: str = "adapter.hook_out",
    *,
    probe_hook: str | None = None,
    classes: list[str] | None = None,
    test_fraction: float = 0.25,
    seed: int = 0,
    n_boot: int = DEFAULT_N_BOOT,
    n_random_features: int = 32,
    map_threshold: float = 0.0,
    probe_alpha: float = 1e-2,
    batch_size: int = 16,
    prompt: str = "",
    sae: SAE | None = None,
    **training: Any,
) -> SAEStudy:
    """Train an SAE at `hook_name` on the training images of `scenes` (an mmlens segmentation
    dataset) and score it on the held-out ones. `probe_hook` (default: the SAE's own point when it
    is on the LLM's token grid, else the last LLM layer) carries the ridge probe (penalty
    `probe_alpha`) whose class IoU the ablations are scored by, a later layer asking what the LLM
    loses downstream; `classes` (default: every class on training tokens) are the classes studied.
    A feature's map is its activation above `map_threshold` x its largest training activation.
    Other keywords are `TrainingSettings` fields (`architecture`, `d_sae`, `k`, `steps`, ...); `sae`:
    an SAE already trained at `hook_name` (e.g. `load_sae(path)`), studied instead of training one;
    training keywords are then refused, and `training.settings` reports the given SAE's
    architecture, d_sae and k. The given SAE is never moved: one already on the model's device is
    used as it is, any other is copied there (the caller's object stays where it was)."""
    if sae is not None and training:
        raise InputError(f"sae= studies the SAE given, so the training keyword(s) {', '.join(sorted(training))} would "
                         "be ignored; drop them, or leave out sae= to train one")
    settings = TrainingSettings(**{"seed": seed, **training})
    settings.check()
    if sae is not None:  # what was studied: the given SAE's shape, not the training defaults
        settings = dataclasses.replace(settings, architecture=sae.cfg.architecture, d_sae=sae.cfg.d_sae, k=sae.cfg.k)
    check_n_boot(n_boot)
    if not 0 <= map_threshold < 1:
        raise InputError(f"map_threshold is a fraction of each feature's largest activation, in [0, 1); got {map_threshold}")
    info = segmentation_info(scenes)
    site = site_for(model, hook_name)
    default_probe = site.hook if site.grid == "llm" else f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    probe_site = site_for(model, probe_hook or default_probe)
    if probe_site.grid != "llm":
        raise InputError(f"the probe reads image tokens on the LLM grid; {probe_site.hook} is a vision site: pass an "
                         "adapter or LLM hook as probe_hook")
    if sae is not None:
        _check_given(model, sae, site.hook)
    wanted = _class_indices(classes, info.class_names)
    train_rows, test_rows = split_images(len(scenes), test_fraction, seed)
    check_split(scenes, train_rows, test_rows)

    with torch.no_grad():
        train = _stream(model, scenes, train_rows, site, probe_site, batch_size, prompt, fit_probe=True)
        probe = train.ridge.solve(probe_alpha)
    if sae is None:
        fitted = train_sae_on_activations(train.tokens, metadata={"hook_name": site.hook, "prompt": prompt},
                                          **vars(settings))
        sae = fitted.sae.to(model.cfg.device)
    else:  # never `.to` on the caller's SAE: it would move (and retag) their object in place
        sae = _on_device(sae, model.cfg.device)
        fitted = SAETraining(sae, pd.DataFrame(), None, settings)
    with torch.no_grad():
        test = _stream(model, scenes, test_rows, site, probe_site, batch_size, prompt, fit_probe=False)
    resamples = bootstrap_indices(len(test_rows), n_boot, seed)
    train_features = _encode(sae, train.tokens.activations)
    test_features = _encode(sae, test.tokens.activations)
    wanted = wanted if wanted is not None else sorted(set(train.tokens.labels.unique().tolist()) - {info.ignore_index})
    alignment = _alignment(train.tokens, test.tokens, train_features, test_features, wanted, info.class_names,
                           map_threshold, n_random_features, seed, resamples)
    ablation = _ablation(model, scenes, test_rows, sae, site, probe_site, probe, alignment, train_features,
                         resamples, info, batch_size, prompt, seed)
    held_out = fitted.held_out = evaluate_sae(sae, test.tokens)
    reconstruction = pd.DataFrame([{"hook": site.hook, "architecture": settings.architecture, "d_sae": settings.d_sae,
                                    "n_train_images": len(train_rows), "n_test_images": len(test_rows),
                                    "variance_explained": held_out.variance_explained, "l0": held_out.l0,
                                    "dead_features": held_out.dead_features, "n_test_tokens": held_out.n_tokens}])
    return SAEStudy(fitted, reconstruction, alignment, ablation, _findings(reconstruction, alignment, ablation),
                    train_rows, test_rows)


def _on_device(sae: SAE, device: Any) -> SAE:
    """`sae` itself when it is already on `device`, else a copy there (its config copied too);
    `sae` is left as it was either way."""
    if sae.W_enc.device == torch.empty(0, device=device).device:
        return sae
    cfg = SAEConfig(**{**vars(sae.cfg), "metadata": copy.deepcopy(sae.cfg.metadata), "device": str(device)})
    moved = SAE(cfg, use_error_term=sae.use_error_term)
    with torch.no_grad():
        moved.load_state_dict({name: tensor.detach() for name, tensor in sae.state_dict().items()})
    return moved.to(device)


def _check_given(model: HookedMLLM, sae: SAE, hook: str) -> None:
    """A given SAE must read the studied site at its width (checked before any training forward is used)."""
    if sae.cfg.hook_name is None or model.resolve_hook_name(sae.cfg.hook_name) != hook:
        raise InputError(f"the SAE reads {sae.cfg.hook_name}, not {hook}; pass hook_name={sae.cfg.hook_name!r} or an SAE "
                         f"trained at {hook}")
    width = expected_width(model, hook)
    if width is not None and sae.cfg.d_in != width:
        raise InputError(f"the SAE reads {sae.cfg.d_in} dimensions but {hook} has {width}; give the SAE trained there")


def _class_indices(classes: list[str] | None, names: tuple[str, ...]) -> list[int] | None:
    if classes is None:
        return None
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise InputError(f"unknown classes {unknown}; the dataset's classes are {list(names)}")
    return [names.index(c) for c in classes]


def _stream(model: HookedMLLM, scenes: Any, rows: np.ndarray, site: Site, probe_site: Site, batch_size: int,
            prompt: str, fit_probe: bool) -> _Split:
    """One forward per batch: SAE-site activations at the image tokens with their classes, and
    the probe site's tokens (added to the ridge sums on training images)."""
    xs, images, cells, labels = [], [], [], []
    seen, ridge, n_classes = 0, None, len(segmentation_info(scenes).class_names)
    for batch in labelled_batches(model, scenes, rows, batch_size=batch_size, prompt=prompt):
        inputs, captured = batch.inputs, {}

        def keep(name: str, at: Site):
            def hook(activation: Tensor, hook) -> None:
                captured[name] = gather_image_tokens(at, activation, inputs.layout).float().cpu()
            return hook

        hooks = [(site.hook, keep("sae", site))] + ([(probe_site.hook, keep("probe", probe_site))] if fit_probe else [])
        model.run_with_hooks(inputs, fwd_hooks=hooks, return_type=None)
        present = site_layout(site, inputs.layout).table(site.stage).present.cpu()
        image, cell = present.nonzero(as_tuple=True)
        xs.append(captured["sae"][image, cell])
        images.append(image + seen)
        cells.append(cell)
        labels.append(batch.labels[site.grid].labels[image, cell])
        if fit_probe:
            ridge = ridge or RidgeStatistics(captured["probe"].shape[-1], n_classes)
            valid = batch.labels[probe_site.grid].valid
            ridge.update(captured["probe"][valid], batch.labels[probe_site.grid].labels[valid])
        seen += len(present)
    tokens = TokenActivations(torch.cat(xs), torch.cat(images), torch.cat(cells), torch.cat(labels), site.hook, seen,
                              segmentation_info(scenes).ignore_index)
    return _Split(tokens, ridge)


@torch.no_grad()
def _encode(sae: SAE, x: Tensor) -> Float[Tensor, "n_tokens d_sae"]:
    return sae.encode(x.to(sae.W_enc.device)).cpu()


def _per_image_overlap(active: Tensor, is_class: Tensor, image: Tensor, n_images: int) -> np.ndarray:
    """[n_images, 2, n_features]: per image, tokens in both the map and the class, and in either."""
    both = torch.zeros(n_images, active.shape[1]).index_add_(0, image, (active & is_class[:, None]).float())
    either = torch.zeros(n_images, active.shape[1]).index_add_(0, image, (active | is_class[:, None]).float())
    return torch.stack([both, either], 1).double().numpy()


def _resampled_iou(overlap: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """[n_resamples, n_features] IoU of each resample's summed overlaps (NaN where the union is empty)."""
    both, either = weights @ overlap[:, 0], weights @ overlap[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(either > 0, both / either, np.nan)


def _alignment(train: TokenActivations, test: TokenActivations, train_features: Tensor, test_features: Tensor,
               classes: list[int], class_names: tuple[str, ...], map_threshold: float, n_random: int, seed: int,
               resamples: np.ndarray) -> pd.DataFrame:
    """Per class: the feature with the best IoU on training images, its held-out IoU, and the mean
    held-out IoU of `n_random` random live features, with the paired difference."""
    peak = train_features.amax(0)
    live = torch.nonzero(peak > 0).flatten()
    if not len(live):
        raise InputError("no feature of the SAE fires on the training tokens: train longer or lower the sparsity penalty")
    cut = (map_threshold * peak).clamp(min=0)
    labelled_test = test.labels != test.ignore_index
    test_active = (test_features > cut)[labelled_test]
    generator = np.random.default_rng([seed, 28])
    random_features = torch.from_numpy(generator.choice(live.numpy(), size=min(n_random, len(live)), replace=False))
    weights = resample_counts(resamples, test.n_images)
    totals = np.ones((1, test.n_images))
    train_iou = feature_class_iou(train_features, train.labels, n_classes=len(class_names), threshold=cut,
                                  ignore_index=train.ignore_index)
    rows = []
    for c in classes:
        best = int(train_iou[str(c)].fillna(-1).idxmax())
        chosen = torch.cat([torch.tensor([best]), random_features])
        scored = _per_image_overlap(test_active[:, chosen], test.labels[labelled_test] == c, test.image[labelled_test],
                                    test.n_images)
        aligned, baseline = _resampled_iou(scored, weights)[:, 0], np.nanmean(_resampled_iou(scored, weights)[:, 1:], 1)
        point = _resampled_iou(scored, totals)[0]
        row = {"class": class_names[c], "feature": best, "train_iou": float(train_iou.loc[best, str(c)]),
               "iou": float(point[0]), "random_iou": float(np.nanmean(point[1:]))}
        row |= _interval("iou", aligned) | _interval("random_iou", baseline)
        row |= {"difference": row["iou"] - row["random_iou"]} | _interval("difference", aligned - baseline)
        row["verdict"] = verdict(row["difference_low"], row["difference_high"])
        rows.append(row)
    return pd.DataFrame(rows)


def _interval(name: str, samples: np.ndarray) -> dict[str, float]:
    low, high = percentile_interval(samples)
    return {f"{name}_low": low, f"{name}_high": high}


def _matched_feature(feature: int, frequency: Tensor, excluded: set[int], seed: int) -> int:
    """A live feature, not among `excluded`, whose training firing frequency is nearest `feature`'s
    (ties broken by a seeded draw)."""
    candidates = [f for f in torch.nonzero(frequency > 0).flatten().tolist() if f not in excluded]
    if not candidates:
        raise InputError("no other live feature to compare the ablation with: train a wider SAE")
    gaps = (frequency[candidates] - frequency[feature]).abs()
    nearest = [f for f, gap in zip(candidates, gaps.tolist()) if gap == float(gaps.min())]
    return int(np.random.default_rng([seed, 29, feature]).choice(nearest))


def _ablation(model: HookedMLLM, scenes: Any, rows: np.ndarray, sae: SAE, site: Site, probe_site: Site,
              probe: LinearProbe, alignment: pd.DataFrame, train_features: Tensor, resamples: np.ndarray, info: Any,
              batch_size: int, prompt: str, seed: int) -> pd.DataFrame:
    """Per class: the probe's held-out pixel IoU for the class clean, with the aligned feature
    zeroed at the image tokens, and with a frequency-matched live feature zeroed instead."""
    frequency = (train_features > 0).float().mean(0)
    aligned = [int(f) for f in alignment["feature"]]
    matched = [_matched_feature(f, frequency, set(aligned), seed) for f in aligned]
    runs = {"clean": None} | {("aligned", f): f for f in set(aligned)} | {("matched", f): f for f in set(matched)}
    n_classes = len(info.class_names)
    scores = {key: SegmentationScores(n_classes, info.ignore_index) for key in runs}
    probe = probe.to(model.cfg.device)
    for batch in labelled_batches(model, scenes, rows, batch_size=batch_size, prompt=prompt):
        inputs, labels = batch.inputs, batch.labels[probe_site.grid]
        probe_layout = site_layout(probe_site, inputs.layout)
        at_images = image_token_positions(site, inputs.layout).to(model.cfg.device)
        for key, feature in runs.items():
            predicted = {}

            def read(activation: Tensor, hook) -> None:
                x = gather_image_tokens(probe_site, activation, inputs.layout)
                prediction = probe.predict(x.flatten(0, 1).float()).view(x.shape[:2]).cpu()
                prediction[~probe_layout.table(probe_site.stage).present.cpu()] = -1
                predicted["tokens"] = prediction

            def zero(features: Tensor, hook, feature=feature) -> Tensor:
                features[..., feature] = torch.where(at_images, 0.0, features[..., feature])
                return features

            hooks = [(probe_site.hook, read)]
            with torch.no_grad():
                if feature is None:
                    model.run_with_hooks(inputs, fwd_hooks=hooks, return_type=None)
                else:
                    with model.saes(saes=[sae], use_error_term=True):
                        model.run_with_hooks(inputs, fwd_hooks=[(f"{site.hook}.{FEATURES_POINT}", zero), *hooks],
                                             return_type=None)
            scores[key].add(predicted["tokens"], labels.labels, labels.valid, batch.masks,
                            probe_layout.pixels(probe_site.stage))
    weights = resample_counts(resamples, len(rows))
    counts = {key: np.stack(score.per_image).astype(np.float64) for key, score in scores.items()}
    out = []
    for (_, row), feature, other in zip(alignment.iterrows(), aligned, matched):
        c = info.class_names.index(row["class"])
        iou = {name: _class_iou(counts[key][:, :, c], weights) for name, key in
               (("clean", "clean"), ("aligned", ("aligned", feature)), ("matched", ("matched", other)))}
        point = {name: _class_iou(counts[key][:, :, c], np.ones((1, len(rows))))[0] for name, key in
                 (("clean", "clean"), ("aligned", ("aligned", feature)), ("matched", ("matched", other)))}
        record = {"class": row["class"], "feature": feature, "matched_feature": other,
                  "frequency": float(frequency[feature]), "matched_frequency": float(frequency[other]),
                  "clean_iou": point["clean"], "drop": point["clean"] - point["aligned"],
                  "matched_drop": point["clean"] - point["matched"]}
        record |= _interval("drop", iou["clean"] - iou["aligned"]) | _interval("matched_drop", iou["clean"] - iou["matched"])
        record["difference"] = record["drop"] - record["matched_drop"]
        record |= _interval("difference", iou["matched"] - iou["aligned"])
        record["verdict"] = verdict(record["difference_low"], record["difference_high"])
        out.append(record)
    return pd.DataFrame(out)


def _class_iou(counts: Float[np.ndarray, "n_images 3"], weights: np.ndarray) -> np.ndarray:
    """One class's pixel IoU of each resample: summed tp / (tp + fp + fn)."""
    totals = weights @ counts
    union = totals.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, totals[:, 0] / union, np.nan)


def _findings(reconstruction: pd.DataFrame, alignment: pd.DataFrame, ablation: pd.DataFrame) -> list[str]:
    """Each result in a sentence, only as strong as its interval allows."""
    held = reconstruction.iloc[0]
    lines = [f"the SAE at {held['hook']} explains {held['variance_explained']:.3f} of the variance of "
             f"{held['n_test_tokens']} held-out image tokens ({held['n_test_images']} images) with "
             f"{held['l0']:.1f} active features per token"]
    for _, row in alignment.iterrows():
        lines.append(f"{row['class']}: feature {row['feature']}'s map has held-out IoU {_stated(row, 'iou')}; "
                     f"random features {_stated(row, 'random_iou')}; difference "
                     + effect_phrase(row["difference"], row["difference_low"], row["difference_high"], signed=True))
    for _, row in ablation.iterrows():
        lines.append(f"{row['class']}: zeroing feature {row['feature']} lowers the probe's IoU by "
                     f"{row['drop']:.3f}, a feature as frequent ({row['matched_feature']}) by {row['matched_drop']:.3f}; "
                     "difference " + effect_phrase(row["difference"], row["difference_low"], row["difference_high"],
                                                   signed=True))
    return lines


def _stated(row: pd.Series, name: str) -> str:
    return with_interval(row[name], row[f"{name}_low"], row[f"{name}_high"])


__all__ = ["SAEStudy", "sae_study"]
