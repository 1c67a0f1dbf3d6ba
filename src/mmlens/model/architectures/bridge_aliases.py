"""TransformerLens 4.x `TransformerBridge` hook names, accepted as aliases of ours.

The bridge names a multimodal model's parts `vision_encoder`, `vision_projector`, `embed`,
`blocks` and `ln_final`, and hooks each part's input and output (`hook_in`, `hook_out`). A
`BridgeAlias` maps the bridge's names for one of our hook points, both written as name templates
(`blocks.{layer}.hook_out` is our `blocks.{layer}.hook_resid_post`). The tables below are the
named parts families share; a family's `bridge_aliases` lists the parts its model has, and the
first alias whose template matches a name gives ours.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import HookNameError
from ..hook_names import NameTemplate


@dataclass(frozen=True)
class BridgeAlias:
    """The bridge's names (`bridge`, any of them) for our hook point `ours`."""

    ours: NameTemplate
    bridge: tuple[NameTemplate, ...]

    def __post_init__(self) -> None:
        for template in self.bridge:
            if template.placeholders != self.ours.placeholders:
                raise HookNameError(f"bridge name {template.text!r} and ours {self.ours.text!r} must hold the same "
                                    "placeholders, so that each bridge name gives one of ours")

    def rename(self, name: str) -> str | None:
        """Our name for the bridge's `name`, or None if it is not one of this alias's names."""
        for template in self.bridge:
            values = template.match(name)
            if values is not None:
                return self.ours.fill(**values)
        return None


def alias(ours: str, *bridge: str) -> BridgeAlias:
    """`BridgeAlias` from the templates' text: `alias("adapter.hook_in", "vision_projector.hook_in")`."""
    return BridgeAlias(NameTemplate(ours), tuple(NameTemplate(name) for name in bridge))


_V = "vision_encoder.encoder_layers.{layer}."  # the bridge's LLaVA vision block
_L = "blocks.{layer}."  # the bridge's LLM block, as ours

# LLaVA's tower as the bridge wraps CLIP and SigLIP: embeddings, post-norm, blocks. A block's
# attention and MLP points keep their names (`attn.hook_{point}`), after the outputs named apart.
CLIP_TOWER_ALIASES = (
    alias("vision.hook_embed", "vision_encoder.embeddings.hook_out", "vision_encoder.hook_vision_embed"),
    alias("vision.ln_post.hook_normalized", "vision_encoder.post_layernorm.hook_out",
          "vision_encoder.post_layernorm.hook_normalized"),
    alias("vision.blocks.{layer}.hook_resid_pre", _V + "hook_in", _V + "hook_resid_pre"),
    alias("vision.blocks.{layer}.hook_resid_post", _V + "hook_out", _V + "hook_resid_post"),
    alias("vision.blocks.{layer}.ln1.hook_normalized", _V + "ln1.hook_out", _V + "ln1.hook_normalized"),
    alias("vision.blocks.{layer}.ln2.hook_normalized", _V + "ln2.hook_out", _V + "ln2.hook_normalized"),
    alias("vision.blocks.{layer}.hook_attn_out", _V + "attn.hook_out", _V + "hook_attn_out"),
    alias("vision.blocks.{layer}.hook_mlp_out", _V + "mlp.hook_out", _V + "hook_mlp_out"),
    alias("vision.blocks.{layer}.mlp.hook_pre", _V + "mlp.in.hook_out"),
    alias("vision.blocks.{layer}.mlp.hook_post", _V + "mlp.out.hook_in"),
    alias("vision.blocks.{layer}.attn.hook_{point}", _V + "attn.hook_{point}"),
    alias("vision.blocks.{layer}.mlp.hook_{point}", _V + "mlp.hook_{point}"),
)
# CLIP's norm between the embeddings and the first block (SigLIP and DINOv2 have none)
CLIP_PRE_NORM_ALIASES = (
    alias("vision.ln_pre.hook_normalized", "vision_encoder.pre_layernorm.hook_out",
          "vision_encoder.pre_layernorm.hook_normalized"),
)

PROJECTOR_INPUT_ALIASES = (alias("adapter.hook_in", "vision_projector.hook_in", "vision_projector.hook_vision_proj_in"),)
PROJECTOR_OUTPUT_ALIASES = (
    alias("adapter.hook_out", "vision_projector.hook_out", "vision_projector.hook_vision_proj_out",
          "vision_projector.hook_projected"),
)

