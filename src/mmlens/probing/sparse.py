"""Sparse probes in the sweep: each class reads only the k dimensions that best tell it apart.

Per class, the k dimensions whose mean on the class's training tokens differs most from their mean
on the other training tokens are chosen (the mean-difference ranking of Gurnee et al. 2023,
https://arxiv.org/abs/2305.01610, which SAE sparse-probing studies use: Gao et al. 2024,
https://arxiv.org/abs/2406.04093, and Kantamneni et al. 2025, https://arxiv.org/abs/2502.16681),
then a logistic probe is fitted on the union of the chosen dimensions. The dimensions are an SAE's
features where the sweep is given an SAE at that site, and the raw activation dimensions
elsewhere. k is chosen per site by k-fold cross-validation over training images (held-out
cross-entropy, as the logistic penalty is), so the test images choose neither k nor the features.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from .. import distributed
from ..errors import InputError
from .linear import PROBE_FIELDS, SPARSE_PROBE_FORMAT, LinearProbe, probe_file_header
from .logistic import chunk_rows
from .penalty import PenaltyChoice, held_out_cross_entropy
from .store import ActivationStore, StoredFeatures

SPARSE_KS = (1, 2, 4, 8, 16)  # candidates for k (features per class) under cross-validation
# the logistic penalty of a sparse probe when `l2` is "cv": cross-validation chooses k, not both
SPARSE_L2 = 1e-3
UNCHOSEN = -1  # a class without training tokens chooses no feature


@dataclass
class SparseLinearProbe(LinearProbe):
    """A logistic probe laid out over every dimension of its basis (zero weight outside the chosen
    ones): `chosen[c]` the k dimensions chosen for class c, best first; `sae`: the SAE whose
    features are the basis (the activations are encoded first), or None for raw dimensions."""

    chosen: Int[Tensor, "n_classes k"] | None = None
    sae: Any = field(default=None, repr=False)

    @property
    def features(self) -> Int[Tensor, "n_chosen"]:
        """Every dimension the probe reads, sorted."""
        chosen = self.chosen.flatten()
        return chosen[chosen != UNCHOSEN].unique()

    def logits(self, x: Float[Tensor, "n d"]) -> Float[Tensor, "n n_classes"]:
        return super().logits(in_basis(self.sae, x))

    def to(self, device: torch.device | str) -> "SparseLinearProbe":
        sae = None if self.sae is None else self.sae.to(device)
        return SparseLinearProbe(*(t.to(device) for t in (self.mean, self.scale, self.weight, self.bias)),
                                 kind=self.kind, chosen=self.chosen, sae=sae)

    def save(self, path: str | os.PathLike) -> Path:
        """Write this probe, its chosen dimensions and its SAE (weights and SAELens config) to one
        safetensors file; `SparseLinearProbe.load` reads it back (`LinearProbe.load` refuses it)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in PROBE_FIELDS}
        if self.chosen is None:
            raise InputError("this sparse probe has no chosen dimensions; fit it with probe_sweep(probe='sparse')")
        tensors["chosen"] = self.chosen.detach().cpu().contiguous()
        metadata = {"kind": self.kind, "format": SPARSE_PROBE_FORMAT, "sae": "null"}
        if self.sae is not None:
            tensors |= {f"sae.{name}": t.detach().cpu().contiguous() for name, t in self.sae.state_dict().items()}
            metadata["sae"] = json.dumps(self.sae.cfg.to_sae_lens_dict())
        save_file(tensors, str(path), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> "SparseLinearProbe":
        """The sparse probe `SparseLinearProbe.save` wrote at `path`, with its chosen dimensions and SAE."""
        path = Path(path)
        metadata, missing = probe_file_header(path, (*PROBE_FIELDS, "chosen"))
        if metadata.get("format") != SPARSE_PROBE_FORMAT:
            raise InputError(f"{path} is not a sparse probe saved by mmlens (format {metadata.get('format')!r}); "
                             "read a dense probe with LinearProbe.load")
        if missing:
            raise InputError(f"{path} is not a sparse probe saved by mmlens (missing {missing})")
        tensors = load_file(str(path))
        sae = None
        if metadata.get("sae", "null") != "null":
            from ..sae import SAEConfig, sae_from_weights  # the SAE layer sits above probing

            cfg = SAEConfig.from_sae_lens_dict(json.loads(metadata["sae"]))
            cfg.device = "cpu"
            sae = sae_from_weights(cfg, {k[4:]: t for k, t in tensors.items() if k.startswith("sae.")})
        probe = cls(*(tensors[name] for name in PROBE_FIELDS), kind=metadata.get("kind", "sparse"),
                    chosen=tensors["chosen"], sae=sae)
        return probe.to(device)


def in_basis(sae, x: Float[Tensor, "n d"]) -> Float[Tensor, "n width"]:
    """The activations in the probe's basis: the SAE's features, or the activations themselves."""
    if sae is None:
        return x
    with torch.no_grad():
        return sae.encode(x.to(sae.W_enc.device, sae.W_enc.dtype)).float()


def mean_difference_ranking(sums: Float[Tensor, "n_classes width"], counts: Int[Tensor, "n_classes"],
                            k: int, *, absolute: bool = True) -> Int[Tensor, "n_classes k"]:
    """Per class the k dimensions whose mean on its tokens differs most from the mean on the other
    tokens, from per-class sums and token counts; a class without tokens gets `UNCHOSEN`.

    `absolute` (raw activation dimensions): ranked by |difference|, so a dimension that marks a
    class by low values is chosen as readily as one that marks it by high values; the linear probe
    fitted on the chosen dimensions reads either sign. The difference is not standardised by a
    pooled standard deviation (only first moments are kept; the probe standardises its inputs
    afterwards). `absolute=False` (SAE features): the signed difference, largest first. SAE
    features are non-negative and sparse: a feature "marks" a class by firing on it, and a
    negative difference only says it fires elsewhere, which a feature chosen for another class
    already carries (Gao et al. 2024 and Kantamneni et al. 2025 rank SAE latents this way)."""
    counts = counts.to(sums.device, sums.dtype)
    inside = sums / counts.clamp(min=1)[:, None]
    outside = (sums.sum(0) - sums) / (counts.sum() - counts).clamp(min=1)[:, None]
    difference = inside - outside
    chosen = (difference.abs() if absolute else difference).topk(k, dim=1).indices
    chosen[counts == 0] = UNCHOSEN
    return chosen


def check_sparse_saes(saes: Any, hooks: list[str], resolve: Callable[[str], str]) -> list:
    """The sweep's SAEs as a list (an SAE, a saved SAE's path, or a list of them), each at one of
    the probed `hooks` (`resolve` turns an alias into the model's name), at most one per site."""
    if saes is None:
        return []
    from ..sae import SAE, load_sae  # the SAE layer sits above probing: imported only when used

    found = []
    for sae in saes if isinstance(saes, (list, tuple)) else [saes]:
        sae = sae if isinstance(sae, SAE) else load_sae(sae)
        if sae.cfg.hook_name is None:
            raise InputError(f"{sae!r} names no hook point; load it with mmlens.load_sae(path, hook_name=...)")
        hook = resolve(sae.cfg.hook_name)
        if hook not in hooks:
            raise InputError(f"the SAE reads {hook}, which the sweep does not probe; add it to sites "
                             f"(probed: {', '.join(hooks)})")
        found.append((hook, sae))
    repeated = sorted({hook for hook, _ in found if [h for h, _ in found].count(hook) > 1})
    if repeated:
        raise InputError(f"several SAEs at {', '.join(repeated)}; give a sparse sweep one SAE per site")
    return found


def sae_at(saes: list, hook: str):
    return next((sae for where, sae in saes if where == hook), None)


class ChosenFeatures:
    """Training tokens of a store in the probe's basis, only the chosen columns (a `Features`
    source for `fit_logistic_many`), read `rows` tokens at a time so the full basis stays bounded."""

    def __init__(self, source: StoredFeatures, sae, columns: Tensor, rows: int):
        self.source, self.sae, self.rows = source, sae, rows
        self.columns = columns
        self.n, self.d = source.n, len(columns)

    def chunks(self, rows: int):
        for x, y in self.source.chunks(min(rows, self.rows)):
            yield in_basis(self.sae, x)[:, self.columns.to(x.device if self.sae is None else self.sae.W_enc.device)], y


def sparse_problem(store: ActivationStore, label_set: int, hook: str, cfg, n_classes: int, n_folds: int, fit,
                   group=None) -> tuple[PenaltyChoice, Callable[..., SparseLinearProbe]]:
    """The k a site's sparse probe uses (its cross-validation over the store's folds when
    `cfg.sparse_k` is "cv") and `solve(k)`, which fits the probe on every training token.
    `fit(sources, l2, inits)` is the sweep's logistic fit."""
    sae = sae_at(cfg.sae or [], hook)
    if sae is not None and sae.cfg.d_in != store.d:
        raise InputError(f"the SAE at {hook} reads {sae.cfg.d_in} dimensions but the site has {store.d}; "
                         "give the SAE trained at this site of this model")
    width = store.d if sae is None else sae.cfg.d_sae
    rows = chunk_rows(width, n_classes, cfg.logistic_memory_mb)
    l2 = SPARSE_L2 if isinstance(cfg.l2, str) else cfg.l2
    cv = isinstance(cfg.sparse_k, str)
    ks = tuple(int(k) for k in cfg.candidates) if cv else (int(cfg.sparse_k),)
    if max(ks) > width:
        raise InputError(f"k up to {max(ks)} features per class, but {hook} has {width} "
                         f"{'SAE features' if sae is not None else 'dimensions'}; lower sparse_k / sparse_ks")
    sums, counts = _fold_sums(store, label_set, n_folds, sae, rows, n_classes, width, group)

    def chosen_columns(fold_sums, fold_counts, k):
        chosen = mean_difference_ranking(fold_sums, fold_counts, k, absolute=sae is None)
        return chosen, chosen[chosen != UNCHOSEN].unique()

    def solve(k: float, init=None) -> SparseLinearProbe:
        chosen, columns = chosen_columns(sums.sum(0), counts.sum(0), int(k))
        inner = fit([ChosenFeatures(store.features(label_set), sae, columns, rows)], l2, [None])[0]
        return _laid_out(inner, chosen, columns, width, sae)

    if not cv:
        return PenaltyChoice(tuple(float(k) for k in ks), (np.nan,), float(ks[0])), solve
    losses, held_tokens = np.zeros(len(ks)), 0.0
    for held in range(n_folds):
        ranked, _ = chosen_columns(sums.sum(0) - sums[held], counts.sum(0) - counts[held], max(ks))
        train = store.features(label_set, folds=[f for f in range(n_folds) if f != held])
        held_out = store.features(label_set, folds=[held])
        for a, k in enumerate(ks):
            chosen = ranked[:, :k]
            columns = chosen[chosen != UNCHOSEN].unique()
            inner = fit([ChosenFeatures(train, sae, columns, rows)], l2, [None])[0]
            total, n = held_out_cross_entropy(inner, ChosenFeatures(held_out, sae, columns, rows), rows)
            found = torch.tensor([total, float(n)], dtype=torch.float64)
            distributed.all_reduce_sum(found, group)
            losses[a] += float(found[0])
            held_tokens += float(found[1]) if a == 0 else 0.0
    if held_tokens == 0:
        raise InputError(f"no training tokens at {hook} to cross-validate k on")
    return PenaltyChoice.from_losses(tuple(float(k) for k in ks), losses / held_tokens), solve


def _fold_sums(store, label_set, n_folds, sae, rows, n_classes, width, group):
    """Per fold of training images, each class's summed basis values and token count (over ranks)."""
    sums = torch.zeros(n_folds, n_classes, width, dtype=torch.float64)
    counts = torch.zeros(n_folds, n_classes, dtype=torch.float64)
    for fold in range(n_folds):
        for x, y in store.features(label_set, folds=None if n_folds == 1 else [fold]).chunks(rows):
            sums[fold].index_add_(0, y, in_basis(sae, x).double().cpu())
            counts[fold] += torch.bincount(y, minlength=n_classes).double()
    distributed.all_reduce_sum(sums, group)
    distributed.all_reduce_sum(counts, group)
    return sums, counts


def _laid_out(inner: LinearProbe, chosen: Tensor, columns: Tensor, width: int, sae) -> SparseLinearProbe:
    """The probe fitted on the chosen columns, laid out over the whole basis."""
    device = inner.weight.device
    columns = columns.to(device)
    mean = torch.zeros(width, dtype=inner.mean.dtype, device=device)
    scale = torch.ones(width, dtype=inner.scale.dtype, device=device)
    weight = torch.zeros(width, inner.n_classes, dtype=inner.weight.dtype, device=device)
    mean[columns], scale[columns], weight[columns] = inner.mean, inner.scale, inner.weight
    return SparseLinearProbe(mean, scale, weight, inner.bias, kind="sparse", chosen=chosen.cpu(), sae=sae)


# ----------------------------------------------------------------- saving (probing.saving)
def add_sparse_parts(sweep, probes: dict[str, Tensor], description: dict) -> None:
    """Put a sweep's sparse-probe extras into its saved parts: each probe's chosen dimensions, each
    SAE's weights (beside the probes) and config (in the description, keyed by site)."""
    saes = sweep.settings.sae or []
    description["settings"]["sae"] = [hook for hook, _ in saes] or None
    description["sparse_saes"] = {hook: sae.cfg.to_sae_lens_dict() for hook, sae in saes}
    for hook, sae in saes:
        for name, tensor in sae.state_dict().items():
            probes[f"sae|{hook}|{name}"] = tensor
    for (condition, hook), probe in sweep.probes.items():
        if isinstance(probe, SparseLinearProbe):
            probes[f"{condition}|{hook}|chosen"] = probe.chosen


def restore_sparse(sweep, probes: dict[str, Tensor], description: dict):
    """The sweep `sweep_from_parts` rebuilt, with its sparse probes and SAEs back (in place)."""
    stored = description.get("sparse_saes") or {}
    if not stored and sweep.settings.probe != "sparse":
        return sweep
    from ..sae import SAEConfig, sae_from_weights

    saes = []
    for hook, saved in stored.items():
        prefix = f"sae|{hook}|"
        weights = {key[len(prefix):]: tensor for key, tensor in probes.items() if key.startswith(prefix)}
        saes.append((hook, sae_from_weights(SAEConfig.from_sae_lens_dict(saved), weights)))
    sweep.settings.sae = saes or None
    for (condition, hook), probe in list(sweep.probes.items()):
        if probe.kind == "sparse":
            sweep.probes[(condition, hook)] = SparseLinearProbe(
                probe.mean, probe.scale, probe.weight, probe.bias, kind="sparse",
                chosen=probes[f"{condition}|{hook}|chosen"], sae=sae_at(saes, hook)).to(probe.weight.device)
    return sweep


__all__ = ["SPARSE_KS", "SPARSE_L2", "SparseLinearProbe", "add_sparse_parts", "check_sparse_saes",
           "mean_difference_ranking", "restore_sparse", "sparse_problem"]
