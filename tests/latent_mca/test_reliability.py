"""Reliability acceptance: faults and bad input during real ``fit`` runs of the demo phases on a tiny world.

Each test drives ``python -m latent_mca fit --config configs/demo/<phase>.yaml`` in-process (see
``tests/helpers/demo_run.py``) and injects one fault: a crash mid-epoch, a bad configuration, an export from
another model, damaged shards, a failing judge, a NaN loss. ``docs/reliability.md`` lists what the
framework does about each one and which test checks it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import socket
from pathlib import Path

import pytest
import torch
import yaml

from latent_mca.callbacks import NonFiniteError
from latent_mca.checkpoint import IncompatibleCheckpointError, is_complete
from latent_mca.cli import main
from latent_mca.models.tiny import build_tiny_backbone
from latent_mca.phases import ProjectorModule
from tests.helpers.demo_run import build_demo_run, demo_config, fit_phase, read_scalars
from tests.helpers.reliability_run import (
    BACKBONE,
    WORLD,
    SimulatedCrash,
    edit_json,
    module_weights,
    replace_members,
    shard_members,
    truncate_shard,
)
from tests.latent_mca.rl.chat_server import FakeChatServer, Reply, scores_text

HELPERS = "tests.helpers.reliability_run"
CHECKPOINT_EVERY_STEP = ["--trainer.callbacks.init_args.every_n_train_steps=1"]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: intra-op threads only contend with each other on a small shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """World + tiny backbone (``sft/export`` = the untrained backbone)."""
    return build_demo_run(tmp_path_factory.mktemp("reliability"), seed=0, world=WORLD, backbone=BACKBONE)


@pytest.fixture(scope="module")
def chain(run_dir) -> Path:
    """Run projector -> inverse_dynamics -> bc, two steps each, under their default phase names."""
    for phase in ("projector", "inverse_dynamics", "bc"):
        fit_phase(run_dir, phase, demo_config(phase), steps=2)
    return run_dir


def record(out: Path) -> list[str]:
    return [f"--trainer.callbacks+={HELPERS}.RecordBatchKeys", f"--trainer.callbacks.init_args.out={out}"]


def recorded(out: Path) -> list[list[str]]:
    return json.loads((out / "keys_rank0.json").read_text())["batches"]


# ------------------------------------------------------------------------------------------ (a) killed run


def crash_and_resume(run: Path, phase: str, name: str, steps: int, crash_at: int, extra: list[str]) -> None:
    """Run ``name`` until it crashes after step ``crash_at``, then resume it from ``last.ckpt`` to ``steps``."""
    crash = [f"--trainer.callbacks+={HELPERS}.CrashAfterStep", f"--trainer.callbacks.init_args.step={crash_at}"]
    with pytest.raises(SimulatedCrash):
        fit_phase(run, name, demo_config(phase), [*CHECKPOINT_EVERY_STEP, *extra, *record(run / name / "a"), *crash],
                  steps=steps)
    last = run / name / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == crash_at
    assert not (run / name / "export").exists(), "a killed run writes no export"
    fit_phase(run, name, demo_config(phase), [*CHECKPOINT_EVERY_STEP, *extra, *record(run / name / "b"),
                                              f"--ckpt_path={last}"], steps=steps)


def assert_same_exports(a: Path, b: Path) -> None:
    modules = sorted(p.stem for p in a.glob("*.safetensors"))
    assert modules and modules == sorted(p.stem for p in b.glob("*.safetensors"))
    for module in modules:
        wa, wb = module_weights(a, module), module_weights(b, module)
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        worst = max((float((wa[k] - wb[k]).abs().max()) for k in different), default=0.0)
        assert not different, f"{module}: {different[:5]} differ (max |diff| {worst:.3g})"


def check_resume(run: Path, phase: str, num_workers: int, steps: int = 10, crash_at: int = 4,
                 extra: tuple[str, ...] = ()) -> None:
    common = [f"--data.init_args.num_workers={num_workers}", *extra]
    straight, resumed = f"{phase}_straight{num_workers}", f"{phase}_resumed{num_workers}"
    fit_phase(run, straight, demo_config(phase), [*common, *record(run / straight / "a")], steps=steps)
    crash_and_resume(run, phase, resumed, steps, crash_at, common)
    full = recorded(run / straight / "a")
    # The crashed run had fetched batch `crash_at` but not trained on it; the resumed run starts with it.
    assert recorded(run / resumed / "a") == full[:crash_at + 1]
    assert recorded(run / resumed / "b") == full[crash_at:], "the resumed run continues at the next batch"
    assert json.loads((run / resumed / "export" / "export_complete.json").read_text())["global_step"] == steps
    assert_same_exports(run / straight / "export", run / resumed / "export")


@pytest.mark.parametrize("num_workers", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_projector_killed_mid_epoch_resumes_to_the_same_weights(run_dir, num_workers):
    # 7 batches per epoch: the crash is mid-epoch and the resumed run crosses into the next epoch.
    check_resume(run_dir, "projector", num_workers)


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_bc_killed_mid_epoch_resumes_to_the_same_weights(chain, num_workers):
    check_resume(chain, "bc", num_workers, steps=6, crash_at=3)


@pytest.mark.slow
def test_sampling_phase_resumes_to_the_same_weights(chain):
    """Inverse dynamics draws Gumbel noise from torch's global generator, which Lightning does not checkpoint.

    Without the CLI's always-on ``RNGStateCheckpoint`` the resumed weights differed (observed max |diff| ~1e-3
    after three more steps, with identical batches); with it they are bit-identical.
    """
    check_resume(chain, "inverse_dynamics", 0, steps=6, crash_at=3)


# ------------------------------------------------------------------------------------------ (b) bad config


def write_yaml(path: Path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize("overlay, named", [
    ({"model": {"init_args": {"polcy_layers": 2}}}, "polcy_layers"),
    ({"data": {"init_args": {"paired_batch_size": "eight"}}}, "paired_batch_size"),
    ({"trainer": {"max_step": 5}}, "max_step"),
    ({"model": {"init_args": {"optimizer": {"init_args": {"learning_rate": 0.1}}}}}, "learning_rate"),
], ids=["unknown_model_key", "wrong_type", "unknown_trainer_key", "unknown_optimizer_key"])
def test_bad_config_fails_before_any_work_naming_the_key(overlay, named, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    monkeypatch.setenv("LATENT_MCA_RUN_DIR", str(run))
    monkeypatch.chdir(tmp_path)
    bad = write_yaml(tmp_path / "bad.yaml", overlay)
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", demo_config("bc"), "--config", bad])
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert named in err, err[-2000:]
    assert not run.exists() and not (tmp_path / "runs").exists(), "no log, checkpoint or export directory"


# ------------------------------------------------------------------------------------------ (c) exports


@pytest.fixture(scope="module")
def wide_backbone(run_dir, tmp_path_factory) -> Path:
    """Another tiny backbone on the same tokenizer corpus: hidden size 48 instead of 32."""
    corpus = (run_dir / "world" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    spec = dataclasses.replace(BACKBONE, hidden_size=48, intermediate_size=96)
    return build_tiny_backbone(tmp_path_factory.mktemp("wide") / "backbone", corpus, spec, 0)


@pytest.mark.parametrize("phase, parent", [("inverse_dynamics", "projector"), ("bc", "inverse_dynamics"),
                                           ("latent_rl", "bc")])
def test_export_from_another_backbone_is_refused(chain, wide_backbone, monkeypatch, phase, parent):
    wide = wide_backbone
    name = f"{phase}_wide"
    with pytest.raises(IncompatibleCheckpointError) as info:
        fit_phase(chain, name, demo_config(phase), [f"--model.init_args.backbone.path={wide}",
                                                    f"--data.init_args.processor={wide}"], monkeypatch, steps=1)
    message = str(info.value)
    assert str(chain / parent / "export") in message and "hidden_size=32" in message and "hidden_size=48" in message
    assert not (chain / name / "export").exists()


# ------------------------------------------------------------------------------------------ (d) shards


def copy_world(run: Path, dest: Path) -> Path:
    shutil.copytree(run / "world", dest)
    return dest


@pytest.mark.parametrize("damage, error, named", [
    ("missing_shard", FileNotFoundError, "train-000003.tar"),
    ("empty_directory", FileNotFoundError, "holds no *.tar shards"),
    ("unlisted_shard", ValueError, "train-000008.tar is not listed in"),
], ids=["missing_shard", "empty_directory", "unlisted_shard"])
def test_bad_shard_directory_fails_at_setup_naming_it(run_dir, tmp_path, monkeypatch, damage, error, named):
    paired = copy_world(run_dir, tmp_path / "world") / "paired"
    if damage == "missing_shard":
        (paired / "train-000003.tar").unlink()
    elif damage == "empty_directory":
        shutil.rmtree(paired)
        paired.mkdir()
    else:
        shutil.copy(paired / "train-000000.tar", paired / "train-000008.tar")
    with pytest.raises(error) as info:
        fit_phase(run_dir, f"projector_{damage}", demo_config("projector"),
                  [f"--data.init_args.train={paired}", "--data.init_args.val=null"], monkeypatch, steps=1)
    assert named in str(info.value) and str(paired) in str(info.value)
    assert not (run_dir / f"projector_{damage}" / "export").exists()


def narrator_first(doc: dict) -> dict:
    return {**doc, "messages": [{**doc["messages"][0], "role": "narrator"}, *doc["messages"][1:]]}


def very_long_reply(doc: dict) -> dict:
    return {**doc, "messages": [*doc["messages"][:-1], {**doc["messages"][-1], "content": "hustle " * 3000}]}


def damage_world(run: Path, dest: Path) -> dict[str, str]:
    """Copy the world and damage it; returns ``url#key`` (``url`` for a shard) -> the expected skip reason."""
    world = copy_world(run, dest)
    paired, text = world / "paired", world / "text_only"
    truncate_shard(paired / "train-000002.tar")
    image = next(n for n in shard_members(paired / "train-000003.tar") if n.endswith((".png", ".jpg")))
    replace_members(paired / "train-000003.tar", {image: b"not an image at all"})
    shard = text / "train-000000.tar"
    docs = [n for n in shard_members(shard) if n.endswith(".json")]
    replace_members(shard, {docs[0]: b'{"messages": [{"role": "user", "content": "unterminated'})
    edit_json(shard, docs[1], narrator_first)
    edit_json(shard, docs[2], very_long_reply)
    return {f"{paired / 'train-000003.tar'}#{image.split('.')[0]}": "bad_image",
            **{f"{shard}#{doc.split('.')[0]}": reason
               for doc, reason in zip(docs, ("bad_json", "unknown_role", "too_long"))},
            str(paired / "train-000002.tar"): "bad_tar"}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_damaged_samples_are_skipped_counted_and_the_run_completes(run_dir, tmp_path, monkeypatch, num_workers):
    expected = damage_world(run_dir, tmp_path / "world")
    world = tmp_path / "world"
    name = f"inverse_damaged{num_workers}"
    steps = 8  # one epoch of the 32 text-only samples at 4 per batch
    overrides = ["--model.init_args.init_from=null",
                 f"--data.init_args.paired_train={world}/paired/train-{{000000..000006}}.tar",
                 f"--data.init_args.paired_val={world}/paired/train-000007.tar",
                 f"--data.init_args.text_train={world}/text_only",
                 f"--data.init_args.num_workers={num_workers}", "--data.init_args.shuffle_buffer=0"]
    cli = fit_phase(run_dir, name, demo_config("inverse_dynamics"), overrides, monkeypatch, steps=steps)
    assert cli.trainer.global_step == steps and is_complete(run_dir / name / "export")
    skipped = dict((name_, reason) for reason, name_ in cli.datamodule.skipped_samples)
    assert {k: skipped.get(k) for k in expected} == expected
    counts = cli.datamodule.skip_counts
    logged = {tag: values[-1][1] for tag, values in read_scalars(run_dir, name).items() if tag.startswith("data/")}
    for reason in set(expected.values()):
        assert counts[reason] >= 1 and logged[f"data/skipped_{reason}"] == counts[reason], reason


