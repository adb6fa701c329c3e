import json
import math
from dataclasses import asdict

import pytest
import torch
import torch.nn.functional as F

from latent_mca.models.codebook import Codebook, CodebookConfig, straight_through_sample
from latent_mca.models.inverse_dynamics import InverseDynamics, InverseDynamicsConfig, inverse_entropy_terms
from latent_mca.models.world_model import WorldModel, WorldModelConfig

D, K = 32, 16


def make(seed=0):
    torch.manual_seed(seed)
    return InverseDynamics(InverseDynamicsConfig(hidden_size=D, num_layers=2, num_heads=4, num_codes=K)).eval()


def test_config_defaults_follow_the_paper_and_round_trip():
    cfg = InverseDynamicsConfig(hidden_size=64)
    assert (cfg.num_layers, cfg.num_codes, cfg.num_heads) == (4, 128, 1)
    assert InverseDynamicsConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(ValueError, match="num_codes"):
        InverseDynamicsConfig(hidden_size=64, num_codes=1)


@torch.no_grad()
def test_action_t_sees_the_next_token_but_nothing_beyond():
    model = make()
    x = torch.randn(2, 8, D)
    t = 3
    ref = model(x).logits
    next_changed = x.clone()
    next_changed[:, t + 1] += torch.randn(2, D)
    after_changed = x.clone()
    after_changed[:, t + 2] += torch.randn(2, D)
    a = model(next_changed).logits
    b = model(after_changed).logits
    assert (a[:, t] - ref[:, t]).abs().amax() > 1e-3  # x_{t+1} informs action t
    torch.testing.assert_close(a[:, :t], ref[:, :t], rtol=0, atol=1e-6)  # earlier actions do not see it
    torch.testing.assert_close(b[:, : t + 1], ref[:, : t + 1], rtol=0, atol=1e-6)  # x_{t+2} is invisible


@torch.no_grad()
def test_validity_mask_and_left_padding():
    model = make()
    x = torch.randn(2, 5, D)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = model(x, mask)
    expected = torch.tensor([[False, False, True, True, False], [True, True, True, True, False]])
    assert torch.equal(out.valid, expected)
    assert (out.logits[~out.valid] == 0).all()
    # The real tokens of the padded row give the same actions as the row alone.
    alone = model(x[:1, 2:]).logits[0]
    torch.testing.assert_close(out.logits[0, 2:4], alone[:2], rtol=1e-5, atol=1e-5)


def test_entropy_terms_match_hand_computed_values():
    uniform = torch.zeros(3, K)
    terms = inverse_entropy_terms(uniform)
    torch.testing.assert_close(terms["token_neg_entropy"], torch.tensor(-math.log(K)))
    torch.testing.assert_close(terms["batch_usage_entropy"], torch.tensor(math.log(K)))
    # Two confident positions on codes 0 and 1, plus a masked-out position on code 2.
    peaked = torch.full((1, 3, K), -1e4)
    peaked[0, 0, 0] = peaked[0, 1, 1] = peaked[0, 2, 2] = 0.0
    terms = inverse_entropy_terms(peaked, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(terms["token_neg_entropy"], torch.tensor(0.0))
    torch.testing.assert_close(terms["batch_usage_entropy"], torch.tensor(math.log(2)))
    empty = inverse_entropy_terms(peaked, torch.zeros(1, 3, dtype=torch.bool))
    assert empty["token_neg_entropy"] == 0 and empty["batch_usage_entropy"] == 0


def test_minimising_token_neg_entropy_raises_entropy():
    logits = torch.randn(4, K, requires_grad=True)
    before = inverse_entropy_terms(logits)["token_neg_entropy"]
    before.backward()
    with torch.no_grad():
        after = inverse_entropy_terms(logits - 0.5 * logits.grad)["token_neg_entropy"]
    assert after < before


def test_straight_through_gumbel_trains_inverse_model_and_codebook():
    """Inverse -> Gumbel one-hot -> codebook -> world model -> frozen lm_head -> CE, as in stage 1."""
    torch.manual_seed(0)
    inverse = make().train()
    codebook = Codebook(CodebookConfig(hidden_size=D, num_codes=K))
    world = WorldModel(WorldModelConfig(hidden_size=D, num_blocks=2))
    lm_head = torch.nn.Linear(D, 50, bias=False).requires_grad_(False)
    states, tokens = torch.randn(2, 6, D), torch.randint(0, 50, (2, 6))
    params = [*inverse.parameters(), *codebook.parameters(), *world.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)

    def loss_and_grads():
        opt.zero_grad()
        out = inverse(states)
        one_hot, index = straight_through_sample(out.logits, tau=2.0)
        assert torch.equal(one_hot.argmax(-1), index) and set(one_hot.unique().tolist()) <= {0.0, 1.0}
        logits = lm_head(world(states, codebook.embed_soft(one_hot)))
        ce = F.cross_entropy(logits[:, :-1].reshape(-1, 50), tokens[:, 1:].reshape(-1), reduction="none")
        loss = (ce * out.valid[:, :-1].reshape(-1)).sum()
        loss.backward()
        return loss

    loss_and_grads()  # the zero-initialised merge projections block the path until they move once
    opt.step()
    loss_and_grads()
    assert inverse.head.weight.grad.abs().sum() > 0
    assert inverse.transformer.layers[0].attn.qkv_proj.weight.grad.abs().sum() > 0
    assert codebook.weight.grad.abs().sum() > 0
