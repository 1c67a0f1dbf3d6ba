"""FastViTHD (timm's `fastvit_mci3`) as mmlens's vision stage: convolutional stages, then attention
stages, each after the first halving the resolution, then a final convolution.

A stem (three convolutions, stride 4) feeds five stages. Each stage may halve the resolution first (a
strided large-kernel convolution, `hook_downsampled`) and add a convolutional position encoding
(`hook_pos_embed`, the attention stages); then come its blocks. A RepMixer block mixes tokens with one
depthwise convolution that already holds its residual, then adds a convolutional MLP; an attention
block is pre-norm (a LayerNorm over channels at each position) multi-head self-attention over every
position, then the same MLP. Every activation is `[image, position, channels]`, positions in raster
order over the grid of the resolution the point works at (HF's flatten order):

- `vision.hook_embed`: the stem's output (1/4 of the image's side);
- `vision.stages.{s}.hook_downsampled`, `.hook_pos_embed`: a stage's entry, where it has one;
- `vision.stages.{s}.blocks.{j}`: the blocks of the stages before the final grid, RepMixer blocks with
  `hook_resid_pre`, `hook_resid_mid` (the token mixer's output, residual included), `hook_mlp_out`
  (layer scale applied) and `hook_resid_post`; attention blocks as below;
- `vision.blocks.{i}`: the attention blocks on the final grid (the LLM's token grid), TL's names:
  `hook_resid_pre`, `ln1.hook_scale/hook_normalized`, `attn.hook_q/k/v/attn_scores/pattern/z/result`,
  `hook_attn_out` (layer scale applied), `hook_resid_mid`, `hook_mlp_out`, `hook_resid_post`;
- every block's `mlp.hook_conv` (its 7x7 depthwise convolution and norm: the MLP mixes neighbours),
  `mlp.hook_pre` (the first pointwise convolution) and `mlp.hook_post` (after GELU);
- `vision.hook_final_conv`: the final convolution's output (its squeeze-excite gate pools the whole
  image), which the projector reads flattened.

The timm modules run as they are while no point of a block listens; a listening block runs the same
modules step by step, the attention through mmlens's eager attention on the flattened grid.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ...hook_tree import BlockHooks, HookGroup, MLPHooks, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import AttentionSpec, _override_forward, instrument_attention
from ...runtime.norms import instrument_norm
from ..emu3.vq_encoder import _fire_map, _tokens

# timm's Attention: one fused qkv linear (q, k, v row blocks), `proj`, `scale`; no rotary, no mask
ATTENTION = AttentionSpec(o="proj", scaling="scale", rotary=False, fused_qkv="qkv")


def is_attention_block(block: nn.Module) -> bool:
    return hasattr(block, "token_mixer") and hasattr(block.token_mixer, "qkv")


def stage_downsamples(stage: nn.Module) -> bool:
    return not isinstance(stage.downsample, nn.Identity)


def final_grid_stages(tower: nn.Module) -> list[int]:
    """The stages from the last halving on: they work on the final feature map's grid."""
    stages = list(tower.stages)
    last = max((s for s, stage in enumerate(stages) if stage_downsamples(stage)), default=0)
    return list(range(last, len(stages)))


class ConvMlpHooks(MLPHooks):
    """timm's ConvMlp: `hook_conv` (depthwise convolution and norm), `hook_pre` (fc1), `hook_post` (GELU)."""

    def __init__(self):
        super().__init__(gated=False)
        self.add_points("hook_conv")


