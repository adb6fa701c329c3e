import json

import pytest

from latent_mca.checkpoint import load_phase
from latent_mca.models import BackboneConfig
from latent_mca.phases import ProjectorModule
from tests.helpers.demo_run import (
    adamw,
    backbone_untouched,
    changed,
    first_batch,
    head_tail_means,
    optimizer_of,
    paired_data,
    read_scalars,
    snapshot,
    step,
)


def test_projector_loss_falls(projector_run):
    losses = [v for _, v in read_scalars(projector_run.run_dir, "projector")["train/loss"]]
    assert len(losses) == projector_run.steps
    first, last = head_tail_means(losses)
    assert last < 0.85 * first, f"projector NLL did not fall: first 3 mean {first:.3f}, last 3 mean {last:.3f}"


def test_projector_export_references_the_sft_backbone(projector_run):
    export = load_phase(projector_run.export)
    assert export.phase == "projector" and set(export.configs) == {"projector"}
    assert export.backbone.path == str(projector_run.run_dir / "sft" / "export")
    assert export.backbone.hidden_size == 64
    done = json.loads((projector_run.export / "export_complete.json").read_text())
    assert done["global_step"] == projector_run.steps


@pytest.mark.parametrize("residual", [True, False])
def test_projector_steps_train_only_the_projector(sft_run, residual):
    module = ProjectorModule(BackboneConfig(path=str(sft_run.export)), residual=residual, optimizer=adamw())
    module.configure_model()
    batch = first_batch(paired_data(sft_run.run_dir))
    opt = optimizer_of(module)
    before = snapshot(module)
    projector = {n for n in before if n.startswith("projector.")}
    assert projector and set(before) == projector | {n for n in before if n.startswith("backbone.")}
    step(opt, module.losses(batch)["loss"])
    moved = changed(before, module)
    # A residual mean head (x + MLP(x)) starts with the MLP's last layer at zero, so on the first step its
    # first layer gets no gradient (weight decay is off: an unmoved weight really had none).
    silent = {n for n in projector if ".mu.0." in n} if residual else set()
    assert not any(moved[n] for n in silent), sorted(n for n in silent if moved[n])
    assert all(moved[n] for n in projector - silent), sorted(n for n in projector - silent if not moved[n])
    step(opt, module.losses(batch)["loss"])
    moved = changed(before, module)
    assert all(moved[n] for n in projector), sorted(n for n in projector if not moved[n])
    backbone_untouched(module, before)
