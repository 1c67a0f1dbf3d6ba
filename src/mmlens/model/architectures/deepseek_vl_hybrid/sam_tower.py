"""SAM's ViT as a second hooked vision stage, `vision.high_res.*`, and what follows it to the aligner.

A SAM block is pre-norm (`x + attn(ln1(x))`, `+ mlp(ln2(.))`) on a [batch, height, width, channel]
map; its attention reads one fused `qkv` projection and adds decomposed relative positions (a
height term and a width term, from the query) to the scores. Windowed blocks cut the zero-padded
map into `window_size` x `window_size` windows and attend inside each; global blocks attend over the
whole map. Residual points are flattened to TransformerLens's [image, position, d_model] (position =
row * width + col); attention points are per window, [image x window, ...] in the windows' raster
order, padding positions included, and [image, ...] in a global block.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import einops
import torch
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from ...hook_contract import CheckedHookPoint
from ...hook_tree import HookGroup, NormHooks, fire, is_hooked
from ...runtime.devices import bare_forward
from ...runtime.instrument import _override_forward
from ...runtime.norms import instrument_norm


class SamAttentionHooks(HookGroup):
    """q, k, v ([windows, window position, head, d_head], split from the fused `qkv`), `hook_rel_pos`
    (the decomposed relative-position term the scores get, [windows, head, query, key]; only where the
    tower uses relative positions), the scores with it added, the pattern (per window: each row sums
    to 1 over its own window's keys), z and the per-head results."""

    def __init__(self, relative_positions: bool):
        super().__init__("hook_q", "hook_k", "hook_v", *(["hook_rel_pos"] if relative_positions else []),
                         "hook_attn_scores", "hook_pattern", "hook_z", "hook_result")


class SamBlockHooks(HookGroup):
    """One SAM block: residual points [image, position, d_model], `ln1` / `ln2`, `attn` and the MLP's
    `hook_pre` / `hook_post` (`lin1`'s output and its activation)."""

    def __init__(self, relative_positions: bool):
        super().__init__("hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post")
        self.ln1, self.ln2 = NormHooks(), NormHooks()
        self.attn = SamAttentionHooks(relative_positions)
        self.mlp = HookGroup("hook_pre", "hook_post")
        self._points = [m for m in self.modules() if isinstance(m, HookPoint)]  # checked on every forward

    def any_point_hooked(self) -> bool:
        return any(is_hooked(point) for point in self._points)


class HighResTowerHooks(HookGroup):
    """`vision.high_res`: `hook_embed` (the patch embedding, before the absolute positions), the
    blocks, then the two paths to the aligner, each a feature map flattened to [image, position,
    channel]: the tower's own conv neck on the last block (`hook_neck_out`), bilinearly resized
    (`hook_resized`) and downsampled by two strided convs (`hook_proj_out`); the hybrid's neck on the
    global-attention block's output (`hook_global_neck_out`), resized and downsampled by the same
    convs (`hook_global_resized`, `hook_global_proj_out`), times the learned alpha
    (`hook_global_scaled`). Their sum is what the aligner reads (`adapter.hook_in_high_res`)."""

    POST_TOWER = ("hook_resized", "hook_proj_out", "hook_global_neck_out", "hook_global_resized",
                  "hook_global_proj_out", "hook_global_scaled")

    def __init__(self, n_layers: int, relative_positions: bool):
        super().__init__("hook_embed", "hook_neck_out", *self.POST_TOWER)
        self.blocks = nn.ModuleList(SamBlockHooks(relative_positions) for _ in range(n_layers))

    def post_tower_hooked(self) -> bool:
        return any(is_hooked(getattr(self, name)) for name in self.POST_TOWER)


def fire_map(point: HookPoint, feature_map: Tensor) -> Tensor:
    """Fire `point` on a [batch, channel, height, width] map as [batch, height x width, channel]."""
    if not is_hooked(point):
        return feature_map
    flat = point(feature_map.flatten(2).transpose(1, 2))
    return flat.transpose(1, 2).reshape(feature_map.shape)


def _channels_last_output(point: HookPoint) -> Callable[..., Tensor | None]:
    """A forward hook firing `point` on a [batch, height, width, channel] output, flattened."""

    def hook(_module: nn.Module, _args: Any, out: Tensor) -> Tensor | None:
        return point(out.flatten(1, 2)).reshape(out.shape) if is_hooked(point) else None

    return hook


def _channels_first_output(point: HookPoint) -> Callable[..., Tensor | None]:
    return lambda _module, _args, out: fire_map(point, out) if is_hooked(point) else None


def _attention(attn: nn.Module, hooks: SamAttentionHooks, use_result: Callable[[], bool]) -> Callable[[Tensor], Tensor]:
    """`SamVisionAttention`'s eager maths on windows [n, h, w, channel] with the points fired."""
    heads = attn.num_attention_heads

    def run(windows: Tensor) -> Tensor:
        n, height, width, channels = windows.shape
        positions = height * width
        qkv = attn.qkv(windows).reshape(n, positions, 3, heads, -1)
        q, k, v = (fire(point, qkv[:, :, i]) for i, point in enumerate((hooks.hook_q, hooks.hook_k, hooks.hook_v)))
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [n, head, position, d_head]
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if attn.use_rel_pos:
            flat_q = q.reshape(n * heads, positions, -1)
            size = (height, width)
            rel_pos = attn.get_decomposed_rel_pos(flat_q, attn.rel_pos_h, attn.rel_pos_w, size, size)
            scores = scores + fire(hooks.hook_rel_pos, rel_pos.reshape(n, heads, positions, positions))
        scores = fire(hooks.hook_attn_scores, scores)
        pattern = fire(hooks.hook_pattern, nn.functional.softmax(scores, dtype=torch.float32, dim=-1).to(q.dtype))
        z = fire(hooks.hook_z, (pattern @ v).transpose(1, 2))  # [n, position, head, d_head]
        if use_result() and is_hooked(hooks.hook_result):
            w_o = einops.rearrange(attn.proj.weight, "m (h d) -> h d m", h=heads)
            result = hooks.hook_result(einops.einsum(z, w_o, "n p h d, h d m -> n p h m"))
            return (result.sum(-2) + attn.proj.bias).reshape(n, height, width, channels)
        return attn.proj(z.reshape(n, height, width, channels))

    return run


def instrument_sam_block(layer: nn.Module, hooks: SamBlockHooks, use_result: Callable[[], bool]) -> None:
    """Hook a `SamVisionLayer`: Hugging Face's own forward while none of its points listens."""
    instrument_norm(layer.layer_norm1, hooks.ln1, "LN")
    instrument_norm(layer.layer_norm2, hooks.ln2, "LN")
    attention = _attention(layer.attn, hooks.attn, use_result)
    original = bare_forward(layer)
    mlp = layer.mlp

    def forward(hidden_states: Tensor) -> Tensor:
        if not hooks.any_point_hooked():
            return original(hidden_states)
        batch, height, width, channels = hidden_states.shape
        resid_pre = fire(hooks.hook_resid_pre, hidden_states.reshape(batch, height * width, channels))
        normed = layer.layer_norm1(resid_pre).reshape(hidden_states.shape)
        if layer.window_size > 0:
            windows, padded = layer.window_partition(normed, layer.window_size)
            mixed = layer.window_unpartition(attention(windows), layer.window_size, padded, (height, width))
        else:
            mixed = attention(normed)
        attn_out = fire(hooks.hook_attn_out, mixed.reshape(resid_pre.shape))
        resid_mid = fire(hooks.hook_resid_mid, resid_pre + attn_out)
        pre = fire(hooks.mlp.hook_pre, mlp.lin1(layer.layer_norm2(resid_mid)))
        mlp_out = fire(hooks.hook_mlp_out, mlp.lin2(fire(hooks.mlp.hook_post, mlp.act(pre))))
        return fire(hooks.hook_resid_post, resid_mid + mlp_out).reshape(hidden_states.shape)

    _override_forward(layer, forward)


def instrument_high_res_path(model: nn.Module, hooks: HighResTowerHooks, use_result: Callable[[], bool]) -> list[Any]:
    """Hook `DeepseekVLHybridModel`'s SAM tower, its neck, and `get_high_res_image_features` (the two
    paths from the tower to the aligner); Hugging Face's own code runs where nothing listens."""
    encoder = model.high_res_vision_model.vision_encoder
    for layer, block in zip(encoder.layers, hooks.blocks):
        instrument_sam_block(layer, block, use_result)
    handles = [encoder.patch_embed.register_forward_hook(_channels_last_output(hooks.hook_embed)),
               encoder.neck.register_forward_hook(_channels_first_output(hooks.hook_neck_out))]
    original = model.get_high_res_image_features
    proj, global_index = model.high_res_vision_proj, model.global_attn_index

    def project(features: Tensor, resized: HookPoint) -> Tensor:
        side = 4 * proj.output_size
        features = nn.functional.interpolate(features, size=(side, side), mode="bilinear", align_corners=False)
        return proj.conv2(proj.conv1(fire_map(resized, features)))

    def features(pixel_values: Tensor, **kwargs: Any) -> Any:
        if not hooks.post_tower_hooked():
            return original(pixel_values, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in ("return_dict", "output_hidden_states")}
        outputs = model.high_res_vision_model(pixel_values=pixel_values, return_dict=True, output_hidden_states=True,
                                              **kwargs)
        last = fire_map(hooks.hook_proj_out, project(outputs.last_hidden_state, hooks.hook_resized))
        global_block = outputs.hidden_states[global_index + 1]  # hidden_states[0] is the embedding
        global_map = fire_map(hooks.hook_global_neck_out, model.high_res_vision_neck(global_block))
        global_map = fire_map(hooks.hook_global_proj_out, project(global_map, hooks.hook_global_resized))
        mixed = last + fire_map(hooks.hook_global_scaled, global_map * model.high_res_vision_alpha)
        outputs.last_hidden_state = mixed.flatten(2).transpose(1, 2)
        return outputs

    model.get_high_res_image_features = features
    return handles


def add_points(group: HookGroup, *names: str) -> None:
    """Give a hook group more points (before the model indexes its hooks)."""
    for name in names:
        point = CheckedHookPoint()
        setattr(group, name, point)
        group._own_points.append(point)
