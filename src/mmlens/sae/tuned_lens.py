"""The tuned lens (Belrose et al. 2023, "Eliciting latent predictions from transformers with the tuned
lens", https://arxiv.org/abs/2303.08112): one affine translator per LLM layer, trained so that
each layer's residual, corrected by it, decodes through the final norm and unembedding to the model's
own final prediction.

The paper's parametrisation and objective: the translator is a residual correction,
`h + A h + b` with `A` and `b` starting at zero (so an untrained lens is the logit lens), and it is
fitted to minimise the KL divergence from the model's final distribution to the lens's, summed over
layers and averaged over tokens; the final residual keeps no translator. Here the residuals are
those of image tokens (a `TokenGroup` to choose) of training images, read in one cached forward per
batch (`lens_maps.lens_stack`, the LLM's `hook_resid_pre` / `hook_resid_post` only), and the
translators are fitted with Adam and a linearly decaying learning rate (the paper uses SGD with
Nesterov momentum at a learning rate of 1 on millions of tokens; Adam converges on the few
thousand tokens a study holds). `logit_lens_maps(..., lens=...)` draws its maps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..errors import InputError
from ..interventions.groups import GroupContext, TokenGroup
from ..model import HookedMLLM
from ..probing.sites import site_for
from .activations import image_batches, chosen_image_tokens
from .lens_maps import lens_stack
from .training import model_name_for_files

CONFIG_FILE, WEIGHTS_FILE = "tuned_lens.json", "tuned_lens.safetensors"


class TunedLens(nn.Module):
    """One affine translator per LLM layer, applied to the residual entering that layer as
    `h + translator(h)`; the final residual ("final_post") passes unchanged."""

    def __init__(self, d_model: int, n_layers: int, model_name: str = "", tokens: str = "image tokens"):
        super().__init__()
        self.d_model, self.n_layers, self.model_name, self.tokens = d_model, n_layers, model_name, tokens
        self.translators = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(n_layers))
        for translator in self.translators:  # identity: an untrained tuned lens is the logit lens
            nn.init.zeros_(translator.weight)
            nn.init.zeros_(translator.bias)

    @classmethod
    def for_model(cls, model: HookedMLLM, tokens: str = "image tokens") -> "TunedLens":
        """An identity lens shaped for `model`'s LLM, on its device."""
        lens = cls(model.cfg.d_model, model.cfg.n_layers, model_name_for_files(model), tokens)
        return lens.to(model.cfg.device)

    def forward(self, stack: Float[Tensor, "entries *rows d_model"]) -> Float[Tensor, "entries *rows d_model"]:
        """The accumulated residuals "0_pre" ... "final_post" (`cache.accumulated_resid()`) translated."""
        if stack.shape[0] != self.n_layers + 1 or stack.shape[-1] != self.d_model:
            raise InputError(f"a tuned lens of {self.n_layers} layers and width {self.d_model} reads a stack of "
                             f"{self.n_layers + 1} residuals of that width, got shape {tuple(stack.shape)}")
        translated = [h + translator(h.to(translator.weight.dtype)).to(h.dtype)
                      for h, translator in zip(stack[:-1], self.translators)]
        return torch.stack([*translated, stack[-1]])

    def check_model(self, model: HookedMLLM) -> None:
        """Refuse a model whose LLM this lens was not trained on (width or depth differ)."""
        if (model.cfg.d_model, model.cfg.n_layers) != (self.d_model, self.n_layers):
            raise InputError(
                f"this tuned lens was trained on {self.model_name or 'a model'} (d_model={self.d_model}, "
                f"n_layers={self.n_layers}); {model_name_for_files(model) or 'the model given'} has d_model={model.cfg.d_model}, "
                f"n_layers={model.cfg.n_layers}: train one on this model with mmlens.sae.train_tuned_lens")

    def config(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "d_model": self.d_model, "n_layers": self.n_layers,
                "tokens": self.tokens, "translated": [f"{layer}_pre" for layer in range(self.n_layers)]}

    def save(self, path: str | Path) -> Path:
        """A folder with `tuned_lens.safetensors` (the translators) and `tuned_lens.json` (the model,
        its width and depth, the tokens it was trained on)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()},
                  str(folder / WEIGHTS_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self.config(), indent=2))
        return folder

    @classmethod
    def from_weights(cls, config: dict[str, Any], weights: dict[str, Tensor]) -> "TunedLens":
        """A lens from its `config()` and `state_dict()` (as a run folder stores them)."""
        lens = cls(config["d_model"], config["n_layers"], config.get("model_name", ""), config.get("tokens", ""))
        expected = set(lens.state_dict())
        if set(weights) != expected:
            raise InputError(f"tuned lens weights {sorted(set(weights) ^ expected)[:4]} do not match a lens of "
                             f"{config['n_layers']} layers (translators.0 .. translators.{config['n_layers'] - 1})")
        lens.load_state_dict(weights)
        return lens

    @classmethod
    def load(cls, path: str | Path, model: HookedMLLM | None = None) -> "TunedLens":
        """A lens saved by `save`; with `model`, checked against it and moved to its device."""
        folder = Path(path)
        missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / name).is_file()]
        if missing:
            raise InputError(f"{folder} is not a saved tuned lens: {', '.join(missing)} missing "
                             "(save one with TunedLens.save)")
        lens = cls.from_weights(json.loads((folder / CONFIG_FILE).read_text()), load_file(str(folder / WEIGHTS_FILE)))
        if model is not None:
            lens.check_model(model)
            lens.to(model.cfg.device)
        return lens


def lens_log_probs(model: HookedMLLM, lens: TunedLens | None,
                   residuals: Float[Tensor, "entries rows d_model"]) -> Float[Tensor, "entries rows d_vocab"]:
    """Each entry's log-probabilities: translated (with `lens`), through the final norm, unembedded."""
    stack = residuals if lens is None else lens(residuals)
    return model.unembed(model.ln_final(stack)).float().log_softmax(-1)


