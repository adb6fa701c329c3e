import subprocess
import sys

import pytest
import yaml

from latent_mca.cli import COMMANDS, TRAINER_COMMANDS, lightning_main, main


def test_help_lists_every_command(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in list(TRAINER_COMMANDS) + list(COMMANDS):
        assert f"  {name} " in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "latent_mca", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "pipeline" in proc.stdout


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_fit_with_repeated_configs_and_interpolation(tmp_path):
    base = write_yaml(tmp_path / "base.yaml", {
        "model": {"class_path": "tests.helpers.toy_lightning.ToyRegression", "init_args": {"hidden": 3}},
        "data": {"class_path": "tests.helpers.toy_lightning.ToyData",
                 "init_args": {"hidden": "${model.init_args.hidden}", "size": 16}},
        "trainer": {"max_steps": 3, "accelerator": "cpu", "enable_checkpointing": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": str(tmp_path / "runs"), "name": "toy"}}},
    })
    override = write_yaml(tmp_path / "override.yaml", {"model": {"init_args": {"hidden": 5}}})
    cli = main(["fit", "--config", base, "--config", override, "--trainer.max_steps=2"])
    assert cli.model.net.in_features == 5
    assert cli.datamodule.data.tensors[0].shape[1] == 5, "interpolation resolved after merging both files"
    assert cli.trainer.global_step == 2
    saved = yaml.safe_load((tmp_path / "runs" / "toy" / "version_0" / "config.yaml").read_text())
    assert saved["model"]["init_args"]["hidden"] == 5
    events = list((tmp_path / "runs" / "toy" / "version_0").glob("events.out.tfevents.*"))
    assert events, "TensorBoard is the default logger"


def test_default_logger_is_tensorboard(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = lightning_main(["--model=tests.helpers.toy_lightning.ToyRegression",
                          "--data=tests.helpers.toy_lightning.ToyData"], run=False)
    from lightning.pytorch.loggers import TensorBoardLogger

    assert isinstance(cli.trainer.logger, TensorBoardLogger)


def test_unknown_config_key_fails_naming_it(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "bad.yaml", {
        "model": {"class_path": "tests.helpers.toy_lightning.ToyRegression", "init_args": {"hiden": 3}},
        "data": {"class_path": "tests.helpers.toy_lightning.ToyData"},
    })
    with pytest.raises(SystemExit):
        main(["fit", "--config", cfg])
    assert "hiden" in capsys.readouterr().err


def test_no_command_takes_a_parameter_named_config():
    """The `--config` option reads files of arguments: a parameter named config would never get a value."""
    import inspect

    from latent_mca.cli import resolve_command

    assert not [name for name in COMMANDS if "config" in inspect.signature(resolve_command(name)).parameters]


def test_results_runs_the_pipeline_config_it_is_given(monkeypatch, tmp_path):
    import latent_mca.cli as cli

    real, calls = cli.run_command, []

    class Stop(Exception):
        pass

    def spy(name, args):
        if name == "pipeline":
            calls.append(list(args))
            raise Stop
        return real(name, args)

    monkeypatch.setattr(cli, "run_command", spy)
    with pytest.raises(Stop):
        main(["results", "--pipeline_config", "configs/demo/rl_lr_sweep.yaml", "--seeds", "[4]",
              "--root", str(tmp_path)])
    assert calls == [["--config", "configs/demo/rl_lr_sweep.yaml", "--seed", "4", "--run_dir",
                      str(tmp_path / "seed4")]]
