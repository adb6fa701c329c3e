import json
import math

import pytest
import yaml

from latent_mca.models import Backbone, BackboneConfig
from latent_mca.phases import TokenRLModule
from latent_mca.rl.update import RLConfig
from tests.helpers.demo_run import (
    AlternatingReward,
    OneGroupTies,
    adamw,
    changed,
    dialogue_data,
    log_dir,
    read_scalars,
    snapshot,
    tiny_trainer,
)

ALGORITHMS = ("grpo", "dr_grpo", "dapo", "bnpo")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_token_rl_runs_every_algorithm_from_the_demo_config(rl_run, algorithm):
    run = rl_run("token_rl", algorithm)
    saved = yaml.safe_load((log_dir(run.run_dir, run.name) / "config.yaml").read_text())
    assert saved["model"]["init_args"]["rl"]["algorithm"] == algorithm
    rewards = [v for _, v in read_scalars(run.run_dir, run.name)["train/reward"]]
    assert len(rewards) == run.steps and all(math.isfinite(r) and r >= 0 for r in rewards), rewards
    done = json.loads((run.export / "export_complete.json").read_text())
    assert done["phase"] == "token_rl" and done["global_step"] == run.steps
    assert Backbone.from_pretrained(BackboneConfig(path=str(run.export))).hidden_size == 64


def test_one_token_rl_step_changes_every_trainable_backbone_weight(sft_run, tmp_path):
    module = TokenRLModule(BackboneConfig(path=str(sft_run.export), trainable="all"), reward=AlternatingReward(),
                           rl=RLConfig(num_generations=2, max_new_tokens=6, beta=0.05), optimizer=adamw(),
                           export_dir=str(tmp_path / "export"))
    module.configure_model()
    before = snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert "backbone.model.model.language_model.norm.weight" in trainable
    tiny_trainer(tmp_path, steps=1).fit(module, datamodule=dialogue_data(sft_run.run_dir))
    moved = changed(before, module)
    assert all(moved[n] for n in trainable), sorted(n for n in trainable if not moved[n])
    frozen = set(before) - trainable
    reference = {n for n in frozen if n.startswith("ref_backbone.")}
    assert reference and any(".visual." in n for n in frozen - reference)
    assert not any(moved[n] for n in frozen), sorted(n for n in frozen if moved[n])


def test_token_dapo_dynamic_sampling_refills_each_update_from_the_next_batches(sft_run, tmp_path):
    reward = OneGroupTies(group_size=2)
    rl = RLConfig(algorithm="dapo", num_generations=2, max_new_tokens=6, dynamic_sampling=True)
    module = TokenRLModule(BackboneConfig(path=str(sft_run.export), trainable="all"), reward=reward, rl=rl,
                           optimizer=adamw(), export_dir=str(tmp_path / "export"))
    module.configure_model()
    before = snapshot(module)
    data = dialogue_data(sft_run.run_dir)
    trainer = tiny_trainer(tmp_path, steps=1)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 1 and reward.calls == 2 and module.train_batches_seen == 2
    assert float(trainer.callback_metrics["train/sampling_batches"]) == 2
    assert any(changed(before, module).values())
