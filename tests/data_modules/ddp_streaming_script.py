"""Two-process DDP (gloo, CPU) run of the toy streaming data module; each rank writes what it saw.

Usage: ``python ddp_streaming_script.py SHARD_DIR OUT_DIR`` (launched by test_webdataset_base.py).
"""

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from lightning.pytorch import Trainer

    from data_modules import ShardSource, SkipCountLogger
    from tests.data_modules.shard_fixtures import IMAGE_SIZE
    from tests.data_modules.test_webdataset_base import ToyData, ToyModule

    shards, out = sys.argv[1], Path(sys.argv[2])
    dm = ToyData(train={"a": ShardSource(shards, batch_size=3)}, num_workers=2, shuffle_buffer=4)
    model = ToyModule()
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SkipCountLogger(sync_every=2)])
    trainer.fit(model, datamodule=dm)
    out.mkdir(parents=True, exist_ok=True)
    record = {"batches": [{"epoch": e, "keys": k} for e, k in zip(model.epochs, model.seen)],
              "global_step": trainer.global_step, "expected": 2 * len(trainer.train_dataloader),
              "image_size": IMAGE_SIZE, "skip_counts": dm.skip_counts,
              "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("data/")}}
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
