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
    assert not torch.equal(world.blocks[0].state_proj.weight, before["blocks.0.state_proj.weight"])
    assert not torch.equal(world.blocks[0].code_proj.weight, before["blocks.0.code_proj.weight"])
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


def trained(seed=1):
    world = make()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in world.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return world


def test_matches_the_gated_merge_over_the_concatenation_written_out():
    world = trained()
    states, codes = torch.randn(3, 4, D), torch.randn(3, 4, D)
    x = states
    for block in world.blocks:  # x + proj(silu(W1 [n(x); c]) * W2 [n(x); c]) with [W1; W2] = [state_proj code_proj]
        w = torch.cat([block.state_proj.weight, block.code_proj.weight], dim=1)  # (2 width, 2d)
        w1, w2 = w.chunk(2, dim=0)
        z = torch.cat([block.norm(x), codes], dim=-1)
        x = x + block.proj(F.silu(z @ w1.T) * (z @ w2.T))
    torch.testing.assert_close(world(states, codes), x, rtol=1e-4, atol=1e-4)


def test_code_table_lookup_equals_the_forward_pass():
    world = trained()
    codebook = torch.randn(6, D)
    table = world.code_features(codebook)
    assert table.shape == (6, 2, 2 * world.config.intermediate_size)
    states, codes = torch.randn(5, D), torch.tensor([0, 5, 2, 2, 1])
    with torch.no_grad():  # the decoding path (row-major weight copies for few rows)
        fast = world.merge(states, table[codes])
    torch.testing.assert_close(fast, world(states, codebook[codes]), rtol=1e-4, atol=1e-4)


def test_checkpoints_with_the_former_fc1_fc2_layout_load_to_the_same_function():
    world = trained()
    d = D
    legacy = {}
    for i, block in enumerate(world.blocks):  # fc1/fc2 over [state; code]: gate and up rows, state columns first
        gate_x, up_x = block.state_proj.weight.chunk(2, dim=0)
        gate_c, up_c = block.code_proj.weight.chunk(2, dim=0)
        legacy[f"blocks.{i}.fc1.weight"] = torch.cat([gate_x, gate_c], dim=1)
        legacy[f"blocks.{i}.fc2.weight"] = torch.cat([up_x, up_c], dim=1)
        legacy[f"blocks.{i}.proj.weight"] = block.proj.weight.clone()
        legacy[f"blocks.{i}.norm.weight"] = block.norm.weight.clone()
        assert legacy[f"blocks.{i}.fc1.weight"].shape == (world.config.intermediate_size, 2 * d)
    fresh = make()
    fresh.load_state_dict(legacy, strict=True)
    states, codes = torch.randn(2, 3, D), torch.randn(2, 3, D)
    torch.testing.assert_close(fresh(states, codes), world(states, codes), rtol=0, atol=0)
