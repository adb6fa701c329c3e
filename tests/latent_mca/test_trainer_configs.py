"""Every trainer overlay parses through the real CLI; the launch recipes compose valid commands."""

import os
import re
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy

from latent_mca.cli import lightning_main

ROOT = Path(__file__).resolve().parents[2]
TRAINER_DIR = ROOT / "configs" / "trainer"
LAUNCH_DIR = ROOT / "configs" / "launch"
TOY = ["--model=tests.helpers.toy_lightning.ToyRegression", "--data=tests.helpers.toy_lightning.ToyData"]
# The offload overlays switch the phase's optimizer, so they need a model with an `optimizer` argument.
PHASE_TOY = ["--model=tests.helpers.ds_toys.ToyPhase", "--data=tests.helpers.ds_toys.ToyBatches"]
TEN_MINUTES = timedelta(minutes=10)
SLURM_2x2_RANK3 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "latent_mca", "SLURM_NTASKS": "4",
                   "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[01-02]",
                   "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}


def build(monkeypatch, tmp_path, *args, model=TOY):
    monkeypatch.chdir(tmp_path)  # the default TensorBoard logger writes under ./runs
    return lightning_main([*model, *args, "--trainer.logger=false"], run=False)


def trainer_config(name):
    return ["--config", str(TRAINER_DIR / name)]


def zero(cli):
    return cli.trainer.strategy.config["zero_optimization"]


def check_cpu(cli):
    assert isinstance(cli.trainer.strategy, SingleDeviceStrategy)
    assert cli.trainer.num_devices == 1 and cli.trainer.precision == "32-true"


def check_ddp(cli):
    strategy = cli.trainer.strategy
    assert type(strategy) is DDPStrategy and strategy._timeout == TEN_MINUTES
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def check_deepspeed(stage, offload_optimizer, offload_params):
    def check(cli):
        strategy = cli.trainer.strategy
        assert isinstance(strategy, DeepSpeedStrategy) and strategy._timeout == TEN_MINUTES
        assert strategy.config["train_micro_batch_size_per_gpu"] == 8, "loaders use batch_size=None"
        assert strategy.exclude_frozen_parameters is True
        assert zero(cli)["stage"] == stage
        assert ("offload_optimizer" in zero(cli)) is offload_optimizer
        assert ("offload_param" in zero(cli)) is offload_params
        if offload_optimizer:
            assert zero(cli)["offload_optimizer"]["device"] == "cpu"
            assert cli.config["model"]["init_args"]["optimizer"]["class_path"] == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    return check


def check_multinode(cli):
    assert cli.trainer.num_nodes == 2 and cli.trainer.num_devices == 4
    assert isinstance(cli.trainer.strategy, DDPStrategy)


def check_bf16(cli):
    assert cli.trainer.precision == "bf16-mixed"


def check_slurm(cli):
    env = cli.trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal == signal.SIGUSR1


#: file -> (model args, extra args, environment, check)
EXPECTED = {
    "cpu.yaml": (TOY, [], {}, check_cpu),
    "ddp.yaml": (TOY, [], {}, check_ddp),
    "deepspeed_zero2.yaml": (TOY, [], {}, check_deepspeed(2, False, False)),
    "deepspeed_zero2_offload.yaml": (PHASE_TOY, [], {}, check_deepspeed(2, True, False)),
    "deepspeed_zero3.yaml": (TOY, [], {}, check_deepspeed(3, False, False)),
    "deepspeed_zero3_offload.yaml": (PHASE_TOY, [], {}, check_deepspeed(3, True, True)),
    "multinode.yaml": (TOY, [], {}, check_multinode),
    "bf16.yaml": (TOY, [], {}, check_bf16),
    # Outside a SLURM job step the plugin cannot know its rank: emulate the variables srun sets.
    "slurm_requeue.yaml": (TOY, ["--trainer.num_nodes=2", "--trainer.devices=2"], SLURM_2x2_RANK3, check_slurm),
}


