import json
import math

import pytest
import torch
import yaml

from latent_mca.checkpoint import load_phase
from latent_mca.models import BackboneConfig
from latent_mca.phases import LatentRLModule
from latent_mca.rl.update import RLConfig
from tests.helpers.demo_run import (
    AlternatingReward,
    OneGroupTies,
    adamw,
    backbone_untouched,
    build_demo_run,
    changed,
    demo_config,
    dialogue_data,
    fit_phase,
    log_dir,
    read_scalars,
    snapshot,
    tiny_trainer,
)

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "bnpo")
LATENT = ("projector", "inverse", "codebook", "world_model", "policy")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_latent_rl_runs_every_algorithm_from_the_demo_config(rl_run, bc_run, algorithm):
    run = rl_run("latent_rl", algorithm)
    saved = yaml.safe_load((log_dir(run.run_dir, run.name) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["rl"]["algorithm"] == algorithm
    rewards = [v for _, v in read_scalars(run.run_dir, run.name)["train/reward"]]
    assert len(rewards) == run.steps and all(math.isfinite(r) and r >= 0 for r in rewards), rewards
    export = load_phase(run.export)
    assert export.phase == "latent_rl" and set(export.configs) == set(LATENT)
    assert export.lineage[-1] == str(bc_run.export)
    assert json.loads((run.export / "export_complete.json").read_text())["global_step"] == run.steps


def test_one_latent_rl_step_changes_only_the_policy(bc_run, tmp_path):
    run = bc_run.run_dir
    module = LatentRLModule(BackboneConfig(path=str(run / "sft" / "export")), init_from=str(bc_run.export),
                            reward=AlternatingReward(), rl=RLConfig(num_generations=2, max_new_tokens=6, beta=0.05),
                            optimizer=adamw(), export_dir=str(tmp_path / "export"))
    module.configure_model()
    before = snapshot(module)
    tiny_trainer(tmp_path, steps=1).fit(module, datamodule=dialogue_data(run))
    moved = changed(before, module)
    policy = [n for n in before if n.startswith("policy.")]
    assert policy and all(moved[n] for n in policy), sorted(n for n in policy if not moved[n])
    others = [n for n in before if not n.startswith("policy.")]
    groups = {n.split(".")[0] for n in others}
    assert {"backbone", "codebook", "world_model", "carried", "ref_policy"} <= groups
    assert not any(moved[n] for n in others), sorted(n for n in others if moved[n])
    backbone_untouched(module, before)

    export, parent = load_phase(tmp_path / "export"), load_phase(bc_run.export)
    for name in ("codebook", "world_model", "projector", "inverse"):
        mine, theirs = export.state_dict(name), parent.state_dict(name)
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs), f"latent RL changed the frozen {name}"
    mine, theirs = export.state_dict("policy"), parent.state_dict("policy")
    assert not all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_dapo_dynamic_sampling_refills_each_update_from_the_next_batches(bc_run, tmp_path):
    """Each batch of 2 prompts has one tying group: every update draws 2 batches and uses their 2 kept groups."""
    run = bc_run.run_dir
    reward = OneGroupTies(group_size=2)
    rl = RLConfig(algorithm="dapo", num_generations=2, max_new_tokens=6, dynamic_sampling=True)
    module = LatentRLModule(BackboneConfig(path=str(run / "sft" / "export")), init_from=str(bc_run.export),
                            reward=reward, rl=rl, optimizer=adamw(), export_dir=str(tmp_path / "export"))
    module.configure_model()
    before = snapshot(module)
    data = dialogue_data(run)
    trainer = tiny_trainer(tmp_path, steps=2)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 2 and reward.calls == 4  # max_steps counts updates; 2 batches each
    assert module.train_batches_seen == 4 and data.consumed_train_batches() == 4  # the data position follows
    metrics = trainer.callback_metrics
    assert float(metrics["train/sampling_batches"]) == 2 and float(metrics["train/groups_kept"]) == 0.5
    assert float(metrics["train/groups_short"]) == 0
    assert any(changed(before, module)[n] for n in before if n.startswith("policy."))
    # The batch count travels in the checkpoint: a resumed run continues from batch 4, not from global_step 2.
    trainer.save_checkpoint(tmp_path / "step2.ckpt")
    assert torch.load(tmp_path / "step2.ckpt", weights_only=False)["latent_mca_train_batches_seen"] == 4
    resumed = LatentRLModule(BackboneConfig(path=str(run / "sft" / "export")), init_from=str(bc_run.export),
                             reward=reward, rl=rl, optimizer=adamw(), export_dir=str(tmp_path / "export"))
    data = dialogue_data(run)
    trainer = tiny_trainer(tmp_path, steps=3)
    trainer.fit(resumed, datamodule=data, ckpt_path=tmp_path / "step2.ckpt")
    assert trainer.global_step == 3 and resumed.train_batches_seen == 6 and reward.calls == 6


def test_ppo_reuse_advances_the_data_by_batches_not_optimiser_steps(bc_run, tmp_path):
    """num_iterations = 2: two optimiser steps per batch, so 4 steps read 2 batches (and resume at batch 2)."""
    run = bc_run.run_dir
    module = LatentRLModule(BackboneConfig(path=str(run / "sft" / "export")), init_from=str(bc_run.export),
                            reward=AlternatingReward(), rl=RLConfig(num_generations=2, max_new_tokens=4,
                                                                    num_iterations=2),
                            optimizer=adamw(), export_dir=str(tmp_path / "export"))
    data = dialogue_data(run)
    trainer = tiny_trainer(tmp_path, steps=4)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 4 and module.train_batches_seen == 2 and data.consumed_train_batches() == 2


def reward_change(run_dir, name, k):
    rewards = [v for _, v in read_scalars(run_dir, name)["train/reward"]]
    return sum(rewards[-k:]) / k - sum(rewards[:k]) / k


@pytest.mark.slow
def test_latent_rl_raises_the_world_judge_reward(tmp_path, monkeypatch):
    """SFT 150 steps, stage 1 at 80 steps a phase, then 60 latent-RL steps (G = 8) against a frozen control.

    Measured (seed 0, 1 thread): mean reward of the last 10 steps minus the first 10 is about +0.05 with
    learning and about 0.00 with lr = 0 over the same prompts in the same order (per-step noise ~0.035).
    """
    run = build_demo_run(tmp_path / "run", seed=0, copy_sft=False)
    fit_phase(run, "sft", demo_config("sft"), monkeypatch=monkeypatch, steps=150)
    for phase in ("projector", "inverse_dynamics", "bc"):
        fit_phase(run, phase, demo_config(phase), monkeypatch=monkeypatch, steps=80)
    rl = ["--data.init_args.batch_size=4", "--model.init_args.rl.num_generations=8",
          "--model.init_args.rl.max_new_tokens=24"]
    fit_phase(run, "latent_rl", demo_config("latent_rl"), [*rl, "--model.init_args.optimizer.init_args.lr=1e-3"],
              monkeypatch, steps=60)
    fit_phase(run, "latent_rl_frozen", demo_config("latent_rl"), [*rl, "--model.init_args.optimizer.init_args.lr=0"],
              monkeypatch, steps=60)
    learned, frozen = reward_change(run, "latent_rl", 10), reward_change(run, "latent_rl_frozen", 10)
    assert learned > 0.02, f"reward did not rise: last 10 minus first 10 = {learned:+.3f}"
    assert learned > frozen + 0.02, f"rise {learned:+.3f} is no larger than without learning ({frozen:+.3f})"
