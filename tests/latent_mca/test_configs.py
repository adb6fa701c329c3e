"""Every YAML under ``configs/`` parses through the real CLI and builds the classes and values it promises.

Construction only (``lightning_main(..., run=False)``): phases load their backbone in ``configure_model`` and
data modules their processor lazily, so building a paper-scale config costs nothing. The trainer overlays
have their own tests (``test_trainer_configs.py``); here every paper config is composed with the overlays
its header recommends (ZeRO-2 + bf16), with the device settings of this CPU machine appended last.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, SingleDeviceStrategy

import data_modules
import latent_mca.phases as phases
from latent_mca.cli import lightning_main
from latent_mca.pipeline import pipeline
from latent_mca.rl.rewards import JudgeReward, OpenAIJudge, WorldJudge

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs" / "demo"
PAPER = ROOT / "configs" / "qwen2_5_vl_3b"
TRAINER = ROOT / "configs" / "trainer"
ON_THIS_MACHINE = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.precision=32"]

#: Phase name -> (LightningModule, LightningDataModule), the same for the demo and the paper setting.
CLASSES = {
    "sft": (phases.SFTModule, data_modules.PairedImageTextDataModule),
    "projector": (phases.ProjectorModule, data_modules.PairedImageTextDataModule),
    "inverse_dynamics": (phases.InverseDynamicsModule, data_modules.MixedDataModule),
    "bc": (phases.BCModule, data_modules.MixedDataModule),
    "latent_rl": (phases.LatentRLModule, data_modules.DialogueDataModule),
    "token_rl": (phases.TokenRLModule, data_modules.DialogueDataModule),
}
PAPER_SFT = (phases.SFTModule, data_modules.DialogueDataModule)  # the paper's SFT is on MMRole dialogues

#: (setting, phase) -> {dotted hparam or attribute: value}; "lr" is read from the built optimiser.
EXPECTED = {
    ("demo", "sft"): {"lr": 1e-3, "backbone_config.trainable": "all", "backbone_config.train_vision": True,
                      "trainer.max_steps": 1000},
    ("demo", "projector"): {"lr": 1e-3, "trainer.max_steps": 100},
    ("demo", "inverse_dynamics"): {"lr": 1e-3, "hparams.num_codes": 128, "hparams.tau": 2.0,
                                   "hparams.inverse_layers": 2, "trainer.max_steps": 200},
    ("demo", "bc"): {"lr": 1e-3, "hparams.policy_layers": 2, "trainer.max_steps": 150},
    ("demo", "latent_rl"): {"lr": 3e-4, "rl.algorithm": "grpo", "rl.num_generations": 8, "rl.beta": 0.01,
                            "trainer.max_steps": 40},
    ("demo", "token_rl"): {"lr": 1e-4, "rl.algorithm": "grpo", "rl.num_generations": 8, "trainer.max_steps": 40},
    ("paper", "sft"): {"lr": 5e-5, "backbone_config.trainable": "top_n", "backbone_config.top_n_layers": 8,
                       "trainer.max_steps": 9000},
    ("paper", "projector"): {"lr": 1e-3, "trainer.max_steps": 156250},
    ("paper", "inverse_dynamics"): {"lr": 1e-4, "hparams.num_codes": 128, "hparams.tau": 2.0,
                                    "hparams.inverse_layers": 4, "hparams.merge_blocks": 2,
                                    "hparams.entropy_weight": 1e-3, "trainer.max_steps": 156250},
    ("paper", "bc"): {"lr": 1e-4, "hparams.policy_layers": 8, "trainer.max_steps": 156250},
    ("paper", "latent_rl"): {"lr": 1e-6, "rl.algorithm": "grpo", "rl.num_generations": 8, "rl.beta": 0.01,
                             "rl.max_new_tokens": 1024, "trainer.max_steps": 100},
    ("paper", "token_rl"): {"lr": 1e-6, "rl.algorithm": "grpo", "rl.num_generations": 8,
                            "rl.max_new_tokens": 1024, "trainer.max_steps": 100},
}


def is_pipeline(path: Path) -> bool:
    """Pipeline configs (``pipeline``, ``results`` commands) list phases; phase configs name a model."""
    return "phases" in yaml.safe_load(path.read_text())


def phase_configs(directory: Path) -> list[str]:
    return sorted(p.stem for p in directory.glob("*.yaml") if not is_pipeline(p))


PIPELINES = sorted(p.name for p in DEMO.glob("*.yaml") if is_pipeline(p))


def lookup(cli, dotted: str):
    if dotted == "lr":
        optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        return optimizer.defaults["lr"]
    owner, *path = dotted.split(".")
    value = cli.trainer if owner == "trainer" else getattr(cli.model, owner)
    for name in path:
        value = value[name] if isinstance(value, dict) or hasattr(value, "keys") else getattr(value, name)
    return value


def build(monkeypatch, tmp_path, *args):
    """Build the CLI with the run directory set to an empty temporary one; return (cli, run directory)."""
    run = tmp_path / "run"
    monkeypatch.setenv("LATENT_MCA_RUN_DIR", str(run))
    monkeypatch.delenv("LATENT_MCA_PHASE", raising=False)
    monkeypatch.delenv("LATENT_MCA_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    return lightning_main(list(args), run=False), run


def check_common(cli, run: Path, phase: str, classes: tuple[type, type]) -> None:
    model_cls, data_cls = classes
    assert type(cli.model) is model_cls and type(cli.datamodule) is data_cls
    assert cli.model.export_dir == str(run / phase / "export"), "LATENT_MCA_PHASE defaults to the phase name"
    logger = cli.trainer.logger
    assert isinstance(logger, TensorBoardLogger)
    assert (logger.save_dir, logger.name) == (str(run / "logs"), phase)
    checkpoints = [cb for cb in cli.trainer.callbacks if isinstance(cb, ModelCheckpoint)]
    assert len(checkpoints) == 1 and checkpoints[0].dirpath == str(run / phase / "checkpoints")
    assert checkpoints[0].save_last
    assert not run.exists(), "building a configuration writes nothing"
    scheduler = cli.config["model"]["init_args"].get("lr_scheduler")
    if scheduler:
        assert scheduler["init_args"]["max_steps"] == cli.trainer.max_steps, "the schedule spans the run"


def check_expected(cli, expected: dict) -> None:
    for dotted, value in expected.items():
        assert lookup(cli, dotted) == value, dotted


def test_every_config_is_covered():
    assert phase_configs(DEMO) == sorted(CLASSES) and phase_configs(PAPER) == sorted(CLASSES)
    assert {k for k in EXPECTED} == {(s, p) for s in ("demo", "paper") for p in CLASSES}
    assert "pipeline.yaml" in PIPELINES
    tested = {DEMO / f"{p}.yaml" for p in CLASSES} | {PAPER / f"{p}.yaml" for p in CLASSES}
    tested |= {DEMO / name for name in PIPELINES} | set(TRAINER.glob("*.yaml"))  # overlays: test_trainer_configs
    assert set((ROOT / "configs").rglob("*.yaml")) == tested, "a new kind of config needs a test here"


@pytest.mark.parametrize("phase", sorted(CLASSES))
def test_demo_config_builds(phase, monkeypatch, tmp_path):
    cli, run = build(monkeypatch, tmp_path, "--config", str(DEMO / f"{phase}.yaml"))
    check_common(cli, run, phase, CLASSES[phase])
    check_expected(cli, EXPECTED["demo", phase])
    assert cli.trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    if phase.endswith("_rl"):
        assert isinstance(cli.model.reward, JudgeReward) and isinstance(cli.model.reward.judge, WorldJudge)


@pytest.mark.parametrize("phase", sorted(CLASSES))
def test_paper_config_builds_with_zero2_and_bf16(phase, monkeypatch, tmp_path):
    overlays = ["--config", str(TRAINER / "deepspeed_zero2.yaml"), "--config", str(TRAINER / "bf16.yaml")]
    cli, run = build(monkeypatch, tmp_path, "--config", str(PAPER / f"{phase}.yaml"), *overlays, *ON_THIS_MACHINE)
    check_common(cli, run, phase, PAPER_SFT if phase == "sft" else CLASSES[phase])
    check_expected(cli, EXPECTED["paper", phase])
    strategy = cli.trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 2
    assert cli.trainer.precision == "32-true", "the command line overrides the overlays"
    assert cli.model.backbone_config.dtype == "bfloat16"
    train = cli.datamodule.sources["train"]
    assert all(str(src.shards).startswith("data/") for src in train.values()), "LATENT_MCA_DATA defaults to data"
    if phase.endswith("_rl"):
        judge = cli.model.reward.judge
        assert isinstance(judge, OpenAIJudge) and judge.prompt_style == "mmrole"
        assert judge.url == "http://localhost:8000/v1/chat/completions"


@pytest.mark.parametrize("name", PIPELINES)
def test_pipeline_config_parses_with_the_pipeline_signature(name):
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_function_arguments(pipeline)
    cfg = parser.parse_path(str(DEMO / name))
    names = [p.name for p in cfg.phases]
    assert names[:5] == ["sft", "projector", "inverse_dynamics", "bc", "latent_rl"]
    assert len(set(names)) == len(names), "phase names are output directories"
    for i, spec in enumerate(cfg.phases):
        assert (ROOT / spec.config).is_file(), spec.config
        assert spec.name.startswith(Path(spec.config).stem), (spec.name, spec.config)
        for override in spec.overrides:
            if "{run_dir}/" in override:  # an ablation chain: it must read an earlier phase's export
                parent = override.split("{run_dir}/")[1].split("/")[0]
                assert parent in names[:i], (spec.name, override)
    assert {a.path.split("/")[0] for a in cfg.agents} <= set(names), "every agent is a phase's export"
    assert cfg.world.num_paired == 2000 and cfg.backbone.hidden_size == 128
    assert set(cfg.eval_splits) == {"test_id", "test_ood"}
