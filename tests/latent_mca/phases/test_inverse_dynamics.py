import pytest
import torch

from latent_mca.batch import MixedBatch
from latent_mca.checkpoint import load_phase
from latent_mca.models import BackboneConfig
from latent_mca.phases import InverseDynamicsModule
from tests.helpers.demo_run import (
    NUM_CODES,
    adamw,
    backbone_untouched,
    changed,
    first_batch,
    head_tail_means,
    mixed_data,
    optimizer_of,
    read_scalars,
    snapshot,
    step,
)


def inverse_module(run, init_from, **kwargs):
    module = InverseDynamicsModule(BackboneConfig(path=str(run.run_dir / "sft" / "export")), num_codes=NUM_CODES,
                                   inverse_layers=1, inverse_heads=2, init_from=str(init_from), optimizer=adamw(),
                                   **kwargs)
    module.configure_model()
    return module


@pytest.fixture(scope="module")
def batch(sft_run):
    return first_batch(mixed_data(sft_run.run_dir))


def test_inverse_dynamics_loss_falls(inverse_run):
    losses = [v for _, v in read_scalars(inverse_run.run_dir, "inverse_dynamics")["train/loss"]]
    assert len(losses) == inverse_run.steps
    first, last = head_tail_means(losses)
    assert last < 0.9 * first, f"inverse-dynamics loss did not fall: first 3 mean {first:.3f}, last {last:.3f}"


def test_inverse_dynamics_export(inverse_run, projector_run):
    export = load_phase(inverse_run.export)
    assert export.phase == "inverse_dynamics"
    assert set(export.configs) == {"projector", "inverse", "codebook", "world_model"}
    assert export.configs["codebook"]["num_codes"] == NUM_CODES == export.configs["inverse"]["num_codes"]
    assert export.lineage == [str(projector_run.export)]
    assert export.extra["use_projector"] is True


def test_first_steps_move_exactly_the_weights_that_get_gradient(projector_run, batch):
    module = inverse_module(projector_run, projector_run.export)
    opt = optimizer_of(module)
    before = snapshot(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if not n.startswith("backbone.")}, "the projector keeps training"
    step(opt, module.losses(batch)[0]["loss"])
    moved = changed(before, module)
    # Each merge block's last projection starts at zero, so on the first step nothing upstream of it (the
    # block's norm and fc1/fc2, the codebook) receives gradient, and the inverse model is moved only by
    # the entropy regulariser. Weight decay is off, so an unmoved weight really had no gradient.
    silent = {n for n in trainable if n.startswith("codebook.")
              or (n.startswith("world_model.") and ".proj." not in n)}
    assert silent and not any(moved[n] for n in silent), sorted(n for n in silent if moved[n])
    assert all(moved[n] for n in trainable - silent), sorted(n for n in trainable - silent if not moved[n])
    step(opt, module.losses(batch)[0]["loss"])
    moved = changed(before, module)
    assert all(moved[n] for n in trainable), sorted(n for n in trainable if not moved[n])
    backbone_untouched(module, before)


def test_loss_is_the_documented_sum_of_terms(inverse_run, batch):
    weights = dict(proj_weight=0.1, cycle_weight=0.2, entropy_weight=0.05, usage_weight=0.03)
    module = inverse_module(inverse_run, inverse_run.export, **weights)
    terms, _ = module.losses(batch)
    expected = (terms["mm_inverse"] + terms["text_inverse"] + 0.1 * terms["mm_proj_nll"]
                + 0.2 * terms["text_cycle_nll"] + 0.05 * terms["token_neg_entropy"]
                - 0.03 * terms["batch_usage_entropy"])
    torch.testing.assert_close(terms["loss"], expected)


def test_cycle_weight_zero_removes_exactly_the_cycle_term(inverse_run, batch):
    with_cycle = inverse_module(inverse_run, inverse_run.export, cycle_weight=0.5)
    without = inverse_module(inverse_run, inverse_run.export, cycle_weight=0.0)
    torch.manual_seed(7)  # the same Gumbel noise for both
    a, _ = with_cycle.losses(batch)
    torch.manual_seed(7)
    b, _ = without.losses(batch)
    assert "text_cycle_nll" in a and "text_cycle_nll" not in b
    assert set(a) - set(b) == {"text_cycle_nll"}
    for key in set(b) - {"loss"}:
        torch.testing.assert_close(a[key], b[key], msg=key)
    assert float(a["text_cycle_nll"]) != 0.0
    torch.testing.assert_close(a["loss"] - b["loss"], 0.5 * a["text_cycle_nll"], rtol=1e-5, atol=1e-5)


def perturb_(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn_like(p))


def text_terms_under_perturbed_projector(module, batch):
    torch.manual_seed(3)
    terms, _ = module.losses(batch)
    perturb_(module.projector)
    torch.manual_seed(3)
    perturbed, _ = module.losses(batch)
    return terms, perturbed


def test_without_projector_text_only_states_are_raw(inverse_run, batch):
    raw = inverse_module(inverse_run, inverse_run.export, use_projector=False)
    assert not any(p.requires_grad for p in raw.projector.parameters())
    terms, perturbed = text_terms_under_perturbed_projector(raw, batch)
    assert "text_cycle_nll" not in terms and "mm_proj_nll" not in terms
    assert float(terms["text_inverse"]) == float(perturbed["text_inverse"]), "text states do not go through P"
    terms["loss"].backward()
    assert all(p.grad is None for p in raw.projector.parameters())
    assert any(p.grad is not None for p in raw.inverse.parameters())

    projected = inverse_module(inverse_run, inverse_run.export, use_projector=True)
    terms, perturbed = text_terms_under_perturbed_projector(projected, batch)
    assert float(terms["text_inverse"]) != float(perturbed["text_inverse"]), "text states go through P"
    assert float(terms["mm_inverse"]) == float(perturbed["mm_inverse"]), "paired states never do"


def test_without_text_only_data_there_are_no_text_terms(inverse_run):
    batch = first_batch(mixed_data(inverse_run.run_dir, text=False))
    assert isinstance(batch, MixedBatch) and batch.text_only is None and batch.paired is not None
    module = inverse_module(inverse_run, inverse_run.export, proj_weight=0.1, entropy_weight=0.05, usage_weight=0.03)
    terms, codes = module.losses(batch)
    assert not [k for k in terms if k.startswith("text_")]
    assert len(codes) == 1
    expected = (terms["mm_inverse"] + 0.1 * terms["mm_proj_nll"] + 0.05 * terms["token_neg_entropy"]
                - 0.03 * terms["batch_usage_entropy"])
    torch.testing.assert_close(terms["loss"], expected)
