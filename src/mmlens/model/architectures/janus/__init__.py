"""Janus: its understanding path, a SigLIP-style tower and an MLP aligner feeding a Llama LLM a
fixed grid of image tokens (its VQ model only generates images, which mmlens does not hook)."""

from .family import Janus

__all__ = ["Janus"]
