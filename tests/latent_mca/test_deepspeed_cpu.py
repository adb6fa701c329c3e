"""Real DeepSpeed ZeRO-2/3 on 2 CPU processes over gloo: train, skip a NaN step, save, resume, convert, load.

Lightning refuses DeepSpeed without CUDA; ``tests/helpers/ds_cpu_strategy.py`` lifts that for tests only.
The first run JIT-builds DeepSpeed's ``deepspeed_shm_comm`` op (and ``cpu_adam`` for the offload case) into
``~/.cache/torch_extensions``; that needs g++ and ninja and takes minutes on a 2-core machine.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "ds_zero_run.py"


def run_zero(tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    results = [json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    print(f"ZeRO run {args}: {wall:.1f} s wall")
    return results


def check_run(results, stage, model_files):
    r0, r1 = results
    for r in results:
        assert r["world_size"] == 2 and r["zero_stage"] == stage and r["micro_batch"] == 4
        # The NaN loss was on rank 0 only; DeepSpeed's overflow check skipped the step on both ranks.
        assert r["changed"] == {"0": True, "1": True, "2": False, "3": True}
        assert r["skipped_steps"] == [2] and r["logged_skips"] == 1.0
        # Resumed from the ZeRO directory: step count, guard counts and weights come back.
        assert r["resumed_global_step"] == 6 and r["resumed_steps"] == [4, 5]
        assert r["resumed_skips"] == 1 and r["resume_start_diff"] == 0.0
    assert r0["ckpt_is_dir"]
    assert set(model_files) | {"latest", "zero_to_fp32.py"} <= set(r0["ckpt_files"])
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= set(r0["ckpt_files"])
    # One fp32 file with the trainable weights only (exclude_frozen_parameters), loadable by the module.
    assert r0["fp32_keys"] == ["head.0.bias", "head.0.weight", "head.2.bias", "head.2.weight"]
    assert r0["fp32_global_step"] == 4
    assert r0["missing_after_load"] == ["frozen.bias", "frozen.weight"]
    assert r0["max_abs_diff"] == 0.0


@pytest.mark.slow
def test_zero2_on_cpu(tmp_path):
    check_run(run_zero(tmp_path, "--stage", "2"), 2, ["mp_rank_00_model_states.pt"])


@pytest.mark.slow
def test_zero3_on_cpu(tmp_path):
    check_run(run_zero(tmp_path, "--stage", "3"), 3,
              [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)])


@pytest.mark.slow
def test_zero2_offload_with_deepspeed_cpu_adam(tmp_path):
    results = run_zero(tmp_path, "--stage", "2", "--offload")
    assert all(r["offload"] for r in results)
    check_run(results, 2, ["mp_rank_00_model_states.pt"])
