"""The grammar of hook names: the one place that takes a name apart and puts it back together.

A hook name is a stage prefix (`vision.`, `adapter.`, none for the LLM), then, for a point inside
a block, `blocks.{layer}.`, then the site in that block or stage (`hook_resid_pre`,
`attn.hook_z`, `ln1.hook_scale`, `ln_final.hook_normalized`). `HookName` holds the three parts and
answers what code elsewhere needs to know about a point (which block, whether it has a head
dimension, where it sits relative to the attention's `hook_z`), so nothing else cuts names apart.
Names are parsed as written: resolve aliases first (`HookedMLLM.resolve_hook_name`). A
`NameTemplate` writes a whole set of names at once (`blocks.{layer}.hook_out`), which is how alias
tables are declared; this module is also the one place that turns a template into a matcher.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from string import Formatter
from typing import Literal

from ..errors import HookNameError

Stage = Literal["vision", "adapter", "llm"]
STAGE_PREFIXES: dict[Stage, str] = {"vision": "vision.", "adapter": "adapter.", "llm": ""}
BLOCKS = "blocks"

# a linear-attention (gated delta rule) block's mixer points, [batch, pos, head, d_head]; its write
# strength and decay (`hook_beta_logit`, `hook_beta`, `hook_log_decay`) are [batch, pos, head], with
# nothing after the head, so they take no `heads=` (patch them by position)
LINEAR_ATTENTION_PREFIX = "linear_attn."
LINEAR_ATTENTION_PER_HEAD_SITES = tuple(LINEAR_ATTENTION_PREFIX + p for p in (
    "hook_q_pre_conv", "hook_k_pre_conv", "hook_v_pre_conv", "hook_q", "hook_k", "hook_v", "hook_recurrence_out",
    "hook_gate_input"))
# each head's `z W_O`, fired only after `set_use_attn_result(True)`
RESULT_SITE = "attn.hook_result"
# sites with a head dimension at position 2 ([batch, pos, head, ...])
PER_HEAD_SITES = ("attn.hook_z", "attn.hook_result", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q",
                  "attn.hook_rot_k", "attn.hook_q_gate", *LINEAR_ATTENTION_PER_HEAD_SITES,
                  *("cross_attn." + p for p in ("hook_z", "hook_result", "hook_q", "hook_k", "hook_v")))
# the per-head q/k norms' points ([batch, pos, head, d_head] and [batch, pos, head, 1])
PER_HEAD_NORMS = ("attn.q_ln.", "attn.k_ln.", "cross_attn.q_ln.", "cross_attn.k_ln.")
# a stage's norm after its last block (the LLM's `ln_final`, a tower's `ln_post`)
FINAL_NORMS = ("ln_final.", "ln_post.")
# points shaped [batch, head, query, key]
QUERY_KEY_POINTS = frozenset({"hook_attn_scores", "hook_pattern"})
# block sites from the attention's hook_z on: a forward that changes nothing earlier in the block can
# start there. Listed, not derived, so a site kind added later counts as earlier until placed here.
AT_OR_AFTER_Z = ("attn.hook_z", "attn.hook_result", "hook_attn_out", "ln1_post.", "hook_resid_mid", "ln2.", "mlp.",
                 "hook_mlp_out", "ln2_post.", "hook_resid_post")
# sites inside the attention, before its hook_z (`attn.hook_q` covers the output gate's `attn.hook_q_gate`); a
# linear attention's are all inside its mixer, which has no hook_z: rows join such a block whole
BEFORE_Z_IN_ATTENTION = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_", "attn.hook_attn_scores",
                         "attn.hook_pattern", "attn.q_ln.", "attn.k_ln.", LINEAR_ATTENTION_PREFIX)

# one expert's points in a mixture-of-experts block: `mlp.experts.{expert}.hook_out`
EXPERTS_SITE = "mlp.experts."

_LAYER = re.compile(r"0|[1-9][0-9]*")


@dataclass(frozen=True)
class HookName:
    """A hook name taken apart: `stage`, the block's `layer` within its stage (None outside the
    blocks) and the `site` (the rest of the name). `name` (also `str()`) builds it back."""

    stage: Stage
    layer: int | None
    site: str

    def __post_init__(self) -> None:
        if self.stage not in STAGE_PREFIXES:
            raise HookNameError(f"stage must be 'vision', 'adapter' or 'llm', got {self.stage!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise HookNameError(f"layer must be a block index >= 0 or None, got {self.layer!r}")
        if not isinstance(self.site, str) or not self.site or "" in self.site.split("."):
            raise HookNameError(f"site must be a dotted name such as 'attn.hook_z', got {self.site!r}")

    @property
    def name(self) -> str:
        block = f"{BLOCKS}.{self.layer}." if self.layer is not None else ""
        return f"{STAGE_PREFIXES[self.stage]}{block}{self.site}"

    def __str__(self) -> str:
        return self.name

    @property
    def name_in_stage(self) -> str:
        """The name without its stage prefix, as TL names points of a single stack
        (`vision.blocks.3.hook_z` -> `blocks.3.hook_z`)."""
        return HookName("llm", self.layer, self.site).name

    @property
    def point(self) -> str:
        """The hook point's own name, the last part: `hook_z` for `blocks.3.attn.hook_z`."""
        return self.site.rsplit(".", 1)[-1]

    @property
    def per_image(self) -> bool:
        """Whether activations here have one row per image (vision tower, adapter), not per batch row."""
        return self.stage in ("vision", "adapter")

    @property
    def per_head(self) -> bool:
        """Whether the activation is [batch, pos, head, ...]."""
        return self.site in PER_HEAD_SITES or self.site.startswith(PER_HEAD_NORMS)

    @property
    def expert(self) -> int | None:
        """The expert a point of a mixture-of-experts block belongs to (3 for
        `blocks.1.mlp.experts.3.hook_pre`), None elsewhere. Such points have no head dimension: an
        expert's `hook_pre` / `hook_post` are [tokens it serves, d_expert], its `hook_out` [batch,
        pos, d_model]."""
        if not self.site.startswith(EXPERTS_SITE):
            return None
        number = self.site[len(EXPERTS_SITE):].split(".", 1)[0]
        return int(number) if _LAYER.fullmatch(number) else None

    @property
    def query_by_key(self) -> bool:
        """Whether the activation is an attention map, [batch, head, query, key]."""
        return self.point in QUERY_KEY_POINTS

    @property
    def in_llm_block(self) -> bool:
        """Whether the point is inside one of the LLM's blocks."""
        return self.stage == "llm" and self.layer is not None

    @property
    def in_llm_layers(self) -> bool:
        """Whether the point is in an LLM block or the final norm: what a forward started at an
        LLM layer (`start_at_layer`) computes."""
        return self.in_llm_block or (self.stage == "llm" and self.site.startswith("ln_final."))

    def first_block_after(self, n_layers: int) -> int:
        """The first of the stage's `n_layers` blocks that runs after this point's value exists: its
        own block for `hook_resid_pre` (the block reads it), the next one for any other point in a
        block, 0 for the stage's input (`hook_embed`, `hook_multimodal_embed` ...), `n_layers` (none)
        for its final norm."""
        if self.layer is None:
            return n_layers if self.site.startswith(FINAL_NORMS) else 0
        return self.layer if self.site == "hook_resid_pre" else self.layer + 1

    @property
    def at_or_after_z(self) -> bool:
        """Whether the point is in a block, at its attention's `hook_z` or later in the block."""
        return self.layer is not None and self.site.startswith(AT_OR_AFTER_Z)

    @property
    def before_z_in_attention(self) -> bool:
        """Whether the point is inside a block's attention, before `hook_z` (q, k, v, scores, pattern)."""
        return self.layer is not None and self.site.startswith(BEFORE_Z_IN_ATTENTION)


