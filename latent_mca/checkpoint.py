"""One checkpoint API for handing off between phases.

A phase export is a directory::

    phase.json              # phase name, backbone reference, module configs, metrics, lineage
    <module>.safetensors    # one file per latent module (projector, inverse, codebook, world_model, policy)

The backbone is never copied: ``phase.json`` references it (path plus a fingerprint of its config), and
the next phase refuses an export made on an incompatible backbone or with a different codebook size. A
phase that trains the backbone (SFT, token RL) saves a full Hugging Face checkpoint with
``Backbone.save_pretrained`` instead, which the next phase loads as its ``backbone.path``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor, nn

PHASE_FILE = "phase.json"
FORMAT_VERSION = 1


class IncompatibleCheckpointError(ValueError):
    """An export does not fit the model it is loaded into (backbone or codebook size differ)."""


@dataclass
class BackboneRef:
    """What a phase export records about the backbone it was trained on.

    Attributes:
        path: The backbone's ``from_pretrained`` path or hub id.
        model_type: transformers ``model_type``.
        hidden_size: Width of the hidden states.
        vocab_size: Rows of ``lm_head``.
        fingerprint: SHA-256 of the model config (architecture-level identity).
    """

    path: str
    model_type: str
    hidden_size: int
    vocab_size: int
    fingerprint: str

    @classmethod
    def of(cls, backbone: Any) -> BackboneRef:
        """Describe a :class:`~latent_mca.models.backbone.Backbone`."""
        cfg = backbone.model_config
        blob = json.dumps(cfg.to_diff_dict() if hasattr(cfg, "to_diff_dict") else str(cfg), sort_keys=True,
                          default=str)
        return cls(
            path=str(backbone.config.path),
            model_type=str(getattr(cfg, "model_type", "unknown")),
            hidden_size=int(backbone.hidden_size),
            vocab_size=int(backbone.vocab_size),
            fingerprint=hashlib.sha256(blob.encode()).hexdigest()[:16],
        )


@dataclass
class PhaseExport:
    """A loaded phase export.

    Attributes:
        directory: Where it was read from.
        phase: Name of the phase that wrote it.
        backbone: The backbone reference.
        configs: Module name -> config dict (rebuild with the module's config dataclass).
        metrics: Final metrics the phase recorded.
        lineage: Export directories of the earlier phases, oldest first.
        extra: Free-form metadata.
    """

    directory: Path
    phase: str
    backbone: BackboneRef
    configs: dict[str, dict[str, Any]]
    metrics: dict[str, float] = field(default_factory=dict)
    lineage: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def has(self, name: str) -> bool:
        """Whether the export holds module ``name``."""
        return name in self.configs

    def state_dict(self, name: str) -> dict[str, Tensor]:
        """Load one module's weights."""
        from safetensors.torch import load_file

        if not self.has(name):
            raise KeyError(f"{self.directory} holds no module {name!r} (it has {sorted(self.configs)})")
        return load_file(str(self.directory / f"{name}.safetensors"))

    def build(self, name: str, config_cls: type, module_cls: type) -> nn.Module:
        """Rebuild a module from its saved config and load its weights.

        Args:
            name: Module name in the export.
            config_cls: The module's config dataclass.
            module_cls: The module class, called with the config.

        Returns:
            The module with its weights loaded (strictly).
        """
        config = config_cls(**self.configs[name])
        module = module_cls(config)
        module.load_state_dict(self.state_dict(name), strict=True)
        return module

    def check_backbone(self, backbone: Any) -> None:
        """Refuse an export made on a backbone of another architecture.

        Raises:
            IncompatibleCheckpointError: If model type, hidden size or vocabulary size differ.
        """
        mine = BackboneRef.of(backbone)
        theirs = self.backbone
        for attr in ("model_type", "hidden_size", "vocab_size"):
            if getattr(mine, attr) != getattr(theirs, attr):
                raise IncompatibleCheckpointError(
                    f"{self.directory} was trained on backbone {theirs.path!r} ({attr}={getattr(theirs, attr)}), "
                    f"but the configured backbone {mine.path!r} has {attr}={getattr(mine, attr)}"
                )

    def check_codes(self, num_codes: int, name: str = "codebook") -> None:
        """Refuse an export whose codebook size differs from ``num_codes``.

        Raises:
            IncompatibleCheckpointError: On a different number of codes.
        """
        saved = self.configs.get(name, {}).get("num_codes")
        if saved is not None and int(saved) != int(num_codes):
            raise IncompatibleCheckpointError(
                f"{self.directory} has a codebook of {saved} codes but this phase is configured for "
                f"num_codes={num_codes}; use the same codebook size as the phase that built it"
            )


def _config_dict(config: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(config):
        return dataclasses.asdict(config)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"module configs must be dataclasses or dicts, got {type(config).__name__}")


def save_phase(out_dir: str | Path, phase: str, modules: dict[str, tuple[nn.Module, Any]], backbone: Any,
               metrics: dict[str, float] | None = None, parent: PhaseExport | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Write a phase export.

    Args:
        out_dir: Export directory (created; existing module files are overwritten).
        phase: Name of the phase.
        modules: Module name -> (module, its config dataclass).
        backbone: The backbone the modules were trained on (referenced, never copied).
        metrics: Final metrics to record.
        parent: The export this phase started from (its lineage is extended).
        extra: Free-form metadata (JSON-serialisable).

    Returns:
        The export directory.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name, (module, config) in modules.items():
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(out / f"{name}.safetensors"))
        configs[name] = _config_dict(config)
    lineage = (parent.lineage + [str(parent.directory)]) if parent is not None else []
    meta = {
        "format_version": FORMAT_VERSION,
        "phase": phase,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "backbone": dataclasses.asdict(BackboneRef.of(backbone)),
        "modules": configs,
        "metrics": {k: float(v) for k, v in (metrics or {}).items()},
        "lineage": lineage,
        "extra": extra or {},
    }
    tmp = out / (PHASE_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    tmp.replace(out / PHASE_FILE)  # phase.json appears last and atomically: its presence means "complete"
    return out


def load_phase(path: str | Path) -> PhaseExport:
    """Read a phase export written by :func:`save_phase`.

    Raises:
        FileNotFoundError: If ``path`` holds no ``phase.json``.
        IncompatibleCheckpointError: On an unknown format version or a missing module file.
    """
    directory = Path(path)
    meta_path = directory / PHASE_FILE
    if not meta_path.exists():
        raise FileNotFoundError(f"init_from={str(path)!r} is not a phase export: {meta_path} does not exist")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise IncompatibleCheckpointError(
            f"{meta_path} has format_version={meta.get('format_version')}, expected {FORMAT_VERSION}")
    for name in meta["modules"]:
        if not (directory / f"{name}.safetensors").exists():
            raise IncompatibleCheckpointError(f"{directory} lists module {name!r} but {name}.safetensors is missing")
    return PhaseExport(
        directory=directory,
        phase=meta["phase"],
        backbone=BackboneRef(**meta["backbone"]),
        configs=meta["modules"],
        metrics=meta.get("metrics", {}),
        lineage=meta.get("lineage", []),
        extra=meta.get("extra", {}),
    )


DONE_FILE = "export_complete.json"


def mark_complete(path: str | Path, phase: str, global_step: int, metrics: dict[str, float] | None = None) -> None:
    """Write the marker that says an export (latent modules or a Hugging Face checkpoint) is complete."""
    info = {"phase": phase, "global_step": int(global_step), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "metrics": {k: float(v) for k, v in (metrics or {}).items()}}
    tmp = Path(path) / (DONE_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True))
    tmp.replace(Path(path) / DONE_FILE)


def is_complete(path: str | Path) -> bool:
    """Whether ``path`` holds a finished export (the pipeline skips phases whose export is complete)."""
    return (Path(path) / DONE_FILE).exists()


def completion_info(path: str | Path) -> dict[str, Any]:
    """The contents of a finished export's marker (phase, step, final metrics)."""
    return json.loads((Path(path) / DONE_FILE).read_text())