class RepMixerBlockHooks(HookGroup):
    def __init__(self):
        super().__init__("hook_resid_pre", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
        self.mlp = ConvMlpHooks()


def attention_block_hooks() -> BlockHooks:
    """TL's block points without `ln2` (the MLP reads the residual: its depthwise convolution comes first)."""
    hooks = BlockHooks(rotary=False, gated_mlp=False)
    del hooks.ln2
    hooks.mlp = ConvMlpHooks()
    return hooks


class StageHooks(HookGroup):
    """A stage's entry points and, before the final grid, its blocks (one group per block kind)."""

    def __init__(self, stage: nn.Module, with_blocks: bool):
        points = [name for name, present in (("hook_downsampled", stage_downsamples(stage)),
                                             ("hook_pos_embed", not isinstance(stage.pos_emb, nn.Identity))) if present]
        super().__init__(*points)
        if with_blocks:
            self.blocks = nn.ModuleList(attention_block_hooks() if is_attention_block(block) else RepMixerBlockHooks()
                                        for block in stage.blocks)


def add_fastvit_hooks(vision: nn.Module, tower: nn.Module) -> None:
    """Give the vision hook group the tower's points (before the model indexes its hooks)."""
    final = set(final_grid_stages(tower))
    vision.stages = nn.ModuleList(StageHooks(stage, s not in final) for s, stage in enumerate(tower.stages))
    vision.blocks = nn.ModuleList(attention_block_hooks() for s in sorted(final) for _ in tower.stages[s].blocks)
    vision.add_points("hook_final_conv")


class _PointwiseConv:
    """A 1x1 convolution read as the linear it is (weight `[out, in]`, a view), for the MLP weight surface."""

    def __init__(self, conv: nn.Conv2d):
        self._conv = conv

    weight = property(lambda self: self._conv.weight[:, :, 0, 0])
    bias = property(lambda self: self._conv.bias)


class _ConvMlpLinears:
    def __init__(self, mlp: nn.Module):
        self.fc1, self.fc2 = _PointwiseConv(mlp.fc1), _PointwiseConv(mlp.fc2)


class _ChannelLayerNorm(nn.Module):
    """timm's LayerNorm2d (over channels, at each position) applied to `[image, position, channels]`, so
    mmlens's norm instrumentation fires `hook_scale` / `hook_normalized` on it."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.__dict__["_norm"] = norm  # not a child: the Hugging Face module stays where it is

    weight = property(lambda self: self._norm.weight)
    bias = property(lambda self: self._norm.bias)
    eps = property(lambda self: float(self._norm.eps))

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.layer_norm(x, self._norm.normalized_shape, self.weight, self.bias, self.eps)


class _LayerScales:
    """A block's two LayerScale2d factors as `[channels]` vectors, for the cache's decompositions."""

    def __init__(self, block: nn.Module):
        self._block = block

    attention = property(lambda self: self._block.layer_scale_1.gamma.view(-1))
    mlp = property(lambda self: self._block.layer_scale_2.gamma.view(-1))


def _points(group: nn.Module) -> list[HookPoint]:
    return [m for m in group.modules() if isinstance(m, HookPoint)]


def _conv_mlp(mlp: nn.Module, hooks: ConvMlpHooks, x: Tensor) -> Tensor:
    if not hooks.any_hooked():
        return mlp(x)
    h = _fire_map(hooks.hook_conv, mlp.conv(x))
    h = _fire_map(hooks.hook_pre, mlp.fc1(h))
    h = mlp.drop(_fire_map(hooks.hook_post, mlp.act(h)))
    return mlp.drop(mlp.fc2(h))


def instrument_repmixer_block(block: nn.Module, hooks: RepMixerBlockHooks) -> None:
    original, points = bare_forward(block), _points(hooks)
    hooks.mlp.bind_mlp(_ConvMlpLinears(block.mlp), gated=False)

    def forward(x: Tensor) -> Tensor:
        if not any(is_hooked(p) for p in points):
            return original(x)
        x = _fire_map(hooks.hook_resid_pre, x)
        x = _fire_map(hooks.hook_resid_mid, block.token_mixer(x))
        mlp_out = _fire_map(hooks.hook_mlp_out, block.layer_scale(_conv_mlp(block.mlp, hooks.mlp, x)))
        return _fire_map(hooks.hook_resid_post, x + block.drop_path(mlp_out))

    _override_forward(block, forward)


def instrument_attention_block(block: nn.Module, hooks: BlockHooks, use_result: Callable[[], bool]) -> None:
    attn = block.token_mixer
    instrument_attention(attn, hooks.attn, ATTENTION, use_result)
    norm = _ChannelLayerNorm(block.norm)
    instrument_norm(norm, hooks.ln1, "LN")
    hooks.mlp.bind_mlp(_ConvMlpLinears(block.mlp), gated=False)
    hooks.bind_outputs(_LayerScales(block), ("attention", "mlp"))
    original, points = bare_forward(block), _points(hooks)

    def mix(x: Tensor) -> Tensor:
        """The attention branch before its layer scale, `[image, channels, h, w]` as timm gives it."""
        if not (hooks.ln1.any_hooked() or hooks.attn.any_hooked()):
            return attn(block.norm(x))
        normed = norm(_tokens(x))
        if hooks.attn.any_hooked():
            mixed = attn(normed)[0]  # mmlens's eager attention on [image, position, channels]
        else:
            mixed = _tokens(attn(normed.transpose(1, 2).reshape(x.shape)))
        return mixed.transpose(1, 2).reshape(x.shape)

    def forward(x: Tensor) -> Tensor:
        if not any(is_hooked(p) for p in points):
            return original(x)
        x = _fire_map(hooks.hook_resid_pre, x)
        attn_out = _fire_map(hooks.hook_attn_out, block.layer_scale_1(mix(x)))
        x = _fire_map(hooks.hook_resid_mid, x + block.drop_path1(attn_out))
        mlp_out = _fire_map(hooks.hook_mlp_out, block.layer_scale_2(_conv_mlp(block.mlp, hooks.mlp, x)))
        return _fire_map(hooks.hook_resid_post, x + block.drop_path2(mlp_out))

    _override_forward(block, forward)


def _map_output(module: nn.Module, point: HookPoint) -> torch.utils.hooks.RemovableHandle:
    """Route a module's feature-map output through a point that sees it as `[image, position, channels]`."""
    return module.register_forward_hook(lambda _m, _i, out: _fire_map(point, out))


def instrument_fastvit(tower: nn.Module, vision: Any, use_result: Callable[[], bool]) -> list[Any]:
    """Hook the timm tower into `vision` (whose points `add_fastvit_hooks` made); return removable handles."""
    handles = [_map_output(tower.stem, vision.hook_embed), _map_output(tower.final_conv, vision.hook_final_conv)]
    final_blocks = iter(vision.blocks)
    for stage, hooks in zip(tower.stages, vision.stages):
        for name, module in (("hook_downsampled", stage.downsample), ("hook_pos_embed", stage.pos_emb)):
            if hasattr(hooks, name):
                handles.append(_map_output(module, getattr(hooks, name)))
        block_hooks = hooks.blocks if hasattr(hooks, "blocks") else [next(final_blocks) for _ in stage.blocks]
        for block, group in zip(stage.blocks, block_hooks):
            if isinstance(group, RepMixerBlockHooks):
                instrument_repmixer_block(block, group)
            else:
                instrument_attention_block(block, group, use_result)
    return handles
