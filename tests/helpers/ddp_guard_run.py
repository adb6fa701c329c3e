"""Script: NonFiniteGuard under DDP on 2 CPU processes (gloo) with rank-local NaNs.

Run as ``python tests/helpers/ddp_guard_run.py --out DIR`` with the repository root on ``PYTHONPATH``.
Rank 0 poisons its loss at step 2 (DDP's all-reduce spreads the NaN to both ranks' gradients); rank 1
poisons its own gradient at step 4 *after* the all-reduce, so only the guard's cross-rank decision keeps the
replicas together. Each rank writes ``DIR/result_rank{r}.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
from lightning.pytorch.strategies import DDPStrategy

from latent_mca.callbacks import NonFiniteGuard
from tests.helpers.ds_toys import ToyBatches, ToyPhase, UpdateRecorder


def main() -> None:
    """Train 6 steps on 2 ranks and record what each rank saw."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    L.seed_everything(0)
    guard, recorder = NonFiniteGuard(max_consecutive=1), UpdateRecorder()
    model = ToyPhase(nan_loss_steps=[2], loss_rank=0, nan_grad_steps=[4], grad_rank=1)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                        max_steps=6, callbacks=[guard, recorder], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(args.out))
    trainer.fit(model, datamodule=ToyBatches())
    weights = {n: p.detach().flatten().tolist() for n, p in model.named_parameters() if p.requires_grad}
    result = {"rank": trainer.global_rank, "world_size": trainer.world_size, "skips": guard.total,
              "skipped_steps": guard.skipped_steps, "reason": guard.last_reason,
              "changed": {str(k): v for k, v in sorted(recorder.changed.items())}, "weights": weights,
              "logged_skips": float(trainer.callback_metrics["train/nonfinite_skips"])}
    (args.out / f"result_rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
