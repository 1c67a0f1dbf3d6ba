"""GLM-4V and GLM-4.6V (dense LLM): Qwen2-VL's packed native-resolution layout, a tower with learned
position embeddings, a downsampling convolution and SwiGLU merger (`tower.py`), a GLM-4 LLM with
sandwich norms and a fused gate/up MLP; masks follow GLM's resize (`geometry.py`); an image-only
processor. GLM-4.5V (`moe.py`): the same tower before a GLM-4.5 mixture-of-experts LLM."""

from .family import GLM4V_BLOCK, Glm4v
from .geometry import GlmResizeGeometry
from .moe import GLM4V_MOE, GLM4V_MOE_BLOCK, Glm4vMoe
from .processor import GlmImageProcessor

__all__ = ["GLM4V_BLOCK", "GLM4V_MOE", "GLM4V_MOE_BLOCK", "Glm4v", "Glm4vMoe", "GlmImageProcessor", "GlmResizeGeometry"]
