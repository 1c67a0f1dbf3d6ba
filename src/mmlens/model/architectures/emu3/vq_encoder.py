"""Emu3's VQ encoder as mmlens's vision stage: convolutional levels, then attention at code resolution.

The encoder halves the resolution between its levels (resnet blocks of convolutions and GroupNorms),
then at the coarsest level, the code grid, alternates self-attention over every cell with resnet
blocks; a final norm and convolution give the latent, which the quantizer snaps to the nearest
codebook vector (an argmin: nothing differentiable crosses it). The points, activations as
`[image, position, channels]` with positions in raster order over that resolution's padded grid:

- `vision.hook_embed`: the first convolution's output (full resolution);
- `vision.down.{level}.block.{j}.hook_out` and `vision.down.{level}.hook_downsampled`: each resnet
  block's output and each halving convolution's, at the levels before the attention;
- `vision.blocks.{i}`: one attention then one resnet block at code resolution (each attention with the
  resnet after it, the middle block's last resnet included), TL's names: `hook_resid_pre`,
  `ln1.hook_normalized` (the GroupNorm the attention reads: it normalises channel groups over all
  positions, so there is no per-token `hook_scale`), `attn.hook_q/k/v/attn_scores/pattern/z/result`,
  `hook_attn_out`, `hook_resid_mid`, `hook_conv_out` (the resnet's convolutional branch, what it adds)
  and `hook_resid_post`;
- `vision.hook_latent` (what the quantizer reads), `vision.hook_code_distances` (squared distance of
  each cell to every code) and `vision.hook_codes` (the chosen code per cell, integers).

Hugging Face repeats an image over the temporal factor (a still video) and runs the 2-D encoder on each
copy; with a hook listening the 2-D encoder runs once per image and its output is repeated, so a hook
edits every copy alike.
"""

from __future__ import annotations

from typing import Any, Callable

import einops
import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ....errors import InputError
from ...hook_contract import CheckedHookPoint
from ...hook_tree import AttentionHooks, HookGroup, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward

CODE_POINTS = ("hook_latent", "hook_code_distances", "hook_codes")


class BeforeArgminHookPoint(CheckedHookPoint):
    """A point whose value reaches the LLM only through the quantizer's argmin (or, `adapter.hook_in`,
    as integer token ids): no gradient flows back to it, so a backward hook there is refused rather
    than left silently unfired."""

    def add_hook(self, hook: Callable, dir: str = "fwd", *args: Any, **kwargs: Any):
        if dir == "bwd":
            raise InputError(
                f"{self.name}: no gradient reaches this point. Emu3's images become discrete codes by an argmin "
                "(the nearest codebook vector), which has no gradient, so the loss does not depend differentiably on "
                "anything before the code embeddings. Put backward hooks at adapter.hook_out (the codes' embeddings) "
                "or later; to measure a vision point's effect, patch it (a forward hook) and compare the runs")
        return super().add_hook(hook, dir, *args, **kwargs)


class VQBlockHooks(HookGroup):
    """One attention and the resnet block after it, at code resolution (see the module docstring)."""

    def __init__(self):
        super().__init__("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_conv_out", "hook_resid_post")
        self.ln1 = HookGroup("hook_normalized")
        self.attn = AttentionHooks(rotary=False)


class VQLevelHooks(HookGroup):
    """A level before the attention: its resnet blocks' outputs and, where it halves the resolution, the halving."""

    def __init__(self, n_blocks: int, downsamples: bool):
        super().__init__(*(["hook_downsampled"] if downsamples else []))
        self.block = nn.ModuleList(HookGroup("hook_out") for _ in range(n_blocks))


def code_units(encoder: nn.Module) -> list[tuple[nn.Module, nn.Module, nn.Module]]:
    """(attention, its GroupNorm, the resnet block after it) at code resolution, in run order."""
    last = encoder.down_block.down[-1]
    mid = encoder.middle_block
    resnets = [*list(last.block)[1:], mid.block_1]
    units = [(attn, norm, resnet) for attn, norm, resnet in zip(last.attn, last.attn_norms, resnets)]
    return units + [(mid.attn_1, mid.attn_norm, mid.block_2)]


def add_vq_hooks(vision: nn.Module, encoder: nn.Module) -> None:
    """Give the vision hook group the encoder's points (before the model indexes its hooks)."""
    levels = encoder.down_block.down
    vision.down = nn.ModuleList(
        VQLevelHooks(len(level.block) if index < len(levels) - 1 else 1, index < len(levels) - 1)
        for index, level in enumerate(levels)
    )
    vision.blocks = nn.ModuleList(VQBlockHooks() for _ in code_units(encoder))
    for name in CODE_POINTS:
        setattr(vision, name, CheckedHookPoint())
    for point in vision.modules():
        if isinstance(point, CheckedHookPoint):
            point.__class__ = BeforeArgminHookPoint  # the same point, refusing backward hooks


def _tokens(x: Tensor) -> Tensor:
    """[image, channels, h, w] -> [image, h * w, channels]."""
    return x.flatten(2).transpose(1, 2)


def _fire_map(point: HookPoint, x: Tensor) -> Tensor:
    """A feature map through a point that sees it as [image, position, channels]."""
    if not is_hooked(point):
        return x
    return point(_tokens(x)).transpose(1, 2).reshape(x.shape)


