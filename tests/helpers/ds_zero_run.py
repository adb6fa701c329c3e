"""Script: real DeepSpeed ZeRO training on 2 CPU processes (gloo), checkpoint, resume, convert, load.

Run as ``python tests/helpers/ds_zero_run.py --stage 2 --out DIR`` with the repository root on
``PYTHONPATH``. Lightning's launcher re-executes this file for rank 1, so everything sits under
``if __name__ == "__main__"``. Each rank writes ``DIR/result_rank{r}.json``; the test asserts on them.

Steps: fit 4 steps with a NaN loss on rank 0 at step 2 (DeepSpeed must skip that step on both ranks and
:class:`~latent_mca.callbacks.NonFiniteGuard` must count it); save a ZeRO checkpoint (collective); resume
it for 2 more steps; on rank 0 convert it into one file and load that with ``load_from_checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import lightning as L
import torch

from latent_mca.callbacks import NonFiniteGuard
from tests.helpers.ds_cpu_strategy import CPUDeepSpeedStrategy
from tests.helpers.ds_toys import ToyBatches, ToyPhase, UpdateRecorder, trainable_state

NAN_STEP = 2


def make_trainer(stage: int, offload: bool, out: Path, max_steps: int, callbacks: list) -> L.Trainer:
    """A 2-process CPU trainer with the test-only DeepSpeed strategy."""
    strategy = CPUDeepSpeedStrategy(stage=stage, offload_optimizer=offload, logging_batch_size_per_gpu=4,
                                    exclude_frozen_parameters=True, process_group_backend="gloo")
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, callbacks=callbacks,
                     logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=str(out))


def optimizer_factory(offload: bool):
    """Plain AdamW, or DeepSpeedCPUAdam when the optimiser state is offloaded (DeepSpeed requires it)."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return lambda params: DeepSpeedCPUAdam(params, lr=0.01)
    return lambda params: torch.optim.AdamW(params, lr=0.01)


def run(stage: int, offload: bool, out: Path) -> dict:
    """Train, save, resume, convert and load; return what this rank observed."""
    L.seed_everything(0)
    guard, recorder = NonFiniteGuard(max_consecutive=1), UpdateRecorder()
    model = ToyPhase(optimizer=optimizer_factory(offload), nan_loss_steps=[NAN_STEP], loss_rank=0)
    trainer = make_trainer(stage, offload, out, 4, [guard, recorder])
    trainer.fit(model, datamodule=ToyBatches())
    ckpt = out / "zero.ckpt"
    trainer.save_checkpoint(ckpt)  # collective: every rank writes its shard
    saved = trainable_state(model)  # collective under ZeRO-3
    rank = trainer.global_rank
    result = {"stage": stage, "offload": offload, "rank": rank, "world_size": trainer.world_size,
              "changed": {str(k): v for k, v in sorted(recorder.changed.items())},
              "skips": guard.total, "skipped_steps": guard.skipped_steps,
              "logged_skips": float(trainer.callback_metrics["train/nonfinite_skips"]),
              "micro_batch": trainer.strategy.config["train_micro_batch_size_per_gpu"],
              "zero_stage": trainer.strategy.config["zero_optimization"]["stage"]}

    guard2, recorder2 = NonFiniteGuard(max_consecutive=1), UpdateRecorder()
    resumed = ToyPhase(optimizer=optimizer_factory(offload))
    trainer2 = make_trainer(stage, offload, out, 6, [guard2, recorder2])
    trainer2.fit(resumed, datamodule=ToyBatches(), ckpt_path=str(ckpt))
    start_diff = max(float((recorder2.first[n] - v).abs().max()) for n, v in saved.items())
    result.update(resumed_global_step=trainer2.global_step, resumed_skips=guard2.total,
                  resumed_steps=sorted(recorder2.changed), resume_start_diff=start_diff)

    if rank == 0:
        result.update(convert_and_load(ckpt, out / "model_fp32.ckpt", saved))
    return result


def convert_and_load(ckpt: Path, single: Path, saved: dict) -> dict:
    """Convert the ZeRO directory into one file, load it, compare with the weights at save time."""
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    convert_zero_checkpoint_to_fp32_state_dict(str(ckpt), str(single))
    state = torch.load(single, map_location="cpu", weights_only=False)
    loaded = ToyPhase.load_from_checkpoint(str(single))
    missing = loaded.load_state_dict(state["state_dict"], strict=False).missing_keys
    weights = dict(loaded.named_parameters())
    diff = max(float((weights[n].detach() - v).abs().max()) for n, v in saved.items())
    return {"ckpt_is_dir": ckpt.is_dir(), "ckpt_files": sorted(p.name for p in ckpt.rglob("*") if p.is_file()),
            "fp32_keys": sorted(state["state_dict"]), "fp32_global_step": state["global_step"],
            "missing_after_load": sorted(missing), "max_abs_diff": diff}


def main() -> None:
    """Parse the arguments, run, write this rank's result."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--stage", type=int, choices=(2, 3), required=True)
    parser.add_argument("--offload", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run(args.stage, args.offload, args.out)
    rank = result["rank"]
    (args.out / f"result_rank{rank}.json").write_text(json.dumps(result, indent=1))
    print(f"rank {rank} (pid {os.getpid()}) done")


if __name__ == "__main__":
    main()