def test_every_trainer_config_has_an_expectation():
    assert {p.name for p in TRAINER_DIR.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trainer_config_parses_through_the_cli(name, monkeypatch, tmp_path):
    model, extra, env, check = EXPECTED[name]
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cli = build(monkeypatch, tmp_path, *trainer_config(name), *extra, model=model)
    check(cli)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_trainer_config_header_says_what_and_how(name):
    text = (TRAINER_DIR / name).read_text()
    header = text[:text.index("\ntrainer:")]
    assert all(line.startswith("#") for line in header.splitlines()), "a comment header before the settings"
    assert "python -m latent_mca fit" in header or "sbatch" in header, "the exact launch command"
    assert yaml.safe_load(text)["trainer"], "the overlay sets trainer options"


def test_offload_keeps_the_phase_optimizer_settings(monkeypatch, tmp_path):
    phase = tmp_path / "phase.yaml"
    phase.write_text(yaml.safe_dump({"model": {"init_args": {"optimizer": {
        "class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.05, "betas": [0.9, 0.95]}}}}}))
    cli = build(monkeypatch, tmp_path, "--config", str(phase), *trainer_config("deepspeed_zero2_offload.yaml"),
                model=PHASE_TOY)
    optimizer = cli.config["model"]["init_args"]["optimizer"]
    assert optimizer["class_path"] == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    args = optimizer["init_args"]
    assert args["lr"] == 3e-4 and args["weight_decay"] == 0.05 and tuple(args["betas"]) == (0.9, 0.95)
    assert args["adamw_mode"] is True, "decoupled weight decay, as AdamW"


def test_zero2_with_bf16_uses_deepspeed_bf16(monkeypatch, tmp_path):
    cli = build(monkeypatch, tmp_path, *trainer_config("deepspeed_zero2.yaml"), *trainer_config("bf16.yaml"))
    plugin = cli.trainer.strategy.precision_plugin
    assert isinstance(plugin, DeepSpeedPrecision) and plugin.precision == "bf16-mixed"


def test_later_configs_override_earlier_ones(monkeypatch, tmp_path):
    cli = build(monkeypatch, tmp_path, *trainer_config("deepspeed_zero3.yaml"), *trainer_config("ddp.yaml"))
    assert type(cli.trainer.strategy) is DDPStrategy


def torchrun_env(monkeypatch, rank, world):
    for key, value in {"TORCHELASTIC_RUN_ID": "job", "RANK": rank, "LOCAL_RANK": rank % 4, "WORLD_SIZE": world,
                       "GROUP_RANK": rank // 4, "LOCAL_WORLD_SIZE": 4, "MASTER_ADDR": "node0",
                       "MASTER_PORT": 29500}.items():
        monkeypatch.setenv(key, str(value))


def launch(cli, monkeypatch):
    """Pass the trainer's launcher checks, as fit does first (the launcher only validates: the processes exist)."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else the launcher resets our threads
    return cli.trainer.strategy.launcher.launch(lambda: "launched")


def test_multinode_zero2_under_torchrun(monkeypatch, tmp_path):
    torchrun_env(monkeypatch, rank=6, world=8)
    cli = build(monkeypatch, tmp_path, *trainer_config("multinode.yaml"), *trainer_config("deepspeed_zero2.yaml"))
    env = cli.trainer.strategy.cluster_environment
    assert isinstance(env, TorchElasticEnvironment)
    assert (cli.trainer.world_size, cli.trainer.global_rank, cli.trainer.node_rank) == (8, 6, 1)
    assert launch(cli, monkeypatch) == "launched"


def test_multinode_mismatch_with_the_launcher_is_refused(monkeypatch, tmp_path):
    torchrun_env(monkeypatch, rank=0, world=4)
    cli = build(monkeypatch, tmp_path, *trainer_config("multinode.yaml"), *trainer_config("ddp.yaml"))
    with pytest.raises(ValueError, match=r"does not match the world size \(4\)"):
        launch(cli, monkeypatch)


# ---------------------------------------------------------------------------------------------- launch recipes
def sbatch_options(path):
    return dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", path.read_text(), flags=re.M))


@pytest.mark.parametrize("script", ["slurm.sbatch", "torchrun.sh"])
def test_launch_scripts_are_valid_bash(script):
    proc = subprocess.run(["bash", "-n", str(LAUNCH_DIR / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_header_matches_the_requeue_plugin():
    opts = sbatch_options(LAUNCH_DIR / "slurm.sbatch")
    assert opts["gres"] == f"gpu:{opts['ntasks-per-node']}", "one task per GPU"
    sig, _, lead = opts["signal"].partition("@")
    plugin = yaml.safe_load((TRAINER_DIR / "slurm_requeue.yaml").read_text())["trainer"]["plugins"][0]
    assert sig == plugin["init_args"]["requeue_signal"] and int(lead) >= 60
    assert "--requeue" in (LAUNCH_DIR / "slurm.sbatch").read_text()


def test_sbatch_composes_a_command_lightning_accepts(monkeypatch, tmp_path):
    """Run the batch script with a fake srun, then build the trainer of rank 3 from the recorded command."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/bash\nprintf "%s\\n" "$@" > "$SRUN_ARGS"\n')
    (fake / "srun").chmod(0o755)
    phase = tmp_path / "phase.yaml"
    phase.write_text(yaml.safe_dump({"trainer": {"max_steps": 3}}))
    env = {**os.environ, **SLURM_2x2_RANK3, "PATH": f"{fake}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(ROOT),
           "SRUN_ARGS": str(tmp_path / "srun_args"), "RUN_DIR": str(tmp_path / "run")}
    proc = subprocess.run(["bash", str(LAUNCH_DIR / "slurm.sbatch"), "--config", str(phase),
                           "--config", "configs/trainer/ddp.yaml"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    argv = (tmp_path / "srun_args").read_text().splitlines()
    assert argv[:5] == ["--kill-on-bad-exit=1", "python", "-m", "latent_mca", "fit"]
    for key, value in SLURM_2x2_RANK3.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)  # relative config paths resolve against the submit directory
    cli = lightning_main([*argv[5:], *TOY, "--trainer.logger=false"], run=False)
    trainer = cli.trainer
    assert (trainer.num_nodes, trainer.num_devices, trainer.world_size, trainer.global_rank) == (2, 2, 4, 3)
    assert trainer.max_steps == 3 and type(trainer.strategy) is DDPStrategy
    assert trainer.default_root_dir == str(tmp_path / "run")
    check_slurm(cli)
    assert launch(cli, monkeypatch) == "launched", "SLURM task layout matches num_nodes x devices"


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_recipe_trains_on_two_cpu_processes(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "tests.helpers.toy_lightning.ToyRegression"},
        "data": {"class_path": "tests.helpers.toy_lightning.ToyData"},
        "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_progress_bar": False, "logger": False,
                    "default_root_dir": str(tmp_path / "run")}}))
    env = {**os.environ, "NNODES": "1", "NPROC_PER_NODE": "2", "RDZV_ENDPOINT": f"localhost:{free_port()}",
           "PYTHONPATH": str(ROOT), "PYTHON": sys.executable}
    proc = subprocess.run([str(LAUNCH_DIR / "torchrun.sh"), "--config", str(config), "--config",
                           "configs/trainer/ddp.yaml"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "MEMBER: 1/2" in out and "MEMBER: 2/2" in out, "two ranks joined one process group"
    assert list((tmp_path / "run").rglob("epoch=0-step=2.ckpt"))