def _attention(attn: nn.Module, hooks: AttentionHooks, x: Tensor, use_result: Callable[[], bool]) -> Tensor:
    """Emu3VQVAEAttentionBlock's eager maths on [image, position, channels] (no mask: every cell sees every cell)."""
    d_head = attn.head_dim

    def heads(y: Tensor) -> Tensor:
        return y.view(*y.shape[:2], -1, d_head)

    q = fire(hooks.hook_q, heads(attn.q_proj(x))).transpose(1, 2)
    k = fire(hooks.hook_k, heads(attn.k_proj(x))).transpose(1, 2)
    v = fire(hooks.hook_v, heads(attn.v_proj(x))).transpose(1, 2)
    scores = fire(hooks.hook_attn_scores, torch.matmul(q, k.transpose(2, 3)) * attn.scale)
    pattern = fire(hooks.hook_pattern, nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
    z = fire(hooks.hook_z, torch.matmul(pattern, v).transpose(1, 2).contiguous())
    if use_result() and is_hooked(hooks.hook_result):
        w_o = einops.rearrange(attn.out_proj.weight, "m (h d) -> h d m", d=d_head)
        return hooks.hook_result(einops.einsum(z, w_o, "b s h d, h d m -> b s h m")).sum(-2) + attn.out_proj.bias
    return attn.out_proj(z.flatten(-2))


def _conv_branch(resnet: nn.Module, x: Tensor) -> Tensor:
    """What Emu3VQVAEResnetBlock adds to its input (a block that keeps its channel count)."""
    h = resnet.norm1(x)
    h = resnet.conv1(h * torch.sigmoid(h))
    h = resnet.norm2(h)
    return resnet.conv2(h * torch.sigmoid(h))


def _block(unit: tuple[nn.Module, nn.Module, nn.Module], hooks: VQBlockHooks, x: Tensor,
           use_result: Callable[[], bool]) -> Tensor:
    attn, norm, resnet = unit
    shape = x.shape

    def as_map(tokens: Tensor) -> Tensor:
        return tokens.transpose(1, 2).reshape(shape)

    resid = fire(hooks.hook_resid_pre, _tokens(x))
    normed = fire(hooks.ln1.hook_normalized, _tokens(norm(as_map(resid))))
    resid_mid = fire(hooks.hook_resid_mid, resid + fire(hooks.hook_attn_out, _attention(attn, hooks.attn, normed, use_result)))
    branch = fire(hooks.hook_conv_out, _tokens(_conv_branch(resnet, as_map(resid_mid))))
    return as_map(fire(hooks.hook_resid_post, resid_mid + branch))


def encode_frames(encoder: nn.Module, vision: Any, pixels: Tensor, use_result: Callable[[], bool]) -> Tensor:
    """The 2-D encoder on [image, channels, H, W] with every point fired: [image, latent channels, h, w]."""
    x = _fire_map(vision.hook_embed, encoder.conv_in(pixels))
    levels = encoder.down_block.down
    for index, (level, hooks) in enumerate(zip(levels, vision.down)):
        for resnet, block_hooks in zip(level.block, hooks.block):
            x = _fire_map(block_hooks.hook_out, resnet(x))
        if index < len(levels) - 1:
            x = _fire_map(hooks.hook_downsampled, level.downsample(x))
    for unit, hooks in zip(code_units(encoder), vision.blocks):
        x = _block(unit, hooks, x, use_result)
    x = encoder.norm_out(x)
    return encoder.conv_out(x * torch.sigmoid(x))


def instrument_vq_encoder(encoder: nn.Module, quantizer: nn.Module, vision: Any, use_result: Callable[[], bool]) -> None:
    """Hook the encoder and the quantizer into `vision` (whose points `add_vq_hooks` made). Hugging
    Face's own code runs while no point of the stage listens."""
    encoder_points = [p for name, p in vision.named_modules() if isinstance(p, HookPoint) and name not in CODE_POINTS]
    encoder_forward, quantizer_forward = bare_forward(encoder), bare_forward(quantizer)

    def encoder_hooked(pixel_values: Tensor) -> Tensor:
        if not any(is_hooked(p) for p in encoder_points):
            return encoder_forward(pixel_values)
        batch, temporal = pixel_values.shape[:2]
        if temporal > 1 and not torch.equal(pixel_values, pixel_values[:, :1].expand_as(pixel_values)):
            raise InputError("Emu3's VQ encoder is hooked for images (every temporal copy the same picture); "
                             "these pixel values are a video of different frames, which mmlens does not hook")
        frames = encode_frames(encoder, vision, pixel_values[:, 0], use_result)
        hidden = frames.unsqueeze(2).expand(-1, -1, temporal, -1, -1)  # [image, channels, time, h, w]
        for conv in encoder.time_conv:
            hidden = conv(hidden)
            hidden = hidden * torch.sigmoid(hidden)
        for layer in encoder.time_res_stack:
            hidden = layer(hidden)
        return hidden.permute(0, 2, 1, 3, 4)

    def quantizer_hooked(hidden_state: Tensor) -> Tensor:
        if not any(is_hooked(getattr(vision, name)) for name in CODE_POINTS):
            return quantizer_forward(hidden_state)
        batch, temporal, channels, height, width = hidden_state.shape
        if temporal != 1:
            raise InputError(f"Emu3's quantizer got {temporal} latent frames; mmlens hooks images, one latent frame each")
        latent = fire(vision.hook_latent, _tokens(hidden_state[:, 0]))
        flat = latent.reshape(-1, channels)
        codebook = quantizer.embedding.weight
        # Hugging Face's own expression, term for term: |z|^2 + |e|^2 - 2 z.e
        distances = torch.sum(flat**2, dim=1, keepdim=True) + torch.sum(codebook**2, dim=1) \
            - 2 * torch.matmul(flat, codebook.transpose(0, 1))
        distances = fire(vision.hook_code_distances, distances.view(batch, height * width, -1))
        codes = fire(vision.hook_codes, torch.argmin(distances, dim=-1))
        return codes.view(batch, temporal, height, width)

    _override_forward(encoder, encoder_hooked)
    _override_forward(quantizer, quantizer_hooked)
