import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from latent_mca.callbacks import NonFiniteError, NonFiniteGuard
from tests.helpers.ds_toys import ToyBatches, ToyPhase, UpdateRecorder

ROOT = Path(__file__).resolve().parents[2]


def sgd_momentum(params):
    # Momentum and weight decay would move parameters even with zero gradients: a skipped step must not.
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)


def fit(model, guard, max_steps=6, callbacks=(), datamodule=None, **trainer_kwargs):
    recorder = UpdateRecorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, callbacks=[guard, recorder, *callbacks],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, **trainer_kwargs)
    trainer.fit(model, datamodule=datamodule or ToyBatches())
    return trainer, recorder


def test_nan_loss_steps_leave_parameters_unchanged_and_are_counted():
    guard = NonFiniteGuard(max_consecutive=3)
    trainer, rec = fit(ToyPhase(optimizer=sgd_momentum, nan_loss_steps=[1, 3]), guard)
    assert rec.changed == {0: True, 1: False, 2: True, 3: False, 4: True, 5: True}
    assert guard.total == 2 and guard.skipped_steps == [1, 3] and guard.consecutive == 0
    assert "non-finite loss (nan)" in guard.last_reason
    assert trainer.callback_metrics["train/nonfinite_skips"].item() == 2.0
    assert trainer.global_step == 6, "a skipped step still counts, so the data position stays in step"


def test_clean_run_logs_zero_skips():
    guard = NonFiniteGuard()
    trainer, rec = fit(ToyPhase(), guard, max_steps=3)
    assert all(rec.changed.values()) and guard.total == 0
    assert trainer.callback_metrics["train/nonfinite_skips"].item() == 0.0


def test_inf_loss_is_skipped():
    guard = NonFiniteGuard()
    _, rec = fit(ToyPhase(optimizer=sgd_momentum, inf_loss_steps=[2]), guard, max_steps=4)
    assert rec.changed == {0: True, 1: True, 2: False, 3: True}
    assert guard.skipped_steps == [2]


def test_nan_gradients_with_finite_loss_are_skipped_and_named():
    guard = NonFiniteGuard()
    _, rec = fit(ToyPhase(nan_grad_steps=[2]), guard, max_steps=4)
    assert rec.changed == {0: True, 1: True, 2: False, 3: True}
    assert guard.total == 1 and guard.last_reason == "non-finite gradients in head.0.weight"


def test_gradient_check_can_be_switched_off():
    guard = NonFiniteGuard(check_gradients=False)
    model = ToyPhase(optimizer=lambda p: torch.optim.SGD(p, lr=0.05), nan_grad_steps=[1])
    fit(model, guard, max_steps=2)
    assert guard.total == 0
    assert torch.isnan(model.head[0].weight).any(), "without the check the NaN gradient reaches the weights"


def test_run_stops_past_max_consecutive_with_a_clear_message():
    guard = NonFiniteGuard(max_consecutive=2)
    model = ToyPhase(optimizer=sgd_momentum, nan_loss_steps=[2, 3, 4, 5])
    rec = UpdateRecorder()
    with pytest.raises(NonFiniteError) as exc:
        fit(model, guard, callbacks=[rec])
    msg = str(exc.value)
    assert "global step 4" in msg and "3 consecutive" in msg and "max_consecutive=2" in msg
    assert "non-finite loss (nan)" in msg and "[2, 3, 4]" in msg
    assert guard.total == 3
    assert all(torch.isfinite(p).all() for p in model.parameters()), "no NaN reached the weights"
    assert rec.changed == {0: True, 1: True, 2: False, 3: False}


def test_run_stops_past_max_total():
    guard = NonFiniteGuard(max_consecutive=10, max_total=2)
    with pytest.raises(NonFiniteError, match=r"global step 5: 3 optimiser steps were skipped in total \(max_total=2\)"):
        fit(ToyPhase(nan_loss_steps=[1, 3, 5]), guard, max_steps=8)


def test_nan_in_one_micro_batch_skips_the_whole_accumulated_step():
    guard = NonFiniteGuard()
    # Batch 2 is the first micro-batch of optimiser step 1 when accumulating 2 batches.
    model = ToyPhase(optimizer=sgd_momentum, nan_loss_batches=[2])
    _, rec = fit(model, guard, max_steps=3, accumulate_grad_batches=2)
    assert rec.changed == {0: True, 1: False, 2: True}
    assert guard.skipped_steps == [1]