# ------------------------------------------------------------------------------------------ (e) judge outage


def judge_args(url: str) -> list[str]:
    judge = {"class_path": "latent_mca.rl.rewards.OpenAIJudge",
             "init_args": {"base_url": url, "model": "judge", "api_key_env": None, "max_retries": 0, "timeout": 2.0,
                           "max_concurrency": 1, "breaker_threshold": 4, "breaker_cooldown": 600.0,
                           "trust_env": False}}
    return [f"--model.init_args.reward.init_args.judge={json.dumps(judge)}", "--model.init_args.rl.num_generations=3"]


def test_latent_rl_survives_a_flaky_judge(chain, monkeypatch):
    """Every third judge request fails with HTTP 500; the judge's circuit breaker stays closed."""
    from latent_mca.rl.rewards import MMROLE_ASPECTS

    def behaviour(payload, index):
        if index % 3 == 0:
            return Reply(status=500, body=b'{"error": "overloaded"}')
        return Reply(scores_text(MMROLE_ASPECTS, [1 + index % 9] * 8, [5] * 8))

    with FakeChatServer(behaviour) as server:
        cli = fit_phase(chain, "latent_rl_flaky", demo_config("latent_rl"), judge_args(server.url), monkeypatch,
                        steps=2)
        failed = sum(1 for i in range(len(server.received)) if i % 3 == 0)
    scalars = read_scalars(chain, "latent_rl_flaky")
    assert [v for _, v in scalars["train/unscored"]] == [2.0, 2.0], "2 x 3 completions per step, 2 failed"
    # Requests go out one at a time; reward = A/B = (1 + index % 9) / 5 over the requests that succeeded.
    assert [v for _, v in scalars["train/reward"]] == pytest.approx([(2 + 3 + 5 + 6) / 20, (8 + 9 + 2 + 3) / 20])
    assert failed == 4 and cli.model.reward.judge.stats()["unscored"] == 4
    assert all(math.isfinite(v) for _, v in scalars["train/loss"]) and cli.trainer.global_step == 2
    assert is_complete(chain / "latent_rl_flaky" / "export")


