"""Load a LLaVA, cache all three stages, and edit attention in the vision tower and the LLM.

Run: `python examples/01_cache_and_hooks.py [MODEL]` where MODEL is a shipped model name, a local
Hugging Face LLaVA folder or a hub id. Without MODEL it uses the embedded default when it is
installed, else a tiny random-weight LLaVA built from configs (no download either way).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from PIL import Image

from mmlens import HookedMLLM
from mmlens.testing import tiny_llava
from mmlens.zoo import shipped_models


def load(name: str | None) -> HookedMLLM:
    if name:
        return HookedMLLM.from_pretrained(name)
    if "tiny-shapes-llava" in shipped_models():
        return HookedMLLM.from_pretrained("tiny-shapes-llava")
    print("(no shipped model installed: using a tiny random-weight LLaVA)")
    return HookedMLLM.from_hf(*tiny_llava(image_size=64, patch_size=8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="shipped name (tiny-shapes-llava), local LLaVA folder or hub id (default: the embedded model)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = load(args.model)
    print(model)

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)) for _ in range(2)]
    inputs = model.prepare(images, ["what is in the image ?", "how many"])
    layout = inputs.layout
    print(f"\nbatch of {len(inputs)}; image token grid {layout.grid}; "
          f"row 0 image tokens at positions {layout.positions(0)[0].item()}..{layout.positions(0)[-1].item()}")
    print(f"token 5 of the grid sits in cell {layout.token_cells[5].tolist()} and sees pixels "
          f"(y0, x0, y1, x1) = {layout.token_boxes[5].tolist()} of the preprocessed image")

    logits, cache = model.run_with_cache(inputs)
    print(f"\ncached {len(cache)} activations across the three stages, e.g.:")
    for name in ("vision.blocks.0.hook_resid_post", "vision.blocks.0.attn.hook_pattern",
                 "adapter.hook_in", "adapter.hook_out", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"):
        print(f"  {name:<36} {tuple(cache[name].shape)}")

    # How much do image tokens in the LLM attend to other image tokens, layer by layer?
    image = layout.image_token_mask()
    print("\nmean attention mass image -> image tokens per LLM layer (row 0):")
    for l in range(model.cfg.n_layers):
        pattern = cache[f"blocks.{l}.attn.hook_pattern"][0]  # [head, query, key]
        mass = pattern[:, image[0]][:, :, image[0]].sum(-1).mean()
        print(f"  layer {l}: {mass:.3f}")

    # An edit in the vision tower: no patch may read the CLS token in vision layer 0.
    def block_cls(scores, hook):
        scores[:, :, 1:, 0] = float("-inf")
        return scores

    edited = model.run_with_hooks(inputs, fwd_hooks=[("vision.blocks.0.attn.hook_attn_scores", block_cls)])
    answer = model.to_str_tokens(logits[0, -1].argmax(-1, keepdim=True))[0]
    print(f"\nblocking patch -> CLS attention in vision layer 0 moves the last-token logits by "
          f"{(edited - logits)[:, -1].abs().max():.4f} (next token before the edit: {answer!r})")


if __name__ == "__main__":
    main()