class ManualToy(ToyPhase):
    """Manual optimisation; ``ask_guard`` makes it call ``should_skip`` before the backward pass."""

    def __init__(self, ask_guard: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.ask_guard = ask_guard
        self.backward_batches: list[int] = []

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.ask_guard and NonFiniteGuard.find(self.trainer).should_skip(loss):
            return None
        opt = self.optimizers()
        opt.zero_grad()
        self.backward_batches.append(batch_idx)
        self.manual_backward(loss)
        opt.step()
        return None


def test_manual_optimisation_steps_are_guarded_by_the_hooks():
    guard = NonFiniteGuard()
    model = ManualToy(optimizer=sgd_momentum, nan_loss_batches=[2])
    _, rec = fit(model, guard, max_steps=4)
    assert rec.per_batch == [True, True, False, True]
    assert guard.skipped_steps == [2] and model.backward_batches == [0, 1, 2, 3]


def test_manual_optimisation_can_skip_the_backward_pass():
    guard = NonFiniteGuard()
    model = ManualToy(ask_guard=True, optimizer=sgd_momentum, nan_loss_batches=[2])
    _, rec = fit(model, guard, max_steps=4)
    # No opt.step() on batch 2, so global_step does not advance there: 5 batches for 4 steps.
    assert rec.per_batch == [True, True, False, True, True]
    assert guard.skipped_steps == [2] and model.backward_batches == [0, 1, 3, 4]


def test_should_skip_counts_and_enforces_the_limit():
    guard = NonFiniteGuard(max_consecutive=1, sync=False)
    assert guard.should_skip(torch.tensor(1.0)) is False
    assert guard.should_skip(torch.tensor([1.0, float("inf")])) is True
    assert guard.total == 1 and "1 non-finite entries" in guard.last_reason
    with pytest.raises(NonFiniteError, match="2 consecutive"):
        guard.should_skip(torch.tensor(float("nan")))


def test_counts_survive_a_checkpoint_resume(tmp_path):
    guard = NonFiniteGuard()
    trainer, _ = fit(ToyPhase(nan_loss_steps=[1]), guard, max_steps=3)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    resumed_guard = NonFiniteGuard()
    trainer2 = L.Trainer(accelerator="cpu", max_steps=5, callbacks=[resumed_guard], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer2.fit(ToyPhase(nan_loss_steps=[4]), datamodule=ToyBatches(), ckpt_path=tmp_path / "a.ckpt")
    assert resumed_guard.skipped_steps == [1, 4] and resumed_guard.total == 2


def test_guard_is_attached_by_the_cli_and_configurable(monkeypatch, tmp_path):
    from latent_mca.cli import lightning_main

    monkeypatch.chdir(tmp_path)
    args = ["--model=tests.helpers.ds_toys.ToyPhase", "--data=tests.helpers.ds_toys.ToyBatches",
            "--trainer.logger=false"]
    cli = lightning_main(args, run=False)
    guards = [cb for cb in cli.trainer.callbacks if isinstance(cb, NonFiniteGuard)]
    assert len(guards) == 1 and guards[0].max_consecutive == 10
    cli = lightning_main(args + ["--nonfinite.max_consecutive=3"], run=False)
    assert NonFiniteGuard.find(cli.trainer).max_consecutive == 3


def test_find_and_argument_checks():
    guard = NonFiniteGuard()
    trainer = L.Trainer(accelerator="cpu", callbacks=[guard], logger=False)
    assert NonFiniteGuard.find(trainer) is guard
    assert NonFiniteGuard.find(L.Trainer(accelerator="cpu", logger=False)) is None
    assert NonFiniteGuard.find(None) is None
    with pytest.raises(ValueError, match="max_consecutive"):
        NonFiniteGuard(max_consecutive=-1)


@pytest.mark.slow
def test_ddp_ranks_skip_together(tmp_path):
    """Rank-local NaNs (loss on rank 0, a gradient on rank 1 after the all-reduce) skip the step on both ranks."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tests/helpers/ddp_guard_run.py"), "--out", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    wall = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"result_rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world_size"] == 2 and r1["rank"] == 1
    for r in (r0, r1):
        assert r["skipped_steps"] == [2, 4] and r["logged_skips"] == 2.0
        assert r["changed"] == {"0": True, "1": True, "2": False, "3": True, "4": False, "5": True}
    assert r0["weights"] == r1["weights"], "replicas stayed identical"
    assert all(math.isfinite(v) for vs in r0["weights"].values() for v in vs)
    print(f"DDP guard run: {wall:.1f} s wall")
