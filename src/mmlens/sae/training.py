"""Training SAEs on image-token activations, with SAELens's objectives.

The loss is SAELens 6's `TrainingSAE.training_forward_pass`: the squared reconstruction error
summed over the input's width and averaged over tokens, plus one term per architecture (its
`calculate_aux_loss`): ReLU SAEs pay an L1 penalty on feature activations weighted by their
decoder norms, with the coefficient warmed up linearly (Bricken et al. 2023; Anthropic's April 2024
update); JumpReLU SAEs pay an L0 penalty through a straight-through step function with a rectangle
kernel, learning log-thresholds (Rajamanoharan et al. 2024, arXiv:2407.14435); TopK SAEs (Gao et al.
2024, arXiv:2406.04093) and BatchTopK SAEs (Bussmann et al. 2024, arXiv:2412.06410) pay the aux-k
loss, in which the features dead for `dead_feature_window` steps reconstruct the live features'
residual, and BatchTopK learns the threshold it runs with as a moving average of the smallest kept
activation. Activations are scaled to mean norm sqrt(d_in) while training (SAELens's
`expected_average_only_in`) and the scale and the decoder norms are folded into the weights after,
so the saved SAE reads raw activations and has unit-norm decoder rows (SAELens's `fold_W_dec_norm`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from ..errors import InputError
from ..interventions.groups import TokenGroup
from ..model import HookedMLLM
from ..probing.sites import site_for
from .activations import TokenActivations, image_token_activations
from .config import SAEConfig
from .sae import SAE

TRAINABLE = ("standard", "topk", "batchtopk", "jumprelu")


@dataclass
class TrainingSettings:
    """What `train_sae` trains; the defaults are SAELens 6's where SAELens has one."""

    architecture: str = "standard"
    d_sae: int = 1024
    k: int | None = None  # topk, batchtopk: active features per token (on average over the batch for batchtopk)
    steps: int = 2000
    batch_size: int = 512  # tokens per step
    lr: float = 3e-4
    adam_betas: tuple[float, float] = (0.9, 0.999)
    l1_coefficient: float = 1.0  # standard
    l1_warm_up_steps: int = 0
    lp_norm: float = 1.0
    l0_coefficient: float = 1.0  # jumprelu
    l0_warm_up_steps: int = 0
    jumprelu_init_threshold: float = 0.001
    jumprelu_bandwidth: float = 0.001
    aux_loss_coefficient: float = 1.0  # topk, batchtopk
    topk_threshold_lr: float = 0.01  # batchtopk
    dead_feature_window: int = 1000  # steps without firing after which a feature counts as dead
    decoder_init_norm: float = 0.1
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"

    def check(self) -> None:
        problems = []
        if self.architecture not in TRAINABLE:
            problems.append(f"architecture must be one of {', '.join(TRAINABLE)}, got {self.architecture!r}")
        for name in ("d_sae", "steps", "batch_size", "log_every", "dead_feature_window"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if self.architecture in ("topk", "batchtopk") and not (isinstance(self.k, int) and 0 < self.k <= self.d_sae):
            problems.append(f"a {self.architecture} SAE needs k, an integer in 1..d_sae={self.d_sae}, got {self.k!r}")
        for name in ("lr", "jumprelu_init_threshold", "jumprelu_bandwidth", "decoder_init_norm"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)!r}")
        if problems:
            raise InputError("SAE training: " + "; ".join(problems))


@dataclass(frozen=True)
class SAEEvaluation:
    """How an SAE does on tokens it did not train on."""

    variance_explained: float  # 1 - sum |x - x_hat|^2 / sum |x - mean x|^2 over the tokens
    mse: float  # squared error per token, summed over the width
    l0: float  # active features per token, on average
    dead_features: int  # features active on none of the tokens
    n_tokens: int


@dataclass
class SAETraining:
    """A trained SAE, its training log (one row every `log_every` steps) and its held-out scores."""

    sae: SAE
    log: pd.DataFrame  # step, loss, mse, sparsity_loss, aux_loss, l0, variance_explained, dead_features
    held_out: SAEEvaluation | None
    settings: TrainingSettings = field(repr=False)


