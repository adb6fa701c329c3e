"""A tiny demo run directory and fast runs of the real ``fit`` command on it.

The layout is the one ``configs/demo/*.yaml`` expect under ``${LATENT_MCA_RUN_DIR}``::

    <run>/world          synthetic world shards (paired, text_only, dialogue) + corpus.txt
    <run>/backbone       the tiny Qwen2.5-VL (random weights, locally trained tokenizer)
    <run>/sft/export     the base VLM of every later phase (an untrained copy, or written by the SFT phase)
    <run>/<phase>/export what each phase writes (``<phase>`` = ``LATENT_MCA_PHASE``)
    <run>/logs/<phase>/version_*   TensorBoard event files
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from latent_mca.models.tiny import TinyBackboneSpec, build_tiny_backbone
from latent_mca.rl.rewards.base import RewardFunction, RewardInput
from latent_mca.world import WorldSpec, generate_world

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIGS = REPO / "configs" / "demo"

#: Small enough to generate in well under a second; 10 paired shards so the demo configs' train
#: (shards 0-6) and validation (shard 7) patterns both resolve.
WORLD = WorldSpec(num_paired=160, num_text_only=160, num_dialogue_train=48, num_test_id=8, num_test_ood=8,
                  samples_per_shard=16, image_size=56, num_characters=6)

#: The world's image size must match the processor's (56 px: 4 merged image tokens).
BACKBONE = TinyBackboneSpec(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, vision_depth=1, vision_hidden_size=32, image_size=56)

#: Latent-module sizes small enough for a CPU test (the paper: 128 codes, 4/8 layers).
NUM_CODES = 16

#: Per demo config: overrides that make one run take seconds (``{n}`` = the number of steps).
FAST: dict[str, list[str]] = {
    "sft": ["--data.init_args.batch_size=8",
            "--model.init_args.lr_scheduler.init_args.max_steps={n}",
            "--model.init_args.lr_scheduler.init_args.warmup_steps=2"],
    "projector": ["--data.init_args.batch_size=4", "--model.init_args.lr_scheduler.init_args.max_steps={n}"],
    "inverse_dynamics": ["--data.init_args.paired_batch_size=4", "--data.init_args.text_batch_size=4",
                         f"--model.init_args.num_codes={NUM_CODES}", "--model.init_args.inverse_layers=1",
                         "--model.init_args.inverse_heads=2",
                         "--model.init_args.lr_scheduler.init_args.max_steps={n}"],
    "bc": ["--data.init_args.paired_batch_size=4", "--data.init_args.text_batch_size=4",
           "--model.init_args.policy_layers=1", "--model.init_args.policy_heads=2",
           "--model.init_args.lr_scheduler.init_args.max_steps={n}"],
    "latent_rl": ["--data.init_args.batch_size=2", "--model.init_args.rl.num_generations=2",
                  "--model.init_args.rl.max_new_tokens=6"],
    "token_rl": ["--data.init_args.batch_size=2", "--model.init_args.rl.num_generations=2",
                 "--model.init_args.rl.max_new_tokens=6"],
}
#: Phases whose demo config validates (one batch, once, at the last step).
VALIDATED = ("sft", "projector", "inverse_dynamics", "bc")


def build_demo_run(run_dir: str | Path, seed: int = 0, world: WorldSpec = WORLD,
                   backbone: TinyBackboneSpec = BACKBONE, copy_sft: bool = True) -> Path:
    """Generate the world and the tiny backbone under ``run_dir``.

    Args:
        run_dir: The run directory (created).
        seed: Seed of the world and of the backbone's initialisation.
        world: World sizes (``image_size`` must equal ``backbone.image_size``).
        backbone: Tiny backbone sizes.
        copy_sft: Also copy the untrained backbone to ``<run>/sft/export`` (enough for stage-1 and RL tests);
            False leaves that to a real SFT run.

    Returns:
        The run directory.
    """
    if world.image_size != backbone.image_size:
        raise ValueError(f"world image_size {world.image_size} != backbone image_size {backbone.image_size}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    generate_world(run / "world", world, seed)
    corpus = (run / "world" / "corpus.txt").read_text(encoding="utf-8").splitlines()
    build_tiny_backbone(run / "backbone", corpus, backbone, seed)
    if copy_sft:
        shutil.copytree(run / "backbone", run / "sft" / "export", dirs_exist_ok=True)
    return run


def demo_config(name: str) -> str:
    """Absolute path of ``configs/demo/<name>.yaml``."""
    path = DEMO_CONFIGS / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(path)
    return str(path)


def fast_overrides(config: str | Path, steps: int) -> list[str]:
    """The overrides that make a demo config run ``steps`` quick optimiser steps in-process."""
    stem = Path(config).stem
    args = [a.format(n=steps) for a in FAST[stem]]
    args += ["--data.init_args.num_workers=0", f"--trainer.max_steps={steps}", "--trainer.log_every_n_steps=1",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
    if stem in VALIDATED:
        args += [f"--trainer.val_check_interval={steps}", "--trainer.limit_val_batches=1"]
    return args


def fit_phase(run_dir: str | Path, phase_name: str, config: str | Path, overrides: Sequence[str] = (),
              monkeypatch: pytest.MonkeyPatch | None = None, steps: int = 4) -> Any:
    """Run ``python -m latent_mca fit --config <config>`` in-process with fast overrides.

    Args:
        run_dir: The run directory (``LATENT_MCA_RUN_DIR``).
        phase_name: Where this run's outputs go (``LATENT_MCA_PHASE``): export, checkpoints, logger name.
        config: A demo config path (its stem picks the fast overrides, see :data:`FAST`).
        overrides: Extra command-line overrides, applied last.
        monkeypatch: Sets the environment variables (a fresh context, undone on return, when None).
        steps: Optimiser steps.

    Returns:
        The LightningCLI object (``.trainer``, ``.model``, ``.datamodule``).
    """
    from latent_mca.cli import main

    args = ["fit", "--config", str(config), *fast_overrides(config, steps), *overrides]
    if monkeypatch is None:
        with pytest.MonkeyPatch.context() as mp:
            return fit_phase(run_dir, phase_name, config, overrides, mp, steps)
    monkeypatch.setenv("LATENT_MCA_RUN_DIR", str(run_dir))
    monkeypatch.setenv("LATENT_MCA_PHASE", phase_name)
    return main(args)


def log_dir(run_dir: str | Path, phase_name: str) -> Path:
    """The newest ``<run>/logs/<phase>/version_*`` directory."""
    versions = sorted((Path(run_dir) / "logs" / phase_name).glob("version_*"),
                      key=lambda p: int(p.name.split("_")[-1]))
    if not versions:
        raise FileNotFoundError(f"no TensorBoard logs under {Path(run_dir) / 'logs' / phase_name}")
    return versions[-1]


def read_scalars(run_dir: str | Path, phase_name: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a phase logged to TensorBoard: tag -> [(step, value), ...] in step order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir(run_dir, phase_name)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def head_tail_means(values: Sequence[float], k: int = 3) -> tuple[float, float]:
    """Mean of the first ``k`` and of the last ``k`` values."""
    if len(values) < 2 * k:
        raise ValueError(f"need at least {2 * k} values, got {len(values)}")
    return sum(values[:k]) / k, sum(values[-k:]) / k


def adamw(lr: float = 1e-3) -> Any:
    """An optimiser factory without weight decay, so a parameter moves only if it received a gradient."""
    return lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


class AlternatingReward(RewardFunction):
    """1, 0, 1, 0, ... by position in the batch: every group of an even size gets non-zero advantages.

    The RL update is a no-op when all completions of a group score the same; tests of what an update
    changes need a reward that never ties within a group, whatever the (random) completions say.
    """

    name = "alternating"

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Score by position only."""
        return [float(i % 2 == 0) for i in range(len(inputs))]


