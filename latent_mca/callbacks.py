"""Lightning callbacks of the framework.

:class:`NonFiniteGuard` skips optimiser steps whose loss or gradients are NaN/inf, counts them, logs the
count as ``train/nonfinite_skips`` and stops the run with :class:`NonFiniteError` once too many steps in a
row (or in total) were skipped. Attach it in YAML::

    trainer:
      callbacks:
        - class_path: latent_mca.callbacks.NonFiniteGuard
          init_args: {max_consecutive: 10, max_total: 100}

How a step is skipped depends on who owns the gradients:

* plain PyTorch optimisers (single device, DDP): in ``on_before_optimizer_step`` the guard sets every
  ``param.grad`` of the optimiser to ``None``. Torch optimisers leave parameters without a gradient
  untouched (no momentum, no weight decay), so the step changes nothing. Lightning still counts the step
  (``trainer.global_step`` advances and the LR scheduler steps), which keeps the data position, a
  function of ``global_step``, in line with the batches consumed;
* DeepSpeed: gradients live in ZeRO's partitioned buffers, where the guard cannot reach them. DeepSpeed's
  own overflow check skips any step with a non-finite gradient norm (ZeRO-1/2/3, fp32, bf16 and fp16); the
  guard reads the engine's ``skipped_steps`` counter after each step and counts those.

The decision is reduced across ranks (any rank non-finite -> every rank skips), so replicas never diverge.
Under ``precision="16-mixed"`` the GradScaler already skips overflowing steps while it calibrates the loss
scale, so the guard checks only the loss there.

Manual optimisation: the hooks fire there too (``manual_backward`` calls ``on_before_backward``,
``opt.step()`` calls ``on_before_optimizer_step``), so nothing is needed. A phase that would rather not run
the backward pass on a bad loss asks first::

    guard = NonFiniteGuard.find(self.trainer)
    if guard is not None and guard.should_skip(loss):
        return  # counted; do not call manual_backward / opt.step for this step
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

log = logging.getLogger(__name__)

#: How many of the most recent skipped step indices the guard remembers (the counts are always complete).
MAX_REMEMBERED_STEPS = 1000


class NonFiniteError(RuntimeError):
    """Raised by :class:`NonFiniteGuard` when the run skipped more non-finite steps than allowed."""


def nonfinite_gradients(params: list[torch.nn.Parameter], names: dict[int, str], limit: int = 3) -> list[str]:
    """Names of (up to ``limit``) parameters whose gradient holds NaN or inf.

    Args:
        params: Parameters to check (those without a gradient are ignored).
        names: ``id(param)`` -> parameter name, for the message.
        limit: Stop after this many offenders.
    """
    bad = []
    for p in params:
        if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
            bad.append(names.get(id(p), f"<unnamed {tuple(p.shape)}>"))
            if len(bad) >= limit:
                break
    return bad


def _describe_loss(loss: Tensor) -> str:
    value = loss.detach().float()
    shown = f"{value.item()}" if value.numel() == 1 else f"{int((~torch.isfinite(value)).sum())} non-finite entries"
    return f"non-finite loss ({shown})"


class NonFiniteGuard(Callback):
    """Skip optimiser steps with a NaN/inf loss or gradients; stop the run when they pile up.

    Args:
        max_consecutive: Skipped steps in a row that are tolerated; one more raises :class:`NonFiniteError`.
        max_total: Skipped steps over the whole run that are tolerated (``None``: no limit).
        check_gradients: Also inspect gradients (not only the loss) before each optimiser step.
        sync: Reduce the skip decision across ranks (needed whenever the loss check alone can differ between
            ranks; costs one tiny all-reduce per optimiser step).
        log_name: Metric name of the running skip count.
    """

    def __init__(self, max_consecutive: int = 10, max_total: int | None = None, check_gradients: bool = True,
                 sync: bool = True, log_name: str = "train/nonfinite_skips") -> None:
        if max_consecutive < 0 or (max_total is not None and max_total < 0):
            raise ValueError("NonFiniteGuard: max_consecutive and max_total must be >= 0")
        self.max_consecutive = max_consecutive
        self.max_total = max_total
        self.check_gradients = check_gradients
        self.sync = sync
        self.log_name = log_name
        self.total = 0
        self.consecutive = 0
        self.skipped_steps: list[int] = []
        self.last_reason: str | None = None
        self._pending: str | None = None  # a non-finite loss seen since the last optimiser step
        self._ds_marker: tuple[int, int, int] | None = None  # DeepSpeed (global_steps, skipped_steps, our step)
        self._ds_reason: str | None = None  # the non-finite loss of the DeepSpeed step in flight
        self._trainer: Trainer | None = None
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------ public helpers
    @staticmethod
    def find(trainer: Trainer | None) -> NonFiniteGuard | None:
        """The guard attached to ``trainer`` (``None`` if there is none)."""
        if trainer is None:
            return None
        return next((cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard)), None)

    def should_skip(self, loss: Tensor) -> bool:
        """Decide, before the backward pass, whether a manual-optimisation step must be skipped.

        Returns True (and counts the skip, possibly raising :class:`NonFiniteError`) when the loss is
        non-finite on any rank; the caller then calls neither ``manual_backward`` nor ``opt.step()``.

        Args:
            loss: The step's loss.
        """
        reason = None if bool(torch.isfinite(loss.detach()).all()) else _describe_loss(loss)
        bad = self._reduce(reason is not None)
        if not bad:
            return False
        self._pending = None
        self._record_skip(reason or "non-finite loss on another rank")
        return True

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remember the trainer (for :meth:`should_skip`)."""
        self._trainer = trainer

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Index parameter names for error messages (after ``configure_model``)."""
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        """Note a non-finite loss; the step it belongs to is skipped in ``on_before_optimizer_step``."""
        if self._pending is None and not bool(torch.isfinite(loss.detach()).all()):
            self._pending = _describe_loss(loss)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        """Skip this step (drop every gradient) if the loss or a gradient is non-finite on any rank."""
        engine = _deepspeed_engine(trainer)
        if engine is not None:
            self._settle_deepspeed(engine)
            if self._ds_marker is None:  # the first micro-step of an accumulation window
                self._ds_marker = (engine.global_steps, engine.skipped_steps, trainer.global_step)
            self._ds_reason = self._ds_reason or self._pending
            self._pending = None
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        reason = self._pending
        if reason is None and self.check_gradients and not _grad_scaler_active(trainer):
            bad_names = nonfinite_gradients(params, self._names)
            if bad_names:
                reason = f"non-finite gradients in {', '.join(bad_names)}"
        self._pending = None
        if not self._reduce(reason is not None):
            self.consecutive = 0
            return
        for p in params:
            p.grad = None
        self._record_skip(reason or "non-finite loss or gradients on another rank")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Count a step DeepSpeed skipped; log the running skip count."""
        engine = _deepspeed_engine(trainer)
        if engine is not None:
            self._settle_deepspeed(engine)
        pl_module.log(self.log_name, float(self.total), on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self) -> dict[str, Any]:
        """Counters saved in checkpoints, so limits and counts survive a resume."""
        return {"total": self.total, "consecutive": self.consecutive, "skipped_steps": list(self.skipped_steps),
                "last_reason": self.last_reason}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.total = int(state_dict["total"])
        self.consecutive = int(state_dict["consecutive"])
        self.skipped_steps = list(state_dict["skipped_steps"])
        self.last_reason = state_dict.get("last_reason")

    # ------------------------------------------------------------------ internals
    def _reduce(self, bad: bool) -> bool:
        if self.sync and self._trainer is not None:
            return bool(self._trainer.strategy.reduce_boolean_decision(bad, all=False))
        return bad

    def _settle_deepspeed(self, engine: Any) -> None:
        """Compare DeepSpeed's step counters with those taken before the last ``step()``."""
        if self._ds_marker is None:
            return
        steps, skipped, step = self._ds_marker
        if engine.global_steps == steps:
            return  # inside a gradient-accumulation window: no optimiser step yet
        self._ds_marker = None
        reason, self._ds_reason = self._ds_reason, None
        if engine.skipped_steps > skipped:
            self._record_skip(reason or "non-finite gradient norm (DeepSpeed overflow check)", step)
            return
        if reason is not None:
            rank_zero_warn(f"NonFiniteGuard: {reason} at step {step}, but DeepSpeed applied the update "
                           "(the non-finite part of the loss did not reach any gradient)")
        self.consecutive = 0

    def _record_skip(self, reason: str, step: int | None = None) -> None:
        if step is None:
            step = self._trainer.global_step if self._trainer is not None else -1
        self.total += 1
        self.consecutive += 1
        self.last_reason = reason
        self.skipped_steps = [*self.skipped_steps[-(MAX_REMEMBERED_STEPS - 1):], step]
        log.warning("NonFiniteGuard: skipped optimiser step %d (%s); %d skipped so far, %d in a row",
                    step, reason, self.total, self.consecutive)
        if self.consecutive > self.max_consecutive:
            self._stop(step, f"{self.consecutive} consecutive optimiser steps were skipped "
                             f"(max_consecutive={self.max_consecutive})")
        if self.max_total is not None and self.total > self.max_total:
            self._stop(step, f"{self.total} optimiser steps were skipped in total (max_total={self.max_total})")

    def _stop(self, step: int, what: str) -> None:
        shown = self.skipped_steps[-20:]
        raise NonFiniteError(
            f"NonFiniteGuard stopped the run at global step {step}: {what}; {self.total} skipped in total, "
            f"last because of {self.last_reason}. Recently skipped steps: {shown}. Lower the learning rate, "
            "check the data of those steps, or use bf16 instead of fp16.")


