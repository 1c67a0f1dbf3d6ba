"""Run by tests/test_distributed.py under torchrun (2 processes, gloo): the Python functions given
the process group torchrun sets up. Rank 0 writes what every rank computed to OUT for comparison,
and, for the experiments, what it computes alone (one process, `distributed.alone()`) from the
same sweep: the per-image results must be the same computation."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mmlens import HookedMLLM, distributed
from mmlens.data import load_segmentation
from mmlens.errors import InputError
from mmlens.experiments import anchor_knockout, find_recovery_heads, position_study
from mmlens.probing import probe_sweep

SITES = ["vision.blocks.1.hook_resid_post", "adapter.hook_out", "blocks.1.hook_resid_post"]


def sweeps(model, scenes, group=None):
    """The sweeps compared: ridge with its shuffled-label control, logistic fitted in small chunks."""
    ridge = probe_sweep(model, scenes, sites=SITES, probe="ridge", control="shuffled_labels", progress=False,
                        n_boot=1000, batch_size=4, group=group)
    logistic = probe_sweep(model, scenes, sites=SITES[1:], probe="logistic", progress=False, n_boot=1000, batch_size=4,
                           max_iter=15, max_train_tokens_per_image=40, logistic_memory_mb=0.05, group=group)
    return {"ridge": ridge, "logistic": logistic}


def experiments(model, scenes, sweep, group=None) -> dict:
    """The three experiments on 6 held-out images in batches of 4 (one batch per rank); what each
    keeps per image, and its tables."""
    knockout = anchor_knockout(model, sweep, n_pairs=2, n_control=1, n_boot=1000, batch_size=4, group=group)
    position = position_study(model, scenes, probe="ridge", sites=["blocks.1.hook_resid_post"], n_boot=1000,
                              batch_size=4, group=group)
    heads = find_recovery_heads(model, sweep, corruption="counterfactual", n_images=8, top_k=2, n_maps=2, n_boot=1000,
                                batch_size=4, group=group)
    if not distributed.is_main(group):  # the knockout's and position study's per-image results went to rank 0
        assert knockout is None and position is None
        return {"heads": heads.table}
    return {
        "knockout": {"tables": {"table": knockout.table, "effects": knockout.effects, "pairs": knockout.pairs},
                     "numbers": [knockout.anchors_per_image, knockout.targets_per_image, knockout.blocked_mass,
                                 knockout.control_anchor_share]},
        "position": {"tables": {"summary": position.summary, "gains": position.gains,
                                "per_position": position.per_position, "curve": position.position_curves()},
                     "per_image": {"scored": position._scored, **{f"{c} {h}": v for (c, h), v in position._hits.items()}}},
        "heads": {"tables": {"heads": heads.table, "top_k": heads.top_k}, "summary": heads.summary,
                  "per_image": {"exact": heads.exact, "attribution": heads.attribution},
                  "maps": [(m.dataset_index, m.queries, m.anchors, m.attention) for m in heads.maps]},
    }


def main(out: Path) -> None:
    distributed.init_from_environment()
    assert distributed.world_size() == 2 and dist.get_backend() == "gloo"
    torch.set_grad_enabled(False)
    model = HookedMLLM.from_pretrained("tiny-shapes-llava")
    scenes = load_segmentation("scenes", split="validation", n=24, seed=0)
    found = sweeps(model, scenes, group=dist.group.WORLD)
    studied = experiments(model, scenes, found["ridge"], group=dist.group.WORLD)
    # held-out results were sent to rank 0 batch by batch: rank 1 holds the probes (the same sums,
    # so the same numbers) and its split, no held-out result, and refuses a summary
    if not distributed.is_main():
        for k, sweep in found.items():
            assert sweep.rank_share and not sweep.predictions and not sweep.scores and sweep.table.empty, k
            try:
                sweep.summary()
            except InputError as error:
                assert "rank 1's share" in str(error)
            else:
                raise AssertionError("a rank's share gave a summary")
    held = distributed.gather_in_order([(distributed.rank(), {k: (s.probes, s.confusion) for k, s in found.items()})])
    for k in found:
        for key, probe in held[0][k][0].items():
            assert torch.equal(probe.weight, held[1][k][0][key].weight), (k, key)
            assert (held[0][k][1][key] == held[1][k][1][key]).all(), (k, key)  # rank 0 shares its confusion
    if distributed.is_main():
        with distributed.alone():  # the same experiments in one process, from the same sweep
            alone = experiments(model, scenes, found["ridge"])
        torch.save({k: {"table": s.table, "predictions": s.predictions, "probes": s.probes,
                        "test_indices": s.test_indices} for k, s in found.items()}
                   | {"experiments": studied, "experiments_alone": alone}, out)
    distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