class OneGroupTies(RewardFunction):
    """Alternating rewards, except that one group per call ties (group 0, then 1, then 0, ...).

    Every call has exactly one uninformative group, so DAPO's dynamic sampling keeps half the groups of each
    batch and needs two batches of two prompts to fill one update.
    """

    name = "one_group_ties"

    def __init__(self, group_size: int) -> None:
        self.group_size = group_size
        self.calls = 0

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        """Score by position and call count only."""
        tie, self.calls = self.calls % 2, self.calls + 1
        out = []
        for i in range(len(inputs)):
            group, j = divmod(i, self.group_size)
            out.append(0.5 if group == tie else float(j % 2 == 0))
        return out


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every named parameter (shared tensors listed once)."""
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> dict[str, bool]:
    """Parameter name -> whether its value differs from ``before`` (bitwise)."""
    now = dict(module.named_parameters())
    return {name: not torch.equal(old, now[name].detach()) for name, old in before.items()}


def first_batch(datamodule: Any) -> Any:
    """The first training batch of a streaming data module on one rank, without a trainer."""
    datamodule.setup("fit")
    return next(iter(datamodule.make_loader("train", 0, 1)))


def tiny_trainer(root: str | Path, steps: int) -> Any:
    """A bare CPU trainer: ``steps`` optimiser steps, no logger, checkpoints, validation or progress bar."""
    import lightning as L

    return L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, default_root_dir=str(root))


def mixed_data(run_dir: str | Path, processor: str | Path | None = None, text: bool = True,
               batch_size: int = 2) -> Any:
    """The demo's mixed (paired + text-only) training data, encoded by ``processor`` (default ``sft/export``)."""
    from data_modules import MixedDataModule

    run = Path(run_dir)
    return MixedDataModule(processor=str(processor or run / "sft" / "export"),
                           paired_train=str(run / "world" / "paired" / "train-{000000..000006}.tar"),
                           text_train=str(run / "world" / "text_only") if text else None,
                           paired_batch_size=batch_size, text_batch_size=batch_size, num_workers=0)


