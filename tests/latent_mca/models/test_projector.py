import json
from dataclasses import asdict

import pytest
import torch

from latent_mca.models.projector import CrossModalProjector, GaussianHead, ProjectorConfig, gaussian_nll

D = 32


def make():
    torch.manual_seed(0)
    return CrossModalProjector(ProjectorConfig(hidden_size=D))


def test_config_default_bottleneck_and_round_trip():
    cfg = ProjectorConfig(hidden_size=D)
    assert cfg.bottleneck == D // 2
    assert ProjectorConfig(**json.loads(json.dumps(asdict(cfg)))) == cfg
    head = GaussianHead(D)
    assert head.mu[0].out_features == D // 2 and head.mu[2].out_features == D


def test_logvar_is_bounded_and_shapes_hold():
    proj = make()
    e = 100 * torch.randn(2, 5, D)
    for g in (proj.t2vt(e), proj.vt2t(e), proj.cycle(e), proj(e)):
        assert g.mu.shape == g.logvar.shape == (2, 5, D)
        assert g.logvar.abs().max() <= 1.0
    cyc = proj.cycle(e)
    torch.testing.assert_close(cyc.mu, proj.backward_head(proj.forward_head(e).mu).mu)


def test_nll_equals_the_hand_written_formula():
    torch.manual_seed(0)
    mu, logvar, target = torch.randn(2, 3, 4), torch.rand(2, 3, 4) * 2 - 1, torch.randn(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    expected = 0.0
    for b in range(2):
        for t in range(3):
            if mask[b, t]:
                for j in range(4):
                    m, lv, y = mu[b, t, j].item(), logvar[b, t, j].item(), target[b, t, j].item()
                    # The authors' per-dimension NLL is (m - y)^2 exp(-lv) + lv; ours is half of it.
                    expected += 0.5 * ((m - y) ** 2 * torch.exp(torch.tensor(-lv)).item() + lv)
    expected /= 4  # four unmasked tokens
    torch.testing.assert_close(gaussian_nll(mu, logvar, target, mask), torch.tensor(expected))
    unmasked = gaussian_nll(mu, logvar, target)
    full = 0.5 * ((mu - target) ** 2 * torch.exp(-logvar) + logvar).sum(-1).mean()
    torch.testing.assert_close(unmasked, full)


def test_nll_detaches_the_target_and_handles_an_empty_mask():
    mu = torch.randn(2, 3, D, requires_grad=True)
    target = torch.randn(2, 3, D, requires_grad=True)
    gaussian_nll(mu, torch.zeros(2, 3, D), target).backward()
    assert target.grad is None and mu.grad.abs().sum() > 0
    nan_target = torch.full((2, 3, D), float("nan"))
    empty = gaussian_nll(mu, torch.zeros(2, 3, D), nan_target, torch.zeros(2, 3))
    assert empty.item() == 0.0
    with pytest.raises(ValueError, match="mask"):
        gaussian_nll(mu, torch.zeros(2, 3, D), target, torch.ones(2, 4))


@pytest.mark.parametrize("residual", [False, True], ids=["authors_head", "residual_head"])
def test_fitting_a_linear_map_lowers_the_nll(residual):
    torch.manual_seed(0)
    proj = CrossModalProjector(ProjectorConfig(hidden_size=D, residual=residual))
    weight = torch.randn(D, D) / D**0.5
    if residual:  # image-text states = text states plus a correction, the case the residual head is for
        weight = torch.eye(D) + 0.5 * weight
    opt = torch.optim.Adam(proj.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        e_text = torch.randn(16, 4, D)
        e_vt = e_text @ weight + 0.05 * torch.randn(16, 4, D)
        g = proj.t2vt(e_text)
        loss = gaussian_nll(g.mu, g.logvar, e_vt, torch.ones(16, 4))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5


def test_residual_projector_starts_as_the_identity():
    proj = CrossModalProjector(ProjectorConfig(hidden_size=D))
    x = torch.randn(3, 5, D)
    assert torch.equal(proj.t2vt(x).mu, x) and torch.equal(proj.vt2t(x).mu, x)
    authors = CrossModalProjector(ProjectorConfig(hidden_size=D, residual=False))
    assert not torch.allclose(authors.t2vt(x).mu, x)
