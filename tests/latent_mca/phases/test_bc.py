import pytest
import torch

from latent_mca.checkpoint import load_phase
from latent_mca.models import BackboneConfig
from latent_mca.phases import BCModule
from tests.helpers.demo_run import (
    adamw,
    backbone_untouched,
    changed,
    demo_config,
    first_batch,
    fit_phase,
    head_tail_means,
    mixed_data,
    optimizer_of,
    read_scalars,
    snapshot,
    step,
)

FROZEN = ("projector", "inverse", "codebook", "world_model")


def bc_module(run_dir, init_from):
    module = BCModule(BackboneConfig(path=str(run_dir / "sft" / "export")), init_from=str(init_from),
                      policy_layers=1, policy_heads=2, optimizer=adamw())
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def batch(sft_run):
    return first_batch(mixed_data(sft_run.run_dir))


def test_bc_loss_falls(bc_run):
    losses = [v for _, v in read_scalars(bc_run.run_dir, "bc")["train/loss"]]
    assert len(losses) == bc_run.steps
    first, last = head_tail_means(losses)
    assert last < 0.85 * first, f"BC loss did not fall: first 3 mean {first:.3f}, last 3 mean {last:.3f}"


def test_bc_export_carries_the_frozen_latent_space_unchanged(bc_run, inverse_run, projector_run):
    bc, inverse = load_phase(bc_run.export), load_phase(inverse_run.export)
    assert bc.phase == "bc" and set(bc.configs) == {*FROZEN, "policy"}
    assert bc.lineage == [str(projector_run.export), str(inverse_run.export)]
    for name in FROZEN:
        assert bc.configs[name] == inverse.configs[name]
        mine, theirs = bc.state_dict(name), inverse.state_dict(name)
        assert mine.keys() == theirs.keys()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), f"BC changed the frozen {name}"


def test_one_bc_step_trains_only_the_policy(inverse_run, batch):
    module = bc_module(inverse_run.run_dir, inverse_run.export)
    module.train()
    assert not any(getattr(module, name).training for name in FROZEN), "frozen modules stay in eval mode"
    before = snapshot(module)
    step(optimizer_of(module), module.losses(batch)["loss"])
    moved = changed(before, module)
    policy = [n for n in before if n.startswith("policy.")]
    assert policy and all(moved[n] for n in policy), sorted(n for n in policy if not moved[n])
    frozen = [n for n in before if n.split(".")[0] in FROZEN]
    assert {n.split(".")[0] for n in frozen} == set(FROZEN)
    params = dict(module.named_parameters())
    assert not any(moved[n] or params[n].requires_grad for n in frozen), sorted(n for n in frozen if moved[n])
    backbone_untouched(module, before)


def text_bc_under_perturbed_projector(module, batch):
    plain = float(module.losses(batch)["text_bc"])
    with torch.no_grad():
        for p in module.projector.parameters():
            p.add_(0.5 * torch.randn_like(p))
    return plain, float(module.losses(batch)["text_bc"])


def test_without_projector_ablation_reaches_behaviour_cloning(inverse_run, batch, monkeypatch):
    run = inverse_run.run_dir
    fit_phase(run, "inverse_dynamics_raw", demo_config("inverse_dynamics"), ["--model.init_args.use_projector=false"],
              monkeypatch, steps=2)
    raw = load_phase(run / "inverse_dynamics_raw" / "export")
    assert raw.extra["use_projector"] is False
    module = bc_module(run, raw.directory)
    assert module.use_projector is False
    plain, perturbed = text_bc_under_perturbed_projector(module, batch)
    assert plain == perturbed, "BC must use raw text states after a run without the projector"

    module = bc_module(run, inverse_run.export)
    plain, perturbed = text_bc_under_perturbed_projector(module, batch)
    assert plain != perturbed, "BC uses projected text states after a run with the projector"