def dialogue_data(run_dir: str | Path, batch_size: int = 2) -> Any:
    """The demo's RL prompts (dialogue train split), encoded by ``sft/export``'s processor."""
    from data_modules import DialogueDataModule

    run = Path(run_dir)
    return DialogueDataModule(processor=str(run / "sft" / "export"),
                              train=str(run / "world" / "dialogue" / "train-*.tar"), batch_size=batch_size,
                              with_reference=False, num_workers=0)


def paired_data(run_dir: str | Path, batch_size: int = 2) -> Any:
    """The demo's paired image-text training data, encoded by ``sft/export``'s processor."""
    from data_modules import PairedImageTextDataModule

    run = Path(run_dir)
    return PairedImageTextDataModule(processor=str(run / "sft" / "export"),
                                     train=str(run / "world" / "paired" / "train-{000000..000006}.tar"),
                                     batch_size=batch_size, num_workers=0)


def optimizer_of(module: Any) -> torch.optim.Optimizer:
    """The optimiser a phase configures for itself (scheduler dropped)."""
    opt = module.configure_optimizers()
    return opt["optimizer"] if isinstance(opt, dict) else opt


def step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    """One optimiser step on ``loss``."""
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def backbone_untouched(module: Any, before: dict[str, torch.Tensor]) -> None:
    """Assert the frozen backbone has no trainable weight, no gradient, and is bit-identical to ``before``.

    ``before`` is a :func:`snapshot` of the whole phase module; the output head and the final norm are
    checked by name as well, since a tied head is listed only once among the parameters.
    """
    backbone = module.backbone
    params = dict(module.named_parameters())
    names = [n for n in before if n.startswith("backbone.")]
    assert names, "the snapshot holds no backbone weight"
    assert not any(params[n].requires_grad or params[n].grad is not None for n in names)
    assert not any(changed(before, module)[n] for n in names)
    assert not backbone.lm_head.weight.requires_grad and not backbone.text_model.norm.weight.requires_grad
    norm = "backbone." + next(n for n, p in backbone.named_parameters() if p is backbone.text_model.norm.weight)
    assert norm in names
