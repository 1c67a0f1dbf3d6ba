"""Control models for probe sweeps: the same architecture with every weight re-drawn, and the
trained vision tower and adapter in front of a re-drawn LLM.

Both are built by `redrawn_copy`: a model of the same class and config, drawn by Hugging Face's
own initialisation (seeded per module), placed like the trained model (same devices, same device
map, disk-offloaded parts on disk) and in its dtypes, one block at a time, so a control costs one
more model's memory, never a float32 copy of the whole model on one device. `random_llm` copies in
every tensor that is not the LLM's (state_dict keys outside the LLM's modules, which the
architecture's stage modules locate in any family), so whatever the LLM would recover beyond the
adapter's output shows against a random LLM that sees the same image tokens.
"""

from __future__ import annotations

import os

from torch import nn

from ..errors import UnsupportedModelError
from ..model import HookedMLLM
from ..model.redraw import redrawn_copy


def randomly_initialised(model: HookedMLLM, seed: int, *, offload_folder: str | os.PathLike | None = None) -> HookedMLLM:
    """The same architecture with fresh random weights (HF's own initialisation), seeded, placed
    and typed like `model`. Disk-offloaded parts go to `offload_folder` (default: a temporary
    folder, removed with the control)."""
    return HookedMLLM.from_hf(redrawn_copy(model.hf_model, seed, offload_folder=offload_folder), model.processor)


def random_llm(model: HookedMLLM, seed: int, *, offload_folder: str | os.PathLike | None = None) -> HookedMLLM:
    """The trained vision tower and adapter with a re-drawn LLM (embeddings, blocks, final norm and
    unembedding re-initialised by Hugging Face, seeded) as a new model placed and typed like
    `model`; `model` is untouched.

    The LLM is drawn exactly as `randomly_initialised(model, seed)` draws it. Raises
    UnsupportedModelError when the LLM's modules cannot be told apart from the vision side's."""
    llm = llm_module_names(model)
    trained = model.hf_model
    is_llm = lambda key: any(key == name or key.startswith(name + ".") for name in llm)  # noqa: E731
    _refuse_shared_parameters(trained, is_llm)
    hf = redrawn_copy(trained, seed, keep=lambda key: not is_llm(key), offload_folder=offload_folder)
    return HookedMLLM.from_hf(hf, model.processor)


def llm_module_names(model: HookedMLLM) -> tuple[str, ...]:
    """Qualified names of the Hugging Face modules that make up the LLM: the module holding its
    decoder blocks and token embedding (hence its final norm and rotary tables), and the
    unembedding. Everything else (vision tower, adapter, Qwen3-VL's deepstack mergers, LLaVA-NeXT's
    image newline) is the vision side."""
    hf = model.hf_model
    stages = model.architecture.stage_modules(hf)
    names = {id(module): name for name, module in hf.named_modules()}
    llm = stages.get("llm")
    family = type(hf).__name__
    if llm is None or not llm.layers or llm.embed is None or any(id(m) not in names for m in (*llm.layers, llm.embed)):
        raise UnsupportedModelError(f"{family}: mmlens cannot locate the LLM's blocks and embedding, so it "
                                    f"cannot re-draw the LLM alone; use randomly_initialised for a fully random control")
    # the deepest module holding every block and the embedding
    paths = [names[id(m)].split(".") for m in (*llm.layers, llm.embed)]
    root = []
    for parts in zip(*paths):
        if len(set(parts)) > 1:
            break
        root.append(parts[0])
    root_name = ".".join(root)
    vision = stages.get("vision")
    vision_modules = [*vision.layers, vision.tower] if vision is not None else []
    vision_names = [names[id(m)] for m in vision_modules if m is not None and id(m) in names]
    inside = lambda name, outer: outer == "" or name == outer or name.startswith(outer + ".")  # noqa: E731
    if not vision_names or any(inside(name, root_name) for name in vision_names):
        raise UnsupportedModelError(
            f"{family}: the LLM's modules ({root_name or 'the whole model'}) also hold the vision tower, so "
            f"mmlens cannot re-draw the LLM alone; use randomly_initialised for a fully random control")
    out = [root_name]
    if llm.unembed is not None and id(llm.unembed) in names and not inside(names[id(llm.unembed)], root_name):
        out.append(names[id(llm.unembed)])
    return tuple(out)


def _refuse_shared_parameters(hf: nn.Module, is_llm) -> None:
    """A tensor shared between the LLM and the vision side cannot be re-drawn on one side only."""
    owners: dict[int, set[bool]] = {}
    for name, tensor in [*hf.named_parameters(remove_duplicate=False), *hf.named_buffers(remove_duplicate=False)]:
        owners.setdefault(id(tensor), set()).add(is_llm(name))
    shared = [name for name, tensor in hf.named_parameters(remove_duplicate=False) if len(owners[id(tensor)]) > 1]
    if shared:
        raise UnsupportedModelError(
            f"{type(hf).__name__}: {shared[:3]} are shared between the LLM and the vision side, so the LLM cannot be "
            f"re-drawn alone; use randomly_initialised for a fully random control")
