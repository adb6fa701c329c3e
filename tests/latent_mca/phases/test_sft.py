import json

import torch

from latent_mca.models import Backbone, BackboneConfig
from latent_mca.phases import SFTModule
from tests.helpers.demo_run import adamw, changed, head_tail_means, mixed_data, read_scalars, snapshot, tiny_trainer


def test_sft_loss_falls(sft_run):
    losses = [v for _, v in read_scalars(sft_run.run_dir, "sft")["train/loss"]]
    assert len(losses) == sft_run.steps, "log_every_n_steps=1 logs every optimiser step"
    first, last = head_tail_means(losses)
    assert last < 0.85 * first, f"SFT loss did not fall: first 3 mean {first:.3f}, last 3 mean {last:.3f}"


def test_sft_exports_a_loadable_fine_tuned_checkpoint(sft_run):
    export = sft_run.export
    done = json.loads((export / "export_complete.json").read_text())
    assert done["phase"] == "sft" and done["global_step"] == sft_run.steps
    tuned = Backbone.from_pretrained(BackboneConfig(path=str(export)))
    base = Backbone.from_pretrained(BackboneConfig(path=str(sft_run.run_dir / "backbone")))
    tuned_params, base_params = dict(tuned.named_parameters()), dict(base.named_parameters())
    assert tuned_params.keys() == base_params.keys()
    moved = {n for n in base_params if not torch.equal(base_params[n], tuned_params[n])}
    text = {n for n in base_params if ".language_model." in n}
    vision = {n for n in base_params if ".visual." in n}
    assert text and vision and moved == text | vision, "the demo SFT trains the language model and vision tower"
    assert tuned.processor.tokenizer.get_vocab() == base.processor.tokenizer.get_vocab()


def test_one_sft_step_changes_every_trainable_backbone_weight(run_dir, tmp_path):
    module = SFTModule(BackboneConfig(path=str(run_dir / "backbone"), trainable="all"), optimizer=adamw(),
                       export_dir=str(tmp_path / "export"))
    module.configure_model()
    before = snapshot(module)
    head_before = module.backbone.lm_head.weight.detach().clone()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    tiny_trainer(tmp_path, steps=1).fit(module, datamodule=mixed_data(run_dir, run_dir / "backbone"))
    moved = changed(before, module)
    assert "backbone.model.model.language_model.norm.weight" in trainable, "the final norm trains"
    assert all(moved[n] for n in trainable), sorted(n for n in trainable if not moved[n])
    frozen = set(before) - trainable
    assert frozen and not any(moved[n] for n in frozen), sorted(n for n in frozen if moved[n])
    assert not torch.equal(head_before, module.backbone.lm_head.weight), "the (tied) output head trains"