def train_sae(
    model: HookedMLLM,
    images_or_scenes: Any,
    hook_name: str,
    *,
    tokens: TokenGroup | None = None,
    held_out: Any = None,
    prompt: str = "",
    image_batch_size: int = 16,
    **settings: Any,
) -> SAETraining:
    """Train an SAE on `hook_name`'s activations at the chosen image tokens (`tokens`, default
    every image token) of `images_or_scenes` (a list of images or an mmlens segmentation dataset),
    and score it on `held_out` images (never the training ones) when given. Other keywords are
    `TrainingSettings` fields (`architecture`, `d_sae`, `k`, `steps`, `lr`, `seed`, `device`, ...).
    Everything is checked before the first forward."""
    cfg = TrainingSettings(**settings)
    cfg.check()
    site = site_for(model, hook_name)
    _check_disjoint(images_or_scenes, held_out)
    stream = dict(tokens=tokens, prompt=prompt, batch_size=image_batch_size, device=cfg.device)
    with torch.no_grad():
        train = image_token_activations(model, images_or_scenes, site.hook, **stream)
        test = image_token_activations(model, held_out, site.hook, **stream) if held_out is not None else None
    metadata = {"hook_name": site.hook, "model_name": model_name_for_files(model),
                "mmlens_tokens": (tokens or TokenGroup.image()).description, "prompt": prompt}
    return train_sae_on_activations(train, held_out=test, metadata=metadata, **asdict(cfg))


def train_sae_on_activations(
    activations: Float[Tensor, "n_tokens d_in"] | TokenActivations,
    *,
    held_out: Float[Tensor, "n_held_out d_in"] | TokenActivations | None = None,
    metadata: dict[str, Any] | None = None,
    **settings: Any,
) -> SAETraining:
    """Train an SAE on activations already gathered (rows are tokens). Deterministic for a seed
    on one device."""
    cfg = TrainingSettings(**settings)
    cfg.check()
    x = _rows(activations).to(cfg.device)
    if len(x) < 2:
        raise InputError(f"an SAE needs at least 2 training tokens, got {len(x)}")
    metadata = dict(metadata or {})
    if isinstance(activations, TokenActivations):
        metadata.setdefault("hook_name", activations.hook_name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        state = _TrainingState(cfg, x, metadata)
    with torch.enable_grad():  # callers often run under no_grad (examples, benchmarks, notebooks)
        log = state.run()
    sae = state.finished_sae()
    evaluation = evaluate_sae(sae, _rows(held_out)) if held_out is not None else None
    return SAETraining(sae, log, evaluation, cfg)


@torch.no_grad()
def evaluate_sae(sae: SAE, activations: Float[Tensor, "n_tokens d_in"] | TokenActivations,
                 batch_size: int = 4096) -> SAEEvaluation:
    """Variance explained, squared error, L0 and dead features of `sae` on these tokens."""
    x = _rows(activations).to(sae.W_enc.device, sae.cfg.torch_dtype)
    if not len(x):
        raise InputError("no tokens to evaluate the SAE on")
    error = l0 = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool, device=x.device)
    for chunk in x.split(batch_size):
        features = sae.encode(chunk)
        error += float((sae.decode(features) - chunk).double().pow(2).sum())
        active = features > 0
        l0 += float(active.sum())
        fired |= active.any(0)
    total = float((x.double() - x.double().mean(0)).pow(2).sum())
    return SAEEvaluation(1 - error / total, error / len(x), l0 / len(x), int((~fired).sum()), len(x))


def _rows(activations: Tensor | TokenActivations) -> Tensor:
    return (activations.activations if isinstance(activations, TokenActivations) else activations).float()


