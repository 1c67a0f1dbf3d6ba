from .family import Mllama

__all__ = ["Mllama"]