def _deepspeed_engine(trainer: Trainer) -> Any:
    """The DeepSpeed engine when the trainer runs a DeepSpeed strategy (without importing deepspeed)."""
    model = getattr(trainer.strategy, "model", None)
    return model if hasattr(model, "skipped_steps") and hasattr(model, "global_steps") else None


def _grad_scaler_active(trainer: Trainer) -> bool:
    """Whether a GradScaler (``16-mixed``) owns overflow handling."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


class RNGStateCheckpoint(Callback):
    """Carry the random number generators through checkpoints, so a resumed run draws what the original would.

    Lightning checkpoints hold no RNG state. Phases that sample (Gumbel codes in inverse dynamics, rollouts in
    RL) would otherwise draw different noise after a resume and end on different weights even though the data
    resume exactly. The state (torch CPU and CUDA, Python ``random``, NumPy) is saved with every checkpoint and
    restored at the first training batch after loading, i.e. after everything that draws while a run starts
    up (model building, loader creation), where the uninterrupted run stood. Each rank saves and restores its
    own state.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The generators' states at checkpoint time."""
        import random

        import numpy as np

        # Only tensors and plain Python values: Lightning loads checkpoints with torch.load(weights_only=True).
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        version, internal, gauss = random.getstate()
        state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss],
                 "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Remember the states; they are applied when training resumes."""
        self._pending = state_dict

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Restore the checkpointed states once, before the first resumed step."""
        if self._pending is None:
            return
        import random

        import numpy as np

        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