class _TrainingState:
    """The parameters being trained (SAELens's training parameterisation) and the loop."""

    def __init__(self, cfg: TrainingSettings, x: Tensor, metadata: dict[str, Any]):
        self.cfg, self.architecture = cfg, cfg.architecture
        # SAELens's expected_average_only_in: inputs scaled to mean norm sqrt(d_in), folded in after
        self.scale = float(x.shape[1] ** 0.5 / x.norm(dim=-1).mean().clamp(min=1e-12))
        self.x = x * self.scale
        self.sae = SAE(SAEConfig(self.architecture, x.shape[1], cfg.d_sae, k=cfg.k, device=cfg.device,
                                 rescale_acts_by_decoder_norm=self.architecture in ("topk", "batchtopk"),
                                 metadata=metadata)).to(cfg.device)
        sae = self.sae
        with torch.no_grad():
            sae.W_dec.mul_(cfg.decoder_init_norm / sae.W_dec.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_dec.copy_(self.x.mean(0))  # SAELens's b_dec_init_method="mean"
        self.params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
        if self.architecture == "jumprelu":
            self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), float(np.log(cfg.jumprelu_init_threshold)),
                                                               device=cfg.device))
            self.params.append(self.log_threshold)
        self.topk_threshold = torch.zeros((), dtype=torch.float64, device=cfg.device)
        self.steps_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long, device=cfg.device)
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, betas=cfg.adam_betas)
        self.generator = torch.Generator().manual_seed(cfg.seed)

    def run(self) -> pd.DataFrame:
        cfg, rows, order, at = self.cfg, [], torch.empty(0, dtype=torch.long), 0
        for step in range(cfg.steps):
            if at + cfg.batch_size > len(order):  # a fresh seeded pass over the tokens
                order, at = torch.randperm(len(self.x), generator=self.generator), 0
            batch = self.x[order[at:at + cfg.batch_size].to(self.x.device)]
            at += cfg.batch_size
            losses, features, recons = self.losses(batch, step)
            self.optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            self.optimizer.step()
            with torch.no_grad():
                fired = (features > 0).any(0)
                self.steps_since_fired = torch.where(fired, 0, self.steps_since_fired + 1)
                if self.architecture == "batchtopk" and (features > 0).any():
                    lr = cfg.topk_threshold_lr
                    smallest = features[features > 0].min().double()
                    self.topk_threshold = (1 - lr) * self.topk_threshold + lr * smallest
                if step % cfg.log_every == 0 or step == cfg.steps - 1:
                    variance = (batch - batch.mean(0)).pow(2).sum()
                    rows.append({"step": step, **{name: float(value) for name, value in losses.items()},
                                 "l0": float((features > 0).sum(-1).float().mean()),
                                 "variance_explained": float(1 - (recons - batch).pow(2).sum() / variance),
                                 "dead_features": int((self.steps_since_fired >= cfg.dead_feature_window).sum())})
        return pd.DataFrame(rows)

    def losses(self, x: Tensor, step: int) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        """SAELens's training forward pass: (losses, feature activations, reconstruction)."""
        sae, cfg = self.sae, self.cfg
        hidden_pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        decoder_norm = sae.W_dec.norm(dim=-1)
        sparsity = aux = x.new_zeros(())
        if self.architecture == "standard":
            features = hidden_pre.relu()
            weighted = (features * decoder_norm).norm(p=cfg.lp_norm, dim=-1)
            sparsity = (_warm_up(cfg.l1_coefficient, cfg.l1_warm_up_steps, step) * weighted).mean()
            recons = features @ sae.W_dec + sae.b_dec
        elif self.architecture == "jumprelu":
            threshold = self.log_threshold.exp()
            features = _JumpReLU.apply(hidden_pre, threshold, cfg.jumprelu_bandwidth)
            l0 = _Step.apply(hidden_pre, threshold, cfg.jumprelu_bandwidth).sum(-1)
            sparsity = (_warm_up(cfg.l0_coefficient, cfg.l0_warm_up_steps, step) * l0).mean()
            recons = features @ sae.W_dec + sae.b_dec
        else:  # topk and batchtopk choose by pre-activation times decoder norm (rescale_acts_by_decoder_norm)
            scaled = hidden_pre * decoder_norm
            features = sae.batch_topk(scaled) if self.architecture == "batchtopk" else _topk(scaled, cfg.k)
            recons = (features / decoder_norm) @ sae.W_dec + sae.b_dec
            aux = cfg.aux_loss_coefficient * self._aux_k_loss(x, recons, scaled, decoder_norm)
        mse = (recons - x).pow(2).sum(-1).mean()
        return {"loss": mse + sparsity + aux, "mse": mse, "sparsity_loss": sparsity, "aux_loss": aux}, features, recons

    def _aux_k_loss(self, x: Tensor, recons: Tensor, scaled: Tensor, decoder_norm: Tensor) -> Tensor:
        """SAELens's `calculate_topk_aux_loss`: the top k_aux dead features reconstruct the
        residual the live ones leave, scaled down while few features are dead."""
        dead = self.steps_since_fired >= self.cfg.dead_feature_window
        n_dead = int(dead.sum())
        if n_dead == 0:
            return x.new_zeros(())
        k_aux = x.shape[-1] // 2
        scale = min(n_dead / k_aux, 1.0)
        top = torch.where(dead[None], scaled, -torch.inf).topk(min(k_aux, n_dead), dim=-1, sorted=False)
        aux_features = torch.zeros_like(scaled).scatter(-1, top.indices, top.values)
        aux_recons = (aux_features / decoder_norm) @ self.sae.W_dec + self.sae.b_dec
        residual = (x - recons).detach()
        return scale * (aux_recons - residual).pow(2).sum(-1).mean()

    @torch.no_grad()
    def finished_sae(self) -> SAE:
        """The trained SAE with the input scale and the decoder norms folded into its weights."""
        sae, s = self.sae, self.scale
        sae.W_enc.mul_(s)  # reads raw activations: (x - b_dec / s) (s W_enc) = (s x - b_dec) W_enc
        sae.b_dec.div_(s)
        sae.W_dec.div_(s)
        norm = sae.W_dec.norm(dim=-1).clamp(min=1e-12)
        sae.W_enc.mul_(norm)
        sae.b_enc.mul_(norm)
        sae.W_dec.div_(norm[:, None])
        if self.architecture == "jumprelu":
            sae.threshold.copy_(self.log_threshold.exp() * norm)
        if self.architecture == "batchtopk":  # chosen on pre-activation x decoder norm: the folded pre-activation
            sae.threshold.fill_(float(self.topk_threshold) / s)
        sae.cfg.rescale_acts_by_decoder_norm = False
        for param in sae.parameters():
            param.requires_grad_(False)
        return sae.eval()


