"""The data-loading benchmark: can one loader worker feed the stage-1 training steps?

Two records, one per data module of stage 1, each read from webdataset shards of a synthetic world generated
(once, cached) beside the bench's backbone:

* ``loader-paired``: :class:`~data_modules.PairedImageTextDataModule` (``2 x batch_size`` paired samples per
  batch, the projector demo's 16) against one :class:`~latent_mca.phases.projector.ProjectorModule` step;
* ``loader-mixed``: :class:`~data_modules.MixedDataModule` (``batch_size`` paired + ``batch_size`` text-only,
  the inverse-dynamics demo's 8 + 8) against one
  :class:`~latent_mca.phases.inverse_dynamics.InverseDynamicsModule` step.

*Ours* is producing one batch the way one loader worker does: ``num_workers=0`` runs the very worker pipeline
(tar reading, shuffle buffer, image and JSON decoding, the processor, collation) in this process, on one
intra-op thread like a worker. The *baseline* is one training step (losses, backward, AdamW) on such a batch.
The time ratio is the number of workers needed to keep up with the trainer; the demo configs use one, so
the target is ``<= 1``. Loader workers need cores of their own: on a machine with fewer free cores than
workers + 1, loading and training slow each other down whatever this ratio says.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from latent_mca.bench.common import BenchContext, Target
from latent_mca.models import BackboneConfig

#: One worker (the demo configs' ``num_workers``) should produce a batch no slower than a step consumes one.
LOADER_TARGET = Target(op="<=", value=1.0)
LR = 1e-6


def bench_world(ctx: BenchContext) -> Path:
    """A small synthetic world beside the bench's backbone (same seed: its tokenizer knows every text), reused."""
    from latent_mca.world import WorldSpec, generate_world

    b = ctx.sizes.batch_size
    spec = WorldSpec(num_paired=max(64, 16 * b), num_text_only=max(64, 16 * b), num_dialogue_train=8,
                     num_test_id=4, num_test_ood=4, samples_per_shard=max(16, 4 * b),
                     image_size=ctx.sizes.backbone.image_size)
    out = ctx.path.parent / f"world-{ctx.size}"
    meta = out / "world.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("seed") == ctx.seed and saved.get("spec") == dataclasses.asdict(spec):
            return out
    generate_world(out, spec, seed=ctx.seed, overwrite=True)
    return out


def _endless(module: Any) -> Iterator[Any]:
    """Batches of the module's train loader (rank 0 of 1), epoch after epoch."""
    module.setup("fit")
    while True:
        yield from module.make_loader("train", 0, 1)


def _train_step(module: Any, losses: Any, batch: Any) -> Any:
    """One optimisation step of a phase module (no trainer: the losses its ``training_step`` logs)."""
    module.configure_model()
    module.train()
    optimizer = module.configure_optimizers()

    def step() -> None:
        out = losses(batch)
        loss = (out[0] if isinstance(out, tuple) else out)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def _record(ctx: BenchContext, name: str, data: Any, rows: int, step: Any, labels: dict[str, str],
            world: Path) -> dict[str, Any]:
    batches = _endless(data)

    def ours() -> None:
        next(batches)

    result = ctx.measure(
        name, f"one loader worker vs one training step ({rows} samples per batch)", ours, step, labels,
        tokens=rows, target=LOADER_TARGET, sizes={"samples_per_batch": rows, "world": str(world)},
        notes=["time ratio = loader workers needed to keep up with the training step (the demo configs use 1)",
               "tokens_per_s columns are samples/s here: ours = one worker's production, baseline = consumption",
               "ours runs the worker pipeline in-process (num_workers=0) on one intra-op thread"])
    result["data_is_bottleneck_with_one_worker"] = not result["passed"]
    return result


def bench_loader(ctx: BenchContext) -> list[dict[str, Any]]:
    """Samples/s of the paired and mixed data modules per worker vs the consumption of their demo phases.

    Args:
        ctx: Sizes, backbone and measurement settings.

    Returns:
        Two result records, ``loader-paired`` and ``loader-mixed``.
    """
    from data_modules import MixedDataModule, PairedImageTextDataModule
    from latent_mca.phases.inverse_dynamics import InverseDynamicsModule
    from latent_mca.phases.projector import ProjectorModule

    world, b, sizes = bench_world(ctx), ctx.sizes.batch_size, ctx.sizes
    optimizer = functools.partial(torch.optim.AdamW, lr=LR)
    backbone = BackboneConfig(path=str(ctx.path))
    paired = PairedImageTextDataModule(str(ctx.path), train=str(world / "paired"), batch_size=2 * b, num_workers=0,
                                       seed=ctx.seed)
    projector = ProjectorModule(backbone, optimizer=optimizer)
    first = next(_endless(paired))
    records = [_record(ctx, "loader-paired", paired, 2 * b, _train_step(projector, projector.losses, first),
                       {"ours": "PairedImageTextDataModule: decode + processor + collate, one worker",
                        "baseline": "ProjectorModule step: frozen backbone (2 views) + NLL + backward + AdamW"},
                       world)]
    mixed = MixedDataModule(str(ctx.path), paired_train=str(world / "paired"), text_train=str(world / "text_only"),
                            paired_batch_size=b, text_batch_size=b, num_workers=0, seed=ctx.seed)
    inverse = InverseDynamicsModule(BackboneConfig(path=str(ctx.path)), num_codes=sizes.num_codes,
                                    inverse_layers=sizes.inverse_layers, inverse_heads=sizes.inverse_heads,
                                    merge_blocks=sizes.merge_blocks, optimizer=optimizer)
    first = next(_endless(mixed))
    records.append(_record(ctx, "loader-mixed", mixed, 2 * b, _train_step(inverse, inverse.losses, first),
                           {"ours": "MixedDataModule: decode + processor + collate, one worker",
                            "baseline": "InverseDynamicsModule step (paired + text-only) + backward + AdamW"},
                           world))
    return records
