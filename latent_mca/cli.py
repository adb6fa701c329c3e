"""The command line: ``python -m latent_mca <command> ...``.

Training commands (``fit``, ``validate``, ``test``, ``predict``) go through :class:`LatentMCACLI`, a
``LightningCLI`` in subclass mode for model and data: a YAML picks a LightningModule and a
LightningDataModule by ``class_path`` and maps ``init_args`` 1:1 onto their typed ``__init__`` signatures.
``--config`` may be repeated (later files override earlier ones) and values may use omegaconf
interpolation (``${model.init_args.backbone.path}``), resolved after all sources are merged.

Every other command is a plain function with a typed, documented signature, registered in
:data:`COMMANDS` and parsed by jsonargparse, so ``python -m latent_mca <command> --help`` explains each
argument from the docstring. This module is the only glue between configuration and code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

#: Extra commands: name -> ("module:function", one-line help). Imported lazily so ``--help`` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-backbone": ("latent_mca.models.tiny_cli:tiny_backbone", "build the embedded tiny Qwen2.5-VL backbone"),
    "synth": ("latent_mca.world.cli:synth", "generate the synthetic multimodal role-play world as shards"),
    "shards": ("latent_mca.importers.cli:shards", "import a dataset (authors' format, MMRole, PCogAlignBench)"),
    "pack-text": ("latent_mca.importers.pack:pack_text", "tokenise and pack text-only corpora into token blocks"),
    "pipeline": ("latent_mca.pipeline:pipeline", "run the whole method end to end (the main job)"),
    "evaluate": ("latent_mca.eval.evaluate:evaluate", "judge-score ratio and diversity of an agent on test splits"),
    "results": ("latent_mca.eval.results:results", "the paper's table on the embedded world over several seeds"),
    "inspect-codebook": ("latent_mca.eval.codebook_report:inspect_codebook", "make the latent codes readable"),
    "bench": ("latent_mca.bench:bench", "benchmarks, measured as ratios against a baseline"),
}

#: Lightning's subcommands, with their help.
TRAINER_COMMANDS = {
    "fit": "train a phase (LightningModule + LightningDataModule from --config)",
    "validate": "run one validation epoch",
    "test": "run one test epoch",
    "predict": "run prediction",
}


def _lightning_cli_class() -> type:
    """Build the LightningCLI subclass (imports Lightning only when a trainer command runs)."""
    from lightning.pytorch.cli import LightningCLI

    class LatentMCACLI(LightningCLI):
        """LightningCLI with subclass mode, omegaconf interpolation and TensorBoard by default."""

        def add_arguments_to_parser(self, parser: Any) -> None:
            from latent_mca.callbacks import NonFiniteGuard, RNGStateCheckpoint

            # Always on: a NaN/inf loss or gradient skips the step (counted), and too many stop the run.
            parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
            # Always on: checkpoints carry the RNG states, so a resumed run reaches the same weights.
            parser.add_lightning_class_args(RNGStateCheckpoint, "rng_state")

    return LatentMCACLI


def trainer_defaults() -> dict[str, Any]:
    """Defaults every trainer command starts from: TensorBoard logs under ``runs/``, a progress bar."""
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": "runs", "name": "latent_mca"},
        },
    }


def lightning_main(args: Sequence[str] | None = None, run: bool = True) -> Any:
    """Run (or only build, with ``run=False``) the LightningCLI for a trainer command.

    Args:
        args: Command-line arguments (the subcommand first when ``run`` is True).
        run: Execute the subcommand; False parses and instantiates only (used by tests).

    Returns:
        The LightningCLI instance.
    """
    import warnings

    import jsonargparse
    from lightning.pytorch import LightningDataModule, LightningModule

    jsonargparse.set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cls = _lightning_cli_class()
    # sys.argv must stay intact (Lightning's DDP launcher re-executes it in the child processes), so
    # LightningCLI's warning about receiving both `args` and a non-empty sys.argv is expected here.
    warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended to run from within")
    # Frozen modules (backbone, world model, ...) are in eval mode on purpose; phases keep them there.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    # RL phases optimise manually; their checkpoints are meant to hold the state after each update.
    warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")
    # Raised inside Lightning 2.6's pytree helper with torch >= 2.10; nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    return cls(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        trainer_defaults=trainer_defaults(),
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf+"},
        args=list(args) if args is not None else None,
        run=run,
    )


def resolve_command(name: str) -> Callable[..., Any]:
    """Import the function behind an extra command."""
    target, _ = COMMANDS[name]
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def run_command(name: str, args: Sequence[str]) -> Any:
    """Parse ``args`` against the command function's signature (help from its docstring) and call it."""
    from jsonargparse import auto_cli

    func = resolve_command(name)
    args = list(args)
    if name == "bench" and args and not args[0].startswith("-"):
        args = ["--name", args[0], *args[1:]]  # `bench decode` reads better than `bench --name decode`
    return auto_cli(func, args=list(args), as_positional=False, parser_mode="omegaconf",
                    prog=f"python -m latent_mca {name}")


def usage() -> str:
    """The top-level help text listing every command."""
    lines = ["usage: python -m latent_mca <command> [--config FILE ...] [options]", "", "training commands:"]
    lines += [f"  {name:<18} {text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "other commands:"]
    lines += [f"  {name:<18} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `python -m latent_mca <command> --help` for the arguments of a command."]
    return "\n".join(lines)


def main(args: Sequence[str] | None = None) -> Any:
    """Entry point of ``python -m latent_mca`` and the ``latent-mca`` console script."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    command = argv[0]
    if command in COMMANDS:
        return run_command(command, argv[1:])
    if command in TRAINER_COMMANDS:
        return lightning_main(argv)
    print(f"unknown command {command!r}\n\n{usage()}", file=sys.stderr)
    raise SystemExit(2)