def parse_hook_name(name: str) -> HookName:
    """`name` taken apart; a HookNameError for a name the grammar does not produce (an empty
    part, or `blocks.` without a layer number and a site)."""
    if not isinstance(name, str) or not name:
        raise HookNameError(f"a hook name is a non-empty string, got {name!r}")
    return _parse(name)


@functools.lru_cache(maxsize=4096)  # names are parsed for every hook of every run; strings are immutable
def _parse(name: str) -> HookName:
    stage: Stage = "llm"
    rest = name
    for candidate in ("vision", "adapter"):
        if name.startswith(STAGE_PREFIXES[candidate]):
            stage, rest = candidate, name[len(STAGE_PREFIXES[candidate]):]
    parts = rest.split(".")
    if parts[0] != BLOCKS:
        return _parsed(name, stage, None, rest)
    if len(parts) < 3 or not _LAYER.fullmatch(parts[1]):
        raise HookNameError(f"hook name {name!r}: '{BLOCKS}' is followed by a layer number and a site, as in "
                            f"{STAGE_PREFIXES[stage]}{BLOCKS}.3.hook_resid_pre")
    return _parsed(name, stage, int(parts[1]), ".".join(parts[2:]))


def _parsed(name: str, stage: Stage, layer: int | None, site: str) -> HookName:
    try:
        return HookName(stage, layer, site)
    except HookNameError as error:
        raise HookNameError(f"hook name {name!r} is malformed: {error}") from None


def block_hook(layer: int, site: str, stage: Stage = "llm") -> str:
    """The name of `site` in block `layer` of `stage`: `block_hook(3, "attn.hook_z")` is `blocks.3.attn.hook_z`."""
    return HookName(stage, layer, site).name


# What each placeholder of a `NameTemplate` stands for: a block (or other) number as the grammar
# writes layers, and one word of a hook point's name (letters, digits, underscores).
TEMPLATE_FIELDS = {"layer": _LAYER.pattern, "point": r"\w+"}


@dataclass(frozen=True)
class NameTemplate:
    """A set of hook names written as one, with placeholders in braces: `{layer}` for a number
    (`blocks.{layer}.hook_out` is `blocks.0.hook_out`, `blocks.1.hook_out`, ...) and `{point}` for
    one word (`attn.hook_{point}` is `attn.hook_z`, `attn.hook_pattern`, ...). `match` reads the
    placeholders' values out of a name, `fill` writes them in."""

    text: str
    _matcher: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        pattern, seen = [], set()
        for literal, placeholder, spec, conversion in Formatter().parse(self.text):
            pattern.append(re.escape(literal))
            if placeholder is None:
                continue
            if placeholder not in TEMPLATE_FIELDS or spec or conversion or placeholder in seen:
                raise HookNameError(f"name template {self.text!r}: placeholders are {sorted(TEMPLATE_FIELDS)} in "
                                    f"braces, each at most once; got {{{placeholder}}}")
            seen.add(placeholder)
            pattern.append(f"(?P<{placeholder}>{TEMPLATE_FIELDS[placeholder]})")
        object.__setattr__(self, "_matcher", re.compile("".join(pattern)))

    @property
    def placeholders(self) -> frozenset[str]:
        return frozenset(self._matcher.groupindex)

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholders' values if `name` is one of the template's names, else None."""
        found = self._matcher.fullmatch(name)
        return None if found is None else found.groupdict()

    def fill(self, **values: object) -> str:
        """The name with each placeholder replaced by its value: `fill(layer=3)`."""
        return self.text.format(**values)
