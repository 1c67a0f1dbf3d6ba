"""GLM-4.5V (Glm4vMoeForConditionalGeneration, and Glm46VForConditionalGeneration holding the same
model, which `Glm4v.for_checkpoint` hands here): GLM-4V's tower, merger, layout and M-RoPE before a
GLM-4.5 mixture-of-experts LLM.

The LLM's blocks are plain pre-norm blocks (no sandwich norms, separate gate and up projections,
GLM's partial rotary). Its first `first_k_dense_replace` layers keep a dense MLP; the others route
with DeepSeek-V3's router: sigmoid scores over the logits (computed in float32), the experts chosen
from the scores plus a score-correction bias (a buffer that only chooses) within the best
`topk_group` of `n_group` expert groups, weighted by their scores without the bias, renormalised
and multiplied by `routed_scaling_factor`; an ungated shared expert runs on every token. These are
`MoESpec` fields, so `runtime/moe.py` hooks the routing, each expert and the shared expert as for
the other MoE families.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from ....errors import UnsupportedModelError
from ...config import MoEConfig, StageConfig
from ...runtime.moe import MoESpec
from ..bridge_aliases import LLM_ALIASES, LLM_BRANCH_OUTPUT_ALIASES, MOE_ALIASES, PROJECTOR_OUTPUT_ALIASES
from ..llava import LLM_BLOCK, Llava
from .family import PROJECTOR_HIDDEN_ALIASES, VISION_TOWER, Glm4v

GLM4V_MOE = MoESpec(scoring="sigmoid", renormalize_epsilon=1e-20, shared_expert="shared_experts",
                    choice_bias="e_score_correction_bias", groups=("num_group", "topk_group"),
                    routed_scale="routed_scaling_factor", router_in_float32=True)
GLM4V_MOE_BLOCK = replace(LLM_BLOCK, moe=GLM4V_MOE)

# the sub-models whose blocks this family specifies, by config model_type
MOE_VISION_TOWER, MOE_LLM = "glm4v_moe_vision", "glm4v_moe_text"
# the plain LLM's MLP names: on an MoE stack the bridge names dense and sparse MLPs apart (MOE_ALIASES)
_DENSE_MLP_ALIASES = tuple(a for a in LLM_ALIASES if a.ours.text.startswith("blocks.{layer}.mlp."))


def _without_rope_positions(_layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The decoder layer's call without the M-RoPE `position_ids` [3, batch, seq] this LLM hands its
    layers (GLM-4V's dense LLM does not): the rotary tables arrive as `position_embeddings`, and eager
    and sdpa attention ignore the ids, but they are batched along their second dim, so rows could
    not join the stack at different layers (what patching from residuals does) with them."""
    ids = kwargs.get("position_ids")
    if ids is not None and ids.ndim == 3:
        kwargs = {k: v for k, v in kwargs.items() if k != "position_ids"}
    return args, kwargs


class Glm4vMoe(Glm4v):
    hf_class_names = ("Glm4vMoeForConditionalGeneration",)
    # TL 4.3 wraps GLM-4V (its tower's merger) and GLM-4.5's MoE LLM (Glm4MoeArchitectureAdapter), not this
    # class: their names, for the parts each has
    bridge_aliases = (*PROJECTOR_HIDDEN_ALIASES, *PROJECTOR_OUTPUT_ALIASES, *MOE_ALIASES, *LLM_BRANCH_OUTPUT_ALIASES,
                      *(a for a in LLM_ALIASES if a not in _DENSE_MLP_ALIASES))
    llm_block = GLM4V_MOE_BLOCK

    def check_supported(self, hf_model: nn.Module) -> None:
        config = hf_model.config
        vision, text = config.vision_config.model_type, config.text_config.model_type
        if vision not in (MOE_VISION_TOWER, VISION_TOWER) or text != MOE_LLM:
            raise UnsupportedModelError(
                f"{type(hf_model).__name__} with a {vision!r} vision tower and a {text!r} LLM is not supported: mmlens "
                f"hooks GLM-4.5V's {MOE_VISION_TOWER!r} (or GLM-4V's {VISION_TOWER!r}, the same model) tower and its "
                f"mixture-of-experts {MOE_LLM!r} LLM")
        if not config.text_config.norm_topk_prob:
            raise UnsupportedModelError(
                "GLM-4.5V with norm_topk_prob=False: the hooked router renormalises the chosen experts' weights "
                "(as every released checkpoint does); load a checkpoint with norm_topk_prob=True")

    def instrument(self, hf_model: nn.Module, root: Any) -> list[Any]:
        handles = super().instrument(hf_model, root)
        if hf_model.config.text_config._attn_implementation in ("eager", "sdpa"):
            handles += [layer.register_forward_pre_hook(_without_rope_positions, with_kwargs=True)
                        for layer in self.llm_layers(hf_model)]
        return handles

    @staticmethod
    def llm_config(tc: Any) -> StageConfig:
        moe = MoEConfig(layers=tuple(range(tc.first_k_dense_replace, tc.num_hidden_layers)),
                        n_experts=tc.n_routed_experts, top_k=tc.num_experts_per_tok, d_expert=tc.moe_intermediate_size,
                        shared_expert=True)
        return replace(Llava.llm_config(tc), moe=moe)