def _topk(scaled: Tensor, k: int) -> Tensor:
    top = scaled.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(scaled).scatter(-1, top.indices, top.values.relu())


def _warm_up(value: float, warm_up_steps: int, step: int) -> float:
    """SAELens's `TrainCoefficientConfig`: the coefficient rises linearly over its warm-up steps."""
    return value if warm_up_steps <= 0 else value * min(1.0, (step + 1) / warm_up_steps)


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _Step(torch.autograd.Function):
    """Heaviside step H(x - threshold); gradient to the threshold through a rectangle kernel of
    width `bandwidth` (Rajamanoharan et al. 2024, eq. 11; SAELens's `Step`)."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad = -(1.0 / bandwidth) * _rectangle((x - threshold) / bandwidth) * grad_output
        return None, grad.sum(0), None


class _JumpReLU(torch.autograd.Function):
    """x H(x - threshold); straight-through to x where active, kernel gradient to the threshold
    (SAELens's `JumpReLU`)."""

    @staticmethod
    def forward(ctx, x: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(x, threshold)
        ctx.bandwidth = bandwidth
        return x * (x > threshold).to(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        x, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_threshold = -(threshold / bandwidth) * _rectangle((x - threshold) / bandwidth) * grad_output
        return (x > threshold).to(x) * grad_output, grad_threshold.sum(0), None


def model_name_for_files(model: HookedMLLM) -> str:
    """SAELens's `model_name`: the hub id, or a local checkpoint's folder name (a path on this
    machine means nothing elsewhere; the shipped models load by that name)."""
    name = str(getattr(model.hf_model.config, "_name_or_path", "") or "")
    return Path(name).name if name and Path(name).is_dir() else name


def _check_disjoint(train: Any, held_out: Any) -> None:
    """Held-out scenes must not be training scenes (compared by their dataset `id`)."""
    ids = [set(source["id"]) for source in (train, held_out)
           if source is not None and "id" in getattr(source, "column_names", ())]
    if len(ids) == 2 and ids[0] & ids[1]:
        shared = sorted(ids[0] & ids[1])
        raise InputError(f"{len(shared)} held-out scenes are also training scenes ({shared[:3]} ...): score an SAE on "
                         "images it did not train on (split with mmlens.probing.split.split_images)")
