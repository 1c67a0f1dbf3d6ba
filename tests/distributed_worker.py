"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): the Python functions given
the process group torchrun sets up. Rank 0 writes what every rank computed to OUT for comparison."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmlens import HookedMLLM, distributed
from mmlens.data import load_segmentation
from mmlens.probing import probe_sweep

SITES = ["vision.blocks.1.hook_resid_post", "adapter.hook_out", "blocks.1.hook_resid_post"]


def sweeps(model, scenes, group=None):
    """The sweeps compared: ridge with its shuffled-label control, logistic fitted in small chunks."""
    ridge = probe_sweep(model, scenes, sites=SITES, probe="ridge", control="shuffled_labels", progress=False,
                        n_boot=20, batch_size=4, group=group)
    logistic = probe_sweep(model, scenes, sites=SITES[1:], probe="logistic", progress=False, n_boot=20, batch_size=4,
                           max_iter=15, max_train_tokens_per_image=40, logistic_memory_mb=0.05, group=group)
    return {"ridge": ridge, "logistic": logistic}


def main(out: Path) -> None:
    distributed.init_from_environment()
    assert distributed.world_size() == 2 and dist.get_backend() == "gloo"
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0)
    found = sweeps(model, scenes, group=dist.group.WORLD)
    # every rank returns the whole sweep: rank 1's must equal rank 0's
    gathered = distributed.gather_in_order([(distributed.rank(), {k: s.table for k, s in found.items()})])
    for k in found:
        assert gathered[0][k].equals(gathered[1][k]), k
    if distributed.is_main():
        torch.save({k: {"table": s.table, "predictions": s.predictions, "probes": s.probes,
                        "test_indices": s.test_indices} for k, s in found.items()}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
