"""Per-rank devices under torchrun: which GPU (or GPUs, for a device map) each rank owns, and the
errors that state the rule. The rules are pure functions of the node (GPU count, LOCAL_RANK,
LOCAL_WORLD_SIZE), so they are tested here for nodes this machine does not have; loading onto a
real GPU runs where CUDA exists."""

from __future__ import annotations

import typing

import pytest
import torch

from mmlens.errors import ConfigError, InputError
from mmlens.placement import (DEVICE_MAPS, NodeSlot, collective_gpu, placement_problem, rank_gpus, rank_max_memory,
                              rank_placement)
from mmlens.runs import config_from_dict
from mmlens.runs.config import StudyConfig

ONE = NodeSlot()  # one process, no torchrun


def torchrun_slot(local_rank: int, local_ranks: int) -> NodeSlot:
    return NodeSlot(local_rank, local_ranks, several=True)


def test_each_rank_takes_the_gpu_of_its_local_rank():
    assert [rank_gpus(8, torchrun_slot(r, 8), split=False) for r in range(8)] == [[r] for r in range(8)]
    assert rank_placement("cuda", None, n_gpus=2, slot=torchrun_slot(1, 2)) == {"device": "cuda:1"}
    assert rank_placement("auto", None, n_gpus=2, slot=torchrun_slot(1, 2)) == {"device": "cuda:1"}
    # auto without a GPU is the CPU, in one process or many; cuda in one process is torch's own cuda
    assert rank_placement("auto", None, n_gpus=0, slot=torchrun_slot(1, 2)) == {"device": "cpu"}
    assert rank_placement("cpu", None, n_gpus=2, slot=torchrun_slot(1, 2)) == {"device": "cpu"}
    assert placement_problem("cuda", None, n_gpus=1, slot=ONE) is None
    assert "sees no CUDA device" in placement_problem("cuda", None, n_gpus=0, slot=ONE)


def test_more_ranks_than_gpus_or_one_named_gpu_for_all_is_refused_with_the_rule():
    with pytest.raises(InputError, match=r"LOCAL_RANK 2 has none.*--nproc-per-node 2"):
        rank_placement("cuda", None, n_gpus=2, slot=torchrun_slot(2, 4))
    assert "no CUDA device" in placement_problem("cuda", None, n_gpus=0, slot=torchrun_slot(0, 2))
    assert "cuda:LOCAL_RANK" in placement_problem("cuda:0", None, n_gpus=2, slot=torchrun_slot(1, 2))


def test_a_device_map_splits_each_rank_over_its_own_share_of_the_gpus():
    owned = [rank_gpus(8, torchrun_slot(r, 4), split=True) for r in range(4)]
    assert owned == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert rank_gpus(8, torchrun_slot(0, 1), split=True) == list(range(8))
    available = {**{g: (80 + g) * 2**30 for g in range(8)}, "cpu": 1000 * 2**30}
    placed = rank_placement("cpu", "auto", n_gpus=8, slot=torchrun_slot(2, 4), available=available)
    # only the rank's GPUs, each at what it has free, and a quarter of the host for offloaded layers
    assert placed == {"device_map": "auto", "max_memory": {4: 84 * 2**30, 5: 85 * 2**30, "cpu": 250 * 2**30}}
    assert rank_max_memory({0: 5, 1: 6}, [1], torchrun_slot(1, 2)) == {1: 6}
    # one process: accelerate places the layers over every visible GPU itself
    assert rank_placement("cpu", "balanced", n_gpus=8, slot=ONE) == {"device_map": "balanced"}


def test_gpus_that_do_not_divide_among_the_ranks_are_refused_with_the_rule():
    with pytest.raises(InputError, match=r"8 GPU\(s\) for 3 processes.*divides 8 \(e\.g\. --nproc-per-node 2\)"):
        rank_placement("cpu", "auto", n_gpus=8, slot=torchrun_slot(0, 3), available={})
    assert "1 GPU(s) for 2 processes" in placement_problem("cpu", "auto", n_gpus=1, slot=torchrun_slot(0, 2))
    assert "this node has no GPU" in placement_problem("cpu", "auto", n_gpus=0, slot=torchrun_slot(0, 2))
    with pytest.raises(InputError, match="no memory figure for GPU"):
        rank_max_memory({"cpu": 1}, [0], torchrun_slot(0, 1))


def test_the_config_accepts_accelerates_strategies_only():
    config_type = typing.get_type_hints(StudyConfig)["device_map"]
    assert typing.get_args(typing.get_args(config_type)[0]) == DEVICE_MAPS
    base = {"model": "tiny-shapes-llava", "dataset": {"name": "scenes", "n": 8}}
    assert config_from_dict({**base, "device_map": "balanced"}).device_map == "balanced"
    with pytest.raises(ConfigError, match="device_map: must be one of 'auto', 'balanced'"):
        config_from_dict({**base, "device_map": "evenly"})
    assert "must be one of auto" in placement_problem("cpu", "evenly", n_gpus=0, slot=ONE)


def test_the_slot_comes_from_torchruns_variables(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two processes
    assert NodeSlot.from_environment() == NodeSlot(1, 2, True)
    # on this CPU machine a torchrun rank with device: cpu collects over gloo (no GPU)
    assert collective_gpu("cpu", None) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert NodeSlot.from_environment() == ONE


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_rank_loads_its_model_onto_its_own_gpus():
    from mmlens import HookedMLLM

    slot = torchrun_slot(0, 1)  # one process per node: every visible GPU is its own
    n_gpus = torch.cuda.device_count()
    assert collective_gpu("auto", None) in range(n_gpus)
    whole = HookedMLLM.from_pretrained("tiny-shapes-llava", **rank_placement("auto", None, n_gpus=n_gpus, slot=slot))
    assert whole.cfg.device == torch.device("cuda:0")
    split = HookedMLLM.from_pretrained("tiny-shapes-llava", **rank_placement("cpu", "auto", n_gpus=n_gpus, slot=slot))
    assert set(split.hf_model.hf_device_map.values()) <= set(range(n_gpus)) | {"cpu"}
