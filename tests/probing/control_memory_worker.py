"""Peak host memory of building each model control, run in a process of its own by test_controls.

Measured as the peak resident set (Linux `VmHWM`, restarted from the current resident set by
writing 5 to /proc/self/clear_refs) minus the resident set before the build. The parent starts
this process with `MALLOC_MMAP_THRESHOLD_` low, so glibc maps every tensor's storage on its own
and unmaps it when the tensor is freed: the resident set then follows the live tensors, and its
high-water mark is their peak. (tracemalloc sees only Python's allocations, not torch's, and
torch keeps no peak counter for the CPU.) Prints one JSON line: the model's bytes, its resident
bytes and its largest block's bytes, then each control's peak extra bytes, for the model kept
whole and again with three of its four LLM blocks offloaded to disk.
"""

from __future__ import annotations

import gc
import json
import sys
import tempfile

import torch
from accelerate import dispatch_model

from mmlens import HookedMLLM
from mmlens.probing.controls import random_llm, randomly_initialised
from mmlens.testing import tiny_llava

LLM = "model.language_model"


def resident(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(f"{field}:"))


def nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta")


def peaks(model: HookedMLLM) -> dict[str, int]:
    out = {}
    for name, build in (("random_init", randomly_initialised), ("random_llm", random_llm)):
        gc.collect()
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        before = resident("VmRSS")
        control = build(model, 0)
        out[name] = resident("VmHWM") - before
        assert {k: v.dtype for k, v in control.hf_model.state_dict().items()} == {
            k: v.dtype for k, v in model.hf_model.state_dict().items()}, "the control is not in the model's dtypes"
        del control
    return out


def main() -> None:
    torch.set_grad_enabled(False)
    hf, processor = tiny_llava(vision_d_model=128, llm_layers=4, llm_d_model=768, llm_heads=8)
    hf = hf.to(torch.bfloat16)
    report = {"model_bytes": nbytes(hf), "block_bytes": nbytes(hf.model.language_model.layers[0])}
    report["whole"] = peaks(HookedMLLM.from_hf(hf, processor))
    placed = {name: "cpu" for name in ("model.vision_tower", "model.multi_modal_projector", f"{LLM}.embed_tokens",
                                       f"{LLM}.norm", f"{LLM}.rotary_emb", "lm_head")}
    placed |= {f"{LLM}.layers.{layer}": "disk" if layer else "cpu" for layer in range(4)}
    with tempfile.TemporaryDirectory(prefix="mmlens-test-offload-") as folder:
        offloaded = dispatch_model(tiny_llava(vision_d_model=128, llm_layers=4, llm_d_model=768, llm_heads=8)[0]
                                   .to(torch.bfloat16), placed, offload_dir=folder)
        report["offloaded_resident_bytes"] = nbytes(offloaded)
        report["offloaded"] = peaks(HookedMLLM.from_hf(offloaded, processor))
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
