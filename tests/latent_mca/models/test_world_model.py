import json
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from latent_mca.models.world_model import WorldModel, WorldModelConfig

D, V = 32, 50


def make(pre_norm=True):
    torch.manual_seed(0)
    return WorldModel(WorldModelConfig(hidden_size=D, num_blocks=2, pre_norm=pre_norm))


@pytest.mark.parametrize("pre_norm", [True, False])
def test_untrained_world_model_reproduces_the_base_logits_exactly(pre_norm):
    world = make(pre_norm)
    lm_head = torch.nn.Linear(D, V, bias=False)
    states, codes = torch.randn(2, 5, D), torch.randn(2, 5, D)
    out = world(states, codes)
    assert torch.equal(out, states)
    assert torch.equal(lm_head(out), lm_head(states))


def test_state_dict_holds_only_merge_blocks_and_config_round_trips():
    world = make()
    assert all(key.startswith("blocks.") for key in world.state_dict())
    cfg = WorldModelConfig(hidden_size=2048)
    assert cfg.num_blocks == 2 and cfg.intermediate_size == 10944  # ~8/3 of the 4096-wide [state; code]
    assert WorldModelConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg


def test_one_optimiser_step_changes_the_merge_and_the_output():
    world = make()
    lm_head = torch.nn.Linear(D, V, bias=False).requires_grad_(False)
    states, codes, targets = torch.randn(2, 5, D), torch.randn(2, 5, D), torch.randint(0, V, (2, 5))
    opt = torch.optim.Adam(world.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in world.state_dict().items()}

    def step():
        opt.zero_grad()
        loss = F.cross_entropy(lm_head(world(states, codes)).reshape(-1, V), targets.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    first = step()
    assert first > 0
    assert not torch.equal(world.blocks[0].proj.weight, before["blocks.0.proj.weight"])
    assert not torch.equal(world.blocks[1].proj.weight, before["blocks.1.proj.weight"])
    assert not torch.equal(world(states, codes), states)
    step()  # with the projections non-zero, the gated MLP's input layers train too
    assert not torch.equal(world.blocks[0].fc1.weight, before["blocks.0.fc1.weight"])
    assert not torch.equal(world.blocks[0].fc2.weight, before["blocks.0.fc2.weight"])
    for _ in range(20):
        last = step()
    assert last < first


def test_output_depends_on_the_code_after_training():
    world = make()
    for block in world.blocks:
        torch.nn.init.normal_(block.proj.weight, std=0.1)
    states = torch.randn(1, 3, D)
    a, b = world(states, torch.randn(1, 3, D)), world(states, torch.randn(1, 3, D))
    assert (a - b).abs().amax() > 1e-3


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="code_emb"):
        make()(torch.randn(2, 5, D), torch.randn(2, 4, D))