@torch.no_grad()
def image_token_residuals(model: HookedMLLM, images_or_scenes: Any, tokens: TokenGroup | None = None,
                          prompt: str = "", batch_size: int = 16) -> Float[Tensor, "entries rows d_model"]:
    """Every accumulated LLM residual ("0_pre" ... "final_post") at the chosen image tokens of every
    image (a list of images, or a segmentation dataset: then `TokenGroup.of_class` can choose)."""
    site = site_for(model, "blocks.0.hook_resid_pre")
    group = tokens or TokenGroup.image()
    rows = []
    for inputs, _, llm_classes, ignore in image_batches(model, images_or_scenes, site, prompt, batch_size):
        layout = inputs.layout
        cache, _, _ = lens_stack(model, inputs)
        stack = torch.stack([layout.gather("llm", entry) for entry in cache.accumulated_resid()])
        chosen = chosen_image_tokens(site, layout, group.resolve(inputs, GroupContext(
            token_labels=llm_classes, model=model, ignore_index=ignore)))
        chosen &= layout.table("llm").present.cpu()
        rows.append(stack[:, chosen.to(stack.device)].float())
    if not rows or not sum(part.shape[1] for part in rows):
        raise InputError(f"the token group {group.description!r} chose no image token of the images given; pass "
                         "images and choose image tokens (TokenGroup.image() or a part of it)")
    return torch.cat(rows, dim=1)


@torch.no_grad()
def lens_kl(model: HookedMLLM, residuals: Float[Tensor, "entries rows d_model"],
            lens: TunedLens | None = None) -> Float[Tensor, " entries"]:
    """Per entry, the mean KL divergence (nats) from the model's final distribution to the lens's
    (the logit lens's without `lens`); the last entry is the model itself, 0."""
    log_probs = lens_log_probs(model, lens, residuals)
    return _kl(log_probs[-1], log_probs).mean(-1)


@torch.enable_grad()  # it fits translators even when called under torch.no_grad()
def train_tuned_lens(model: HookedMLLM, images_or_scenes: Any, *, tokens: TokenGroup | None = None,
                     prompt: str = "", steps: int = 300, lr: float = 1e-3, batch_size: int = 512,
                     image_batch_size: int = 16, seed: int = 0) -> TunedLens:
    """A tuned lens for `model`'s LLM, fitted on the residuals of the chosen tokens (default every
    image token) of training images: `batch_size` tokens a step, all layers at once."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1 or not lr > 0 or batch_size < 1:
        raise InputError(f"train_tuned_lens: steps and batch_size must be positive integers and lr positive, got "
                         f"steps={steps!r}, batch_size={batch_size!r}, lr={lr!r}")
    group = tokens or TokenGroup.image()
    residuals = image_token_residuals(model, images_or_scenes, group, prompt, image_batch_size)
    lens = TunedLens.for_model(model, group.description)
    target = lens_log_probs(model, None, residuals[-1:])[0].detach()
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    n_rows = residuals.shape[1]
    learning = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        for parameter in learning:  # only the translators learn: no gradient reaches the model's weights
            parameter.requires_grad_(False)
        for _ in range(steps):
            batch = torch.randint(n_rows, (min(batch_size, n_rows),), generator=generator).to(residuals.device)
            loss = _kl(target[batch], lens_log_probs(model, lens, residuals[:, batch])[:-1]).mean(-1).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    finally:
        for parameter, wanted in learning.items():
            parameter.requires_grad_(wanted)
    return lens.eval()


def _kl(target: Float[Tensor, "rows d_vocab"], log_probs: Float[Tensor, "entries rows d_vocab"]) -> Float[Tensor, "entries rows"]:
    return (target.exp() * (target - log_probs)).sum(-1)