# The LLM as the bridge wraps a Llama-style decoder: embedding, residual stream, norms, MLP
# internals and final norm.
LLM_ALIASES = (
    alias("hook_embed", "embed.hook_out"),
    alias(_L + "hook_resid_pre", _L + "hook_in"),
    alias(_L + "hook_resid_post", _L + "hook_out"),
    alias(_L + "ln1.hook_normalized", _L + "ln1.hook_out"),
    alias(_L + "ln2.hook_normalized", _L + "ln2.hook_out"),
    alias(_L + "mlp.hook_pre", _L + "mlp.gate.hook_out"),
    alias(_L + "mlp.hook_pre_linear", _L + "mlp.in.hook_out"),
    alias(_L + "mlp.hook_post", _L + "mlp.out.hook_in"),
)
# Bridge names whose value has no hook point here, with the reason `resolve_hook_name` gives. The
# bridge's final norm hooks its output after the weight; ours holds the residual before it (TL's
# fold_ln: `W_U` carries the weight), so mapping the name would hand back another quantity.
WITHHELD_BRIDGE_NAMES = {
    "ln_final.hook_out": "the bridge's ln_final.hook_out is the final norm's output after its weight; here "
                         "ln_final.hook_normalized holds it before the weight, which model.W_U carries (TL's fold_ln): "
                         "use ln_final.hook_normalized (times model.ln_final.w for the bridge's value)",
}
# The attention and MLP branch outputs: ours where the branch ends in the residual add (no
# sandwich norm after it, unlike Gemma 3).
LLM_BRANCH_OUTPUT_ALIASES = (
    alias(_L + "hook_attn_out", _L + "attn.hook_out"),
    alias(_L + "hook_mlp_out", _L + "mlp.hook_out"),
)
# An ungated MLP whose fc1 / fc2 the bridge wraps without a container (OPT): `mlp.in`, `mlp.out`,
# whose output is the MLP's (the bridge's `hook_mlp_out` there)
LLM_UNGATED_MLP_ALIASES = (
    alias(_L + "mlp.hook_pre", _L + "mlp.in.hook_out"),
    alias(_L + "mlp.hook_post", _L + "mlp.out.hook_in"),
    alias(_L + "hook_mlp_out", _L + "mlp.out.hook_out"),
)
# RMSNorms on each head's queries and keys (Gemma 3, Qwen3)
LLM_QK_NORM_ALIASES = (
    alias(_L + "attn.q_ln.hook_normalized", _L + "attn.q_norm.hook_out"),
    alias(_L + "attn.k_ln.hook_normalized", _L + "attn.k_norm.hook_out"),
)
# A linear-attention block's mixer as the bridge wraps it (`GatedDeltaNetBridge`, Qwen3.5): its inner
# points have our names already; these are its other names for them (TL's SSM vocabulary) and its
# output, which is the block's attention output here
LINEAR_ATTENTION_ALIASES = (
    alias(_L + "hook_attn_out", _L + "linear_attn.hook_out", _L + "linear_attn.hook_linear_attn_out",
          _L + "linear_attn.hook_ssm_out"),
    alias(_L + "linear_attn.hook_q", _L + "linear_attn.hook_ssm_C"),
    alias(_L + "linear_attn.hook_k", _L + "linear_attn.hook_ssm_B"),
    alias(_L + "linear_attn.hook_log_decay", _L + "linear_attn.hook_ssm_decay"),
    alias(_L + "linear_attn.hook_beta", _L + "linear_attn.hook_ssm_write"),
)
# A mixture-of-experts stack as the bridge wraps it (MoEBridge). On sparse layers `mlp.gate` is the
# router: its hook_out is the router logits (the bridge's [batch * pos, n_experts], ours [batch,
# pos, n_experts], the same numbers) and it carries TL's hook_expert_weights / hook_expert_indices
# (ours sit on the block, as in TL's own MoE). Dense layers of the same stack keep their projections
# under dense_gate / dense_in / dense_out, so the plain LLM MLP names (LLM_ALIASES) do not apply.
MOE_ALIASES = (
    alias(_L + "mlp.hook_router_logits", _L + "mlp.gate.hook_out"),
    alias(_L + "mlp.hook_expert_weights", _L + "mlp.gate.hook_expert_weights"),
    alias(_L + "mlp.hook_expert_indices", _L + "mlp.gate.hook_expert_indices"),
    alias(_L + "mlp.hook_pre", _L + "mlp.dense_gate.hook_out"),
    alias(_L + "mlp.hook_pre_linear", _L + "mlp.dense_in.hook_out"),
    alias(_L + "mlp.hook_post", _L + "mlp.dense_out.hook_in"),
)
# The shared expert beside the routed ones, a GatedMLPBridge (Qwen3.5-MoE): its projections' names.
# Its `shared_expert.hook_out` is ours by the same text: the expert's output before any gate.
SHARED_EXPERT_ALIASES = (
    alias(_L + "mlp.shared_expert.hook_pre", _L + "mlp.shared_expert.gate.hook_out"),
    alias(_L + "mlp.shared_expert.hook_pre_linear", _L + "mlp.shared_expert.in.hook_out"),
    alias(_L + "mlp.shared_expert.hook_post", _L + "mlp.shared_expert.out.hook_in"),
)
# The shared expert's sigmoid gate, a LinearBridge beside it (Qwen3.5-MoE): its output is the logit
SHARED_EXPERT_GATE_ALIASES = (
    alias(_L + "mlp.shared_expert.hook_gate_logit", _L + "mlp.shared_expert_gate.hook_out"),
)