def test_latent_rl_with_an_unreachable_judge_runs_on_nan_rewards(chain, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    cli = fit_phase(chain, "latent_rl_dead", demo_config("latent_rl"), judge_args(f"http://127.0.0.1:{port}/v1"),
                    monkeypatch, steps=2)
    scalars = read_scalars(chain, "latent_rl_dead")
    assert [v for _, v in scalars["train/unscored"]] == [6.0, 6.0]
    assert [v for _, v in scalars["train/loss"]] == [0.0, 0.0], "no scored completion: no policy gradient"
    stats = cli.model.reward.judge.stats()
    assert stats["breaker_trips"] == 1 and stats["failures/connection"] == 4 and stats["breaker_rejections"] == 8
    assert is_complete(chain / "latent_rl_dead" / "export")
    # Empty steps are taken (the step count advances) but the policy does not move: no weight decay either.
    assert [v for _, v in scalars["train/empty_step"]] == [1.0, 1.0] and cli.trainer.global_step == 2
    from latent_mca.checkpoint import load_phase

    before, after = (load_phase(chain / p / "export").state_dict("policy") for p in ("bc", "latent_rl_dead"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    # The judge's own counters are logged beside the reward they explain.
    assert [v for _, v in scalars["reward/breaker_trips"]][-1] == 1.0


# ------------------------------------------------------------------------------------------ (f) NaN loss


def poison(monkeypatch, steps: set[int] | None) -> None:
    """Make the projector's training loss NaN at the given optimiser steps (all steps when None)."""
    losses = ProjectorModule.losses

    def poisoned(self, batch):
        terms = losses(self, batch)
        if self.training and (steps is None or self.global_step in steps):
            terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(ProjectorModule, "losses", poisoned)


def test_nan_loss_steps_are_skipped_and_counted(run_dir, monkeypatch):
    poison(monkeypatch, {1, 2})
    cli = fit_phase(run_dir, "projector_nan", demo_config("projector"), monkeypatch=monkeypatch, steps=5)
    skips = [v for _, v in read_scalars(run_dir, "projector_nan")["train/nonfinite_skips"]]
    assert skips == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert cli.trainer.global_step == 5 and is_complete(run_dir / "projector_nan" / "export")
    weights = module_weights(run_dir / "projector_nan" / "export", "projector")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_too_many_nan_steps_stop_the_run(run_dir, monkeypatch):
    poison(monkeypatch, None)
    with pytest.raises(NonFiniteError, match=r"3 consecutive optimiser steps were skipped \(max_consecutive=2\)"):
        fit_phase(run_dir, "projector_all_nan", demo_config("projector"), ["--nonfinite.max_consecutive=2"],
                  monkeypatch, steps=5)
    assert not (run_dir / "projector_all_nan" / "export").exists()
