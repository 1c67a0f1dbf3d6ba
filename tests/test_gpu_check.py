"""benchmarks/gpu_check.py, the device check, in its tiny mode: the same code paths as the GPU run
(meta-device construction, timings, sweeps, head sweep, precision), on the CPU in seconds."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from transformers import LlavaForConditionalGeneration

ROOT = Path(__file__).parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STEPS = ["build", "hf_forward", "overhead", "ridge_sweep", "logistic_sweep", "head_sweep", "precision"]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tiny_check_runs_every_step_and_writes_each_to_the_json(tmp_path):
    out = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["mode"] == "tiny" and list(found["steps"]) == STEPS
    steps = found["steps"]
    assert not [name for name, entry in steps.items() if "error" in entry]
    assert all(entry["peak_memory_gb"] > 0 and entry["seconds"] >= 0 for entry in steps.values())
    assert steps["hf_forward"]["tflops_per_second"] > 0
    assert all(steps["overhead"][f"{name}_over_hf"] > 0 for name in ("no_hooks", "every_layer_listened",
                                                                      "cache_every_layer"))
    assert len(steps["ridge_sweep"]["miou"]) == len(steps["logistic_sweep"]["miou"]) == 3
    assert steps["head_sweep"]["finite"] and steps["head_sweep"]["all_heads_seconds_estimate"] > 0
    # bfloat16 against the same weights in float32: different, but by rounding only
    precision = steps["precision"]
    assert 0 < precision["logits"]["relative_rms"] < 0.05 and 0 < precision["adapter.hook_out"]["relative_rms"] < 0.05


def test_a_failed_step_is_recorded_and_the_next_ones_still_run(tmp_path):
    check = _module()
    report = check.Report(tmp_path / "check.json", {"mode": "test"})
    assert report.step("broken", lambda: 1 / 0, torch.device("cpu")) is None
    assert report.step("fine", lambda: {"value": 1}, torch.device("cpu")) is not None
    steps = json.loads((tmp_path / "check.json").read_text())["steps"]
    assert "ZeroDivisionError" in steps["broken"]["error"] and steps["fine"]["value"] == 1


def test_the_model_built_on_the_meta_device_has_the_buffers_of_one_built_normally():
    """Parameters are drawn afresh, but buffers (rotary frequencies, position ids) must be the
    ones Hugging Face computes: garbage there would time and compare a broken model."""
    check = _module()
    meta_built, _ = check.build_model(check.TINY, torch.device("cpu"), torch.float32)
    torch.manual_seed(0)
    normal = LlavaForConditionalGeneration(meta_built.config)
    buffers = dict(normal.named_buffers())
    assert buffers and dict(meta_built.named_buffers()).keys() == buffers.keys()
    for name, buffer in meta_built.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0, msg=name)
    assert all(torch.isfinite(p).all() for p in meta_built.parameters())
