"""A real phase on two DDP processes (gloo, CPU): disjoint data, equal step counts, one export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from latent_mca.shards import read_sizes
from tests.helpers.demo_run import build_demo_run
from tests.helpers.reliability_run import BACKBONE, WORLD, shard_members

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "ddp_phase_run.py"
PHASE = "inverse_dynamics_ddp"


def train_keys(world: Path) -> dict[str, set[str]]:
    """The sample keys of the demo config's training shards (paired 0-6, every text-only shard)."""
    paired = [world / "paired" / f"train-{i:06d}.tar" for i in range(7)]
    text = [world / "text_only" / name for name in read_sizes(world / "text_only")]
    return {part: {f"{part}/{name.split('.')[0]}" for shard in shards for name in shard_members(shard)}
            for part, shards in (("paired", paired), ("text_only", text))}


@pytest.mark.slow
def test_inverse_dynamics_on_two_ddp_ranks(tmp_path):
    run = build_demo_run(tmp_path / "run", seed=0, world=WORLD, backbone=BACKBONE)
    out, steps = tmp_path / "keys", 4  # 4 batches of 4 paired + 4 text-only rows per rank: one epoch
    env = {**os.environ, "LATENT_MCA_RUN_DIR": str(run), "LATENT_MCA_PHASE": PHASE, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), str(out), str(steps)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((out / f"keys_rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == steps
    assert len(ranks[0]["batches"]) == len(ranks[1]["batches"]) == steps, "equal batch counts on every rank"

    seen = [{k for batch in r["batches"] for k in batch} for r in ranks]
    assert not seen[0] & seen[1], f"both ranks trained on {sorted(seen[0] & seen[1])[:5]}"
    expected = train_keys(run / "world")
    # 7 paired shards split 4/3 between the ranks: rank 1 repeats some of its own samples to keep up.
    for part, keys in expected.items():
        for rank in range(2):
            assert {k for k in seen[rank] if k.startswith(part)}, f"rank {rank} saw no {part} data"
        assert {k for s in seen for k in s if k.startswith(part)} == keys, f"one epoch covers every {part} sample"

    exports = sorted(p.parent for p in run.rglob("export_complete.json"))
    assert exports == [run / PHASE / "export"], "rank 0 alone writes the export"
    assert json.loads((run / PHASE / "export" / "export_complete.json").read_text())["global_step"] == steps
    assert [p.name for p in (run / "logs" / PHASE).iterdir()] == ["version_0"], "one TensorBoard run"


@pytest.mark.slow
def test_dapo_dynamic_sampling_on_two_ddp_ranks_updates_in_step(tmp_path):
    """Rank 0 fills its update in one draw, rank 1 needs two and stays short: both update after two draws."""
    from tests.helpers.demo_run import demo_config, fit_phase

    run = build_demo_run(tmp_path / "run", seed=0, world=WORLD, backbone=BACKBONE)
    with pytest.MonkeyPatch.context() as mp:
        for phase in ("projector", "inverse_dynamics", "bc"):
            fit_phase(run, phase, demo_config(phase), monkeypatch=mp, steps=2)
    out, steps = tmp_path / "keys", 2
    env = {**os.environ, "LATENT_MCA_RUN_DIR": str(run), "LATENT_MCA_PHASE": "latent_rl_ddp", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "helpers" / "ddp_rl_run.py"), str(run), str(out),
                           str(steps)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((out / f"keys_rank{r}.json").read_text()) for r in range(2)]
    assert [r["global_step"] for r in ranks] == [steps, steps]  # max_steps counts updates
    assert [len(r["batches"]) for r in ranks] == [2 * steps, 2 * steps]  # two draws per update on both ranks
    drawn = [{k for batch in r["batches"] for k in batch} for r in ranks]
    assert not drawn[0] & drawn[1], "the ranks drew disjoint prompts"
    assert (run / "latent_rl_ddp" / "export" / "export_complete.json").exists()
