"""Write examples/tutorial.ipynb from the cells below and run it, so the notebook is stored with its outputs.

Run: `python examples/build_tutorial.py [--no-execute] [--out examples/tutorial.ipynb]`. The notebook
is the study on the embedded model, step by step, for a researcher who knows TransformerLens; the
docs site shows it with those stored outputs (mkdocs-jupyter, `execute: false`), so `make docs`
stays offline and fast, and tests/test_notebook.py runs it again so that it cannot rot. Edit the
cells here, rerun this script, and commit both files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Figures are drawn by `show` (defined in the notebook's first code cell) as two representations:
# plotly's own JSON, which JupyterLab and VS Code draw offline, and an HTML div that calls the
# plotly.js the docs site already ships beside its figures (loaded by the first markdown cell).
CELLS: list[tuple[str, str]] = [
    ("markdown", """\
# Tutorial: the segmentation study on the embedded model

<script src="figures/plotly.min.js"></script>

This notebook walks the study mmlens was built for — where does a multimodal LLM lose and recover
the information needed to segment an image? — on `tiny-shapes-llava`, a small LLaVA that ships
inside the package, and synthetic shape scenes with exact masks. Everything runs offline on a CPU
in about a minute. If you know TransformerLens, most of it will look familiar: `HookedMLLM` is a
`HookedRootModule`, so `run_with_cache`, `run_with_hooks` and hook names work as there, with
three stages instead of one: the vision tower (`vision.*`), the adapter (`adapter.*`) and the LLM
(`blocks.*`, TransformerLens's own names).

The steps: load the model and scenes; hooks and the cache; the probe curve along the pipeline;
an attention knockout; patching and recovery heads; features of a sparse autoencoder (SAE)."""),
    ("code", """\
import time
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm without ipywidgets: plain bars are fine

import torch
from IPython.display import display

import datasets
import transformers

from mmlens import HookedMLLM
from mmlens.data import load_segmentation, segmentation_info

# progress bars of dataset generation and weight loading would fill the outputs with redraws
datasets.disable_progress_bars()
transformers.utils.logging.disable_progress_bar()
torch.set_grad_enabled(False)  # analysis only; the SAE trainer turns gradients on where it needs them
torch.set_num_threads(1)  # the model is tiny: threads cost more to coordinate than they save here
started = time.perf_counter()


def show(fig):
    \"\"\"Draw a plotly figure in Jupyter (its JSON) and in the docs site (HTML using the site's plotly.js).\"\"\"
    fig.update_layout(width=None, autosize=True)  # fit the notebook's column instead of a fixed width
    display({"application/vnd.plotly.v1+json": fig.to_plotly_json(),
             "text/html": fig.to_html(include_plotlyjs=False, full_html=False)}, raw=True)"""),
    ("markdown", """\
## 1. The model and the scenes

`from_pretrained` takes a shipped name, a local Hugging Face folder or a hub id; the embedded model
needs no download. The scenes are drawn shapes whose classes come in look-alike pairs (same colour,
different shape), so a single patch is ambiguous and only context tells the classes apart: the
setting in which an LLM could *recover* information the vision side lost."""),
    ("code", """\
model = HookedMLLM.from_pretrained("tiny-shapes-llava")
scenes = load_segmentation("scenes", split="validation", n=64, seed=0)
print(f"vision tower: {model.cfg.vision.n_layers} layers; LLM: {model.cfg.n_layers} layers, d_model {model.cfg.d_model}")
print(f"{len(scenes)} scenes; classes: {', '.join(segmentation_info(scenes).class_names)}")"""),
    ("markdown", """\
## 2. Hooks and the cache

`model.prepare` turns images (and prompts) into `MultimodalInputs`, which carry the *layout*:
where each image's tokens sit in the sequence and which pixels each token covers. One
`run_with_cache` records every hook point of the three stages."""),
    ("code", """\
images = [scenes[i]["image"] for i in range(2)]
inputs = model.prepare(images)
logits, cache = model.run_with_cache(inputs)
layout = inputs.layout
print(f"{len(cache)} activations cached; the image becomes a {layout.grid[0]}x{layout.grid[1]} grid of LLM tokens")
for name in ("vision.blocks.0.hook_resid_post", "adapter.hook_out", "blocks.0.hook_resid_pre", "blocks.0.attn.hook_pattern"):
    print(f"  {name:<34} {tuple(cache[name].shape)}")"""),
    ("markdown", """\
Hooks edit the forward as in TransformerLens. Here no image token may attend to another image
token in LLM layer 0 (only to itself and the text before the image): how much do the last token's
logits move?"""),
    ("code", """\
image_tokens = layout.image_token_mask()[0]


def block_image_to_image(pattern, hook):
    keep = torch.eye(pattern.shape[-1], dtype=torch.bool)
    blocked = image_tokens[:, None] & image_tokens[None, :] & ~keep
    pattern[:, :, blocked] = 0.0
    return pattern


edited = model.run_with_hooks(inputs, fwd_hooks=[("blocks.0.attn.hook_pattern", block_image_to_image)])
print(f"largest change of a last-token logit: {(edited - logits)[:, -1].abs().max():.4f}")"""),
    ("markdown", """\
## 3. The probe curve along the pipeline

A linear probe at every site — patch embeddings, vision layers, the adapter, LLM layers — predicts
each image token's class; its predictions are painted back onto pixels and scored by mIoU against
the mask. The curve shows where the information is lost (a drop at the adapter) and whether the LLM
gets it back. Ridge probes have a closed form and their penalty is chosen by cross-validation on
the training images; held-out images are scored, with bootstrap intervals over images. With 64
scenes (48 to train, 16 held out) the intervals are wide, and the findings say only what they
allow; `mmlens demo` runs the same on 1,200 scenes."""),
    ("code", """\
from mmlens.probing import probe_sweep
from mmlens.viz import plot_probe_curve

sweep = probe_sweep(model, scenes, sites="all", probe="ridge", progress=False)
miou = sweep.summary()["value"]
print(f"probe mIoU at the adapter output: {miou['adapter_out_miou']:.3f}; "
      f"at the recovery layer: {miou['recovery_layer_miou']:.3f}")
print("\\n".join(sweep.findings()))
show(plot_probe_curve(sweep))"""),
    ("markdown", """\
## 4. A knockout

Which tokens does the LLM use to fix a confusable token? *Anchors* are tokens the adapter-level probe
already classifies right in the most confused class pairs. `anchor_knockout` blocks attention from
the anchors to the other image tokens in the LLM and compares the targets' accuracy with blocking
as many random tokens of the same class (the control). A finding is stated only when its 95%
interval excludes zero; on 16 held-out scenes, expect it to say what cannot be claimed."""),
    ("code", """\
from mmlens.experiments import anchor_knockout

knockout = anchor_knockout(model, sweep, n_pairs=2, n_control=1)
print("\\n".join(knockout.findings()))
show(knockout.figure())"""),
    ("markdown", """\
## 5. Patching and recovery heads

Activation patching, head by head: corrupt the run (here each image is swapped for another scene),
patch one head's clean output back in, and measure how much of the probe margin at the last LLM
layer comes back. Half of the images choose the heads, the other half score them; attribution
patching gives a gradient estimate of every head's effect for comparison. The recovery map shows
where a top head's image tokens attend."""),
    ("code", """\
from mmlens.experiments import find_recovery_heads

recovery = find_recovery_heads(model, sweep, corruption="counterfactual", n_images=8, top_k=2, n_maps=1)
print(recovery.table[["rank", "layer", "head", "effect", "effect_low", "effect_high"]].head(4).to_string(index=False))
figures = recovery.figures()
show(figures["head_heatmap"])
show(figures["recovery_map_0"])"""),
    ("markdown", """\
Any head's attention can be drawn on the image the same way: `attention_on_image` reads one
layer's pattern (only that hook is cached) from a query token, a token group or, in the vision
tower, a patch cell, and places each image token's weight on the pixels it covers, whatever the
family's layout (tiles, merged grids). Here the top recovery head, from the prompt's last text
token."""),
    ("code", """\
from mmlens.experiments import attention_on_image
from mmlens.viz import plot_attention_on_image

top = recovery.table.iloc[0]
attention = attention_on_image(model, inputs, layer=int(top["layer"]), heads=[int(top["head"])], query="last_text")
print(f"L{int(top['layer'])}H{int(top['head'])} puts {float(attention.mass[0, 0]):.2f} of the last text token's "
      "attention on the first image")
show(plot_attention_on_image(attention))"""),
    ("markdown", """\
## 6. SAE features on the image tokens

A sparse autoencoder rewrites the adapter output as a few active features out of many (TopK,
SAELens's objective and file format). `sae_study` trains one on the training scenes, finds the
feature best aligned with each class (chosen on training scenes, IoU measured on held-out ones) and
ablates it to see what the probe loses; `feature_maps` paints features back onto the image."""),
    ("code", """\
from mmlens.sae import canvas_picture, feature_maps, sae_study

study = sae_study(model, scenes, "adapter.hook_out", architecture="topk", k=4, d_sae=64, steps=200,
                  batch_size=256, lr=2e-3)
held = study.reconstruction.iloc[0]
print(f"variance explained on held-out tokens: {held['variance_explained']:.3f}")
print(study.alignment[["class", "feature", "iou", "random_iou"]].to_string(index=False, float_format="%.3f"))
scene = scenes[int(study.test_rows[0])]
maps = feature_maps(model, study.sae, model.prepare([scene["image"]]), features=list(study.alignment["feature"][:3]))
show(maps.figure(0, picture=canvas_picture(model, scene["image"])))"""),
    ("markdown", """\
## Where next

- The same study as one command, with a report: `mmlens study examples/configs/tiny_shapes_study.yaml`.
- On a 7B model on one GPU (LLaVA-1.5, Qwen2.5-VL, Gemma 3): the *Real models* page of the docs.
- Each step in depth: the *Probing*, *Interventions*, *Patching and recovery heads* and *Sparse
  autoencoders* guides."""),
    ("code", """\
print(f"notebook ran in {time.perf_counter() - started:.0f} s")"""),
]


def build(execute: bool):
    import nbformat

    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_markdown_cell(source) if kind == "markdown" else nbformat.v4.new_code_cell(source)
                      for kind, source in CELLS]
    if execute:
        from nbclient import NotebookClient

        NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE / "tutorial.ipynb")
    parser.add_argument("--no-execute", action="store_true", help="write the cells without running them")
    args = parser.parse_args()
    import nbformat

    started = time.perf_counter()
    notebook = build(execute=not args.no_execute)
    nbformat.write(notebook, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
