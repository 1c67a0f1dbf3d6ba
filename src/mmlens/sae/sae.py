"""A sparse autoencoder (or transcoder) with SAELens's maths, hook points and file format.

An SAE encodes an activation x into many sparse features f = act(W_enc^T (x - b_dec) + b_enc) and
decodes x_hat = f W_dec + b_dec (Bricken et al. 2023, "Towards Monosemanticity"). The activation is
ReLU ("standard"), JumpReLU (ReLU zeroed at or below a learned per-feature threshold; Rajamanoharan
et al. 2024, arXiv:2407.14435), TopK (the k largest pre-activations per token, then ReLU; Gao et al.
2024, arXiv:2406.04093) or BatchTopK, which SAELens runs at inference as a JumpReLU with the
threshold learned in training (Bussmann et al. 2024, arXiv:2412.06410). A transcoder reads one
point and writes another (Dunefsky et al. 2024, arXiv:2406.11944). Every step follows SAELens 6
(`sae_lens/saes/{sae,standard_sae,jumprelu_sae,topk_sae,batchtopk_sae,transcoder}.py`), including
the error term: with it, the output is x_hat + (x - x_hat computed again without hooks), so the
spliced model computes what it computed without the SAE, and the error can be edited.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint
from transformer_lens.HookedRootModule import HookedRootModule

from .config import THRESHOLD_ARCHITECTURES, SAEConfig

CFG_FILENAME = "cfg.json"  # SAELens's constants.SAE_CFG_FILENAME
WEIGHTS_FILENAME = "sae_weights.safetensors"  # SAELens's constants.SAE_WEIGHTS_FILENAME
HOOK_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_output",
               "hook_sae_recons", "hook_sae_error")


class SAE(HookedRootModule):
    """A sparse autoencoder or transcoder. `SAE(cfg)` starts from SAELens's initialisation
    (W_dec Kaiming-uniform, W_enc = W_dec^T, zero biases and thresholds); `mmlens.load_sae` reads
    trained ones. `use_error_term` makes `forward` return its input (exactly, up to float rounding)
    while the feature hooks still fire."""

    W_enc: Float[Tensor, "d_in d_sae"]
    b_enc: Float[Tensor, " d_sae"]
    W_dec: Float[Tensor, "d_sae d_out"]
    b_dec: Float[Tensor, " d_out"]

    def __init__(self, cfg: SAEConfig, use_error_term: bool = False):
        super().__init__()
        self.cfg = cfg
        self.use_error_term = use_error_term
        factory = {"dtype": cfg.torch_dtype, "device": cfg.device}
        decoder = nn.init.kaiming_uniform_(torch.empty(cfg.d_sae, cfg.d_out, **factory))
        self.W_dec = nn.Parameter(decoder)
        encoder = decoder.T.clone().contiguous() if cfg.d_out == cfg.d_in else \
            nn.init.kaiming_uniform_(torch.empty(cfg.d_in, cfg.d_sae, **factory))
        self.W_enc = nn.Parameter(encoder)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_out, **factory))
        if cfg.architecture in THRESHOLD_ARCHITECTURES:
            self.threshold = nn.Parameter(torch.zeros(cfg.d_sae, **factory))
        if cfg.has_skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, **factory))
        for name in HOOK_POINTS:
            setattr(self, name, HookPoint())
        self._hooks_silenced = False
        self._norm_state: tuple[Tensor, Tensor] | Tensor | None = None
        self._d_head: int | None = None
        self.setup()

    # ----------------------------------------------------------------- maths
    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        """Feature activations (`hook_sae_acts_post`) of x."""
        sae_in = self._fire(self.hook_sae_input, self._flatten_heads(x.to(self.cfg.torch_dtype)))
        sae_in = self._normalize_in(sae_in)
        if self.cfg.apply_b_dec_to_input:
            sae_in = sae_in - self.b_dec
        hidden_pre = self._fire(self.hook_sae_acts_pre, sae_in @ self.W_enc + self.b_enc)
        return self._fire(self.hook_sae_acts_post, self._activation(hidden_pre))

    def decode(self, feature_acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction (`hook_sae_recons`) from feature activations."""
        if self.cfg.rescale_acts_by_decoder_norm:
            feature_acts = feature_acts / self.W_dec.norm(dim=-1)
        recons = self._fire(self.hook_sae_recons, feature_acts @ self.W_dec + self.b_dec)
        if self.cfg.is_transcoder:  # SAELens leaves a transcoder's output unnormalised and unreshaped
            return recons
        return self._unflatten_heads(self._normalize_out(recons))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_out"]:
        """The reconstruction of x (a transcoder's prediction of its output point), plus the
        error term when `use_error_term` is set (SAEs only: a transcoder's error needs the output
        point's activation, see `output_with_error`)."""
        out = self._predict(x)
        if self.use_error_term and not self.cfg.is_transcoder:
            out = out + self.error(x, x)
        return self._fire(self.hook_sae_output, out)

    def error(self, x: Float[Tensor, "... d_in"], target: Float[Tensor, "... d_out"]) -> Float[Tensor, "... d_out"]:
        """`hook_sae_error`: target minus the reconstruction of x computed again with every SAE
        hook silenced, so editing features changes the output and the error does not follow
        (SAELens's `forward` with `use_error_term`)."""
        with torch.no_grad(), self._silenced():
            clean = self._predict(x)
        return self._fire(self.hook_sae_error, target.to(clean.dtype) - clean)

    def output_with_error(self, x: Float[Tensor, "... d_in"], target: Float[Tensor, "... d_out"]) -> Float[Tensor, "... d_out"]:
        """A transcoder's prediction from x plus the error against the output point's `target`:
        equal to `target` up to float rounding, with the features' hooks live."""
        return self._fire(self.hook_sae_output, self._predict(x) + self.error(x, target))

    def _predict(self, x: Tensor) -> Tensor:
        out = self.decode(self.encode(x))
        if self.cfg.has_skip:  # SAELens's SkipTranscoder.forward
            out = out + x.to(self.cfg.torch_dtype) @ self.W_skip.T
        return out

    def _activation(self, hidden_pre: Tensor) -> Tensor:
        architecture = self.cfg.architecture
        if architecture in THRESHOLD_ARCHITECTURES:
            return hidden_pre.relu() * (hidden_pre > self.threshold).to(hidden_pre.dtype)
        if architecture == "topk":
            if self.cfg.rescale_acts_by_decoder_norm:
                hidden_pre = hidden_pre * self.W_dec.norm(dim=-1)
            top = torch.topk(hidden_pre, k=self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())
        return hidden_pre.relu()

    def batch_topk(self, hidden_pre: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_sae"]:
        """BatchTopK's training-time selection: the k x n_tokens largest ReLU'd pre-activations of
        the whole batch (SAELens's `BatchTopK`); inference uses `threshold` instead."""
        acts = hidden_pre.relu()
        flat = acts.flatten()
        top = torch.topk(flat, int(self.cfg.k * acts.shape[:-1].numel()), dim=-1)
        return torch.zeros_like(flat).scatter(-1, top.indices, top.values).reshape(acts.shape)

    # SAELens's run-time normalisations (`SAE._setup_activation_normalization`); the input's
    # statistics are kept until the reconstruction is scaled back
    def _normalize_in(self, x: Tensor) -> Tensor:
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            self._norm_state = (self.cfg.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * self._norm_state
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            x = x - mu
            std = x.std(dim=-1, keepdim=True)
            self._norm_state = (mu, std)
            return x / (std + 1e-5)
        return x  # "expected_average_only_in" is folded into the weights when the scale is known

    def _normalize_out(self, x: Tensor) -> Tensor:
        mode, state = self.cfg.normalize_activations, self._norm_state
        if mode == "constant_norm_rescale":
            return x / state
        if mode == "layer_norm":
            mu, std = state
            return x * std + mu
        return x

    # hook_z SAEs read (n_heads, d_head) per position as one vector (SAELens's reshape_activations)
    def _flatten_heads(self, x: Tensor) -> Tensor:
        if self.cfg.reshape_activations != "hook_z":
            return x
        self._d_head = x.shape[-1]
        return x.flatten(-2)

    def _unflatten_heads(self, x: Tensor) -> Tensor:
        if self.cfg.reshape_activations != "hook_z":
            return x
        return x.unflatten(-1, (-1, self._d_head))

    def _fire(self, point: HookPoint, x: Tensor) -> Tensor:
        return x if self._hooks_silenced else point(x)

    @contextmanager
    def _silenced(self) -> Iterator[None]:
        previous, self._hooks_silenced = self._hooks_silenced, True
        try:
            yield
        finally:
            self._hooks_silenced = previous

    def to(self, *args, **kwargs) -> "SAE":
        moved = super().to(*args, **kwargs)
        # the config follows, so a saved cfg.json says where and in what precision the weights are
        self.cfg.device, self.cfg.dtype = str(self.W_enc.device), str(self.W_enc.dtype).removeprefix("torch.")
        return moved

    # ----------------------------------------------------------------- saving
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write SAELens's folder format: `cfg.json` and `sae_weights.safetensors` (what
        `sae_lens.SAE.load_from_disk` reads). Returns the two paths."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        weights = {name: tensor.detach().contiguous() for name, tensor in self.state_dict().items()}
        save_file(weights, folder / WEIGHTS_FILENAME)
        (folder / CFG_FILENAME).write_text(json.dumps(self.cfg.to_sae_lens_dict(), indent=2))
        return folder / WEIGHTS_FILENAME, folder / CFG_FILENAME

    save_model = save  # SAELens's name

    def __repr__(self) -> str:
        where = self.cfg.hook_name or "no hook_name"
        if self.cfg.is_transcoder:
            where += f" -> {self.cfg.hook_name_out}"
        return f"SAE({self.cfg.architecture}, d_in={self.cfg.d_in}, d_sae={self.cfg.d_sae}, {where})"
