"""The demo chain end to end: sft -> projector -> inverse_dynamics -> bc -> latent_rl, token_rl from sft."""

import json

import pytest
import torch

from latent_mca.checkpoint import IncompatibleCheckpointError, load_phase
from latent_mca.models import BackboneConfig
from latent_mca.phases import BCModule, InverseDynamicsModule, LatentRLModule, ProjectorModule
from latent_mca.rl.rewards import JudgeReward, WorldJudge
from tests.helpers.demo_run import demo_config, fit_phase


def completion(export):
    return json.loads((export / "export_complete.json").read_text())


def test_every_phase_writes_a_complete_export_that_the_next_one_reads(
        sft_run, projector_run, inverse_run, bc_run, rl_run):
    latent, token = rl_run("latent_rl", "grpo"), rl_run("token_rl", "grpo")
    runs = [sft_run, projector_run, inverse_run, bc_run, latent, token]
    for run in runs:
        done = completion(run.export)
        assert done["global_step"] == run.steps, run.name
        assert done["phase"] == run.name.removesuffix("_grpo"), run.name
    for run in (sft_run, token):
        assert (run.export / "config.json").exists() and (run.export / "model.safetensors").exists()
        assert not (run.export / "phase.json").exists()

    chain = [projector_run, inverse_run, bc_run, latent]
    for i, run in enumerate(chain):
        export = load_phase(run.export)
        assert export.backbone.path == str(sft_run.export), "stage 1 and latent RL run on the SFT model"
        assert export.lineage == [str(r.export) for r in chain[:i]], run.name
    sft_bytes = (sft_run.export / "model.safetensors").read_bytes()
    assert sft_bytes != (sft_run.run_dir / "backbone" / "model.safetensors").read_bytes()
    assert sft_bytes != (token.export / "model.safetensors").read_bytes(), "token RL trains the SFT model further"

    bc, rl = load_phase(bc_run.export), load_phase(latent.export)
    for name in ("projector", "inverse", "codebook", "world_model"):
        assert all(torch.equal(v, rl.state_dict(name)[k]) for k, v in bc.state_dict(name).items()), name
    assert any(not torch.equal(v, rl.state_dict("policy")[k]) for k, v in bc.state_dict("policy").items())


@pytest.mark.parametrize("factory", [
    lambda cfg, path: ProjectorModule(cfg, init_from=path),
    lambda cfg, path: InverseDynamicsModule(cfg, init_from=path),
    lambda cfg, path: BCModule(cfg, init_from=path),
    lambda cfg, path: LatentRLModule(cfg, init_from=path, reward=JudgeReward(WorldJudge())),
], ids=["projector", "inverse_dynamics", "bc", "latent_rl"])
def test_init_from_a_directory_without_phase_json_fails_naming_it(sft_run, tmp_path, factory):
    empty = tmp_path / "not_an_export"
    empty.mkdir()
    module = factory(BackboneConfig(path=str(sft_run.export)), str(empty))
    with pytest.raises(FileNotFoundError, match="phase.json") as info:
        module.configure_model()
    assert str(empty) in str(info.value)


def test_cli_run_from_a_missing_export_fails_naming_it(sft_run, tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        fit_phase(sft_run.run_dir, "bc_bad", demo_config("bc"), [f"--model.init_args.init_from={missing}"],
                  monkeypatch, steps=1)
    assert str(missing) in str(info.value)


def test_an_export_with_another_codebook_size_is_refused(inverse_run, monkeypatch):
    with pytest.raises(IncompatibleCheckpointError, match="num_codes=32") as info:
        fit_phase(inverse_run.run_dir, "inverse_dynamics_k32", demo_config("inverse_dynamics"),
                  ["--model.init_args.num_codes=32", f"--model.init_args.init_from={inverse_run.export}"],
                  monkeypatch, steps=1)
    assert str(inverse_run.export) in str(info.value)


def test_exports_missing_the_needed_modules_are_refused(sft_run, projector_run, inverse_run):
    cfg = BackboneConfig(path=str(sft_run.export))
    with pytest.raises(ValueError, match="inverse") as info:
        BCModule(cfg, init_from=str(projector_run.export)).configure_model()
    assert str(projector_run.export) in str(info.value)
    with pytest.raises(ValueError, match="policy") as info:
        LatentRLModule(cfg, init_from=str(inverse_run.export), reward=JudgeReward(WorldJudge())).configure_model()
    assert str(inverse_run.export) in str(info.value)
