"""The main job on a micro configuration: every phase, evaluation, skip-on-rerun and resume."""

import json

import pytest
import yaml

from latent_mca.cli import main

FAST = ["--trainer.log_every_n_steps=1", "--data.init_args.num_workers=0", "--trainer.limit_val_batches=1"]
STAGE1_DATA = ["--data.init_args.paired_batch_size=2", "--data.init_args.text_batch_size=2"]
RL = ["--data.init_args.batch_size=2", "--model.init_args.rl.num_generations=2",
      "--model.init_args.rl.max_new_tokens=4"]


def micro_pipeline(tmp_path, run_dir):
    phases = [
        {"name": "sft", "config": "configs/demo/sft.yaml",
         "overrides": FAST + ["--data.init_args.batch_size=4", "--trainer.max_steps=2",
                              "--trainer.val_check_interval=2",
                              "--model.init_args.lr_scheduler.init_args.max_steps=2"]},
        {"name": "projector", "config": "configs/demo/projector.yaml",
         "overrides": FAST + ["--data.init_args.batch_size=2", "--trainer.max_steps=2",
                              "--trainer.val_check_interval=2"]},
        {"name": "inverse_dynamics", "config": "configs/demo/inverse_dynamics.yaml",
         "overrides": FAST + STAGE1_DATA + ["--trainer.max_steps=2", "--trainer.val_check_interval=2",
                                            "--model.init_args.inverse_layers=1", "--model.init_args.num_codes=8"]},
        {"name": "bc", "config": "configs/demo/bc.yaml",
         "overrides": FAST + STAGE1_DATA + ["--trainer.max_steps=2", "--trainer.val_check_interval=2",
                                            "--model.init_args.policy_layers=1"]},
        {"name": "latent_rl", "config": "configs/demo/latent_rl.yaml",
         "overrides": FAST + RL + ["--trainer.max_steps=1"]},
        {"name": "token_rl", "config": "configs/demo/token_rl.yaml",
         "overrides": FAST + RL + ["--trainer.max_steps=1"]},
    ]
    cfg = {
        "run_dir": str(run_dir), "seed": 3,
        "world": {"num_paired": 32, "num_text_only": 32, "num_dialogue_train": 16, "num_test_id": 4,
                  "num_test_ood": 4, "samples_per_shard": 4, "image_size": 56, "num_characters": 4},
        "backbone": {"vocab_size": 400, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1,
                     "num_heads": 2, "num_kv_heads": 1, "vision_depth": 1, "vision_hidden_size": 32},
        "phases": phases,
        "agents": [{"name": "SFT", "kind": "token", "path": "sft/export"},
                   {"name": "GRPO (latent)", "kind": "latent", "path": "latent_rl/export"}],
        "eval_splits": {"test_id": "world/dialogue/test_id-*.tar", "test_ood": "world/dialogue/test_ood-*.tar"},
        "eval_sampling": {"num_generations": 2, "max_new_tokens": 4},
    }
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def test_micro_pipeline_runs_every_phase_then_skips_and_resumes(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    cfg = micro_pipeline(tmp_path, run)
    import latent_mca.cli as cli

    real = cli.lightning_main
    calls = []

    def crash_on_bc(args, run=True):
        calls.append(args)
        if any("bc.yaml" in a for a in args):
            raise KeyboardInterrupt("simulated interruption")
        return real(args, run)

    monkeypatch.setattr(cli, "lightning_main", crash_on_bc)
    with pytest.raises(KeyboardInterrupt):
        main(["pipeline", "--config", cfg])
    assert (run / "inverse_dynamics" / "export" / "export_complete.json").exists()
    assert not (run / "bc" / "export").exists()

    calls.clear()
    monkeypatch.setattr(cli, "lightning_main", lambda args, run=True: (calls.append(args), real(args, run))[1])
    summary = main(["pipeline", "--config", cfg])
    ran = [name for name, info in summary["phases"].items() if info["status"] == "ran"]
    assert ran == ["bc", "latent_rl", "token_rl"], "phases finished before the interruption are skipped"
    for phase in ("sft", "projector", "inverse_dynamics", "bc", "latent_rl", "token_rl"):
        assert (run / phase / "export" / "export_complete.json").exists()
    assert len(summary["eval"]) == 2
    for result in summary["eval"]:
        for split in ("test_id", "test_ood"):
            assert result[split]["ratio"]["num_samples"] == 4
    text = (run / "summary.md").read_text()
    assert "GRPO (latent)" in text and "test_ood ratio" in text
    assert json.loads((run / "summary.json").read_text())["seed"] == 3

    calls.clear()
    again = main(["pipeline", "--config", cfg])
    assert not calls and all(info["status"] == "skipped" for info in again["phases"].values())

    # A phase killed after its last checkpoint but before its export resumes from that checkpoint.
    last = run / "bc" / "checkpoints" / "last.ckpt"
    assert last.exists()
    import shutil

    shutil.rmtree(run / "bc" / "export")
    calls.clear()
    resumed = main(["pipeline", "--config", cfg, "--skip_eval=true"])
    assert [a for a in calls[0] if a.startswith("--ckpt_path")] == [f"--ckpt_path={last}"]
    assert resumed["phases"]["bc"]["status"] == "ran" and resumed["phases"]["bc"]["global_step"] == 2
