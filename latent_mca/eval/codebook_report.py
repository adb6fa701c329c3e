"""``python -m latent_mca inspect-codebook``: make the latent codes readable.

The paper lists the latent actions' lack of interpretability as a limitation. This report reads a trained
codebook back through the frozen backbone and the world model on real conversations:

- **usage**: the inverse model's code (argmax) at every scored position (assistant tokens with a next token),
  as counts, shares, perplexity and the number of codes in use;
- **what each code does**: at a sample of real contexts (``max_contexts`` of the scored positions, evenly
  spaced), code ``k`` is forced at every context and the world model's argmax token recorded; the
  distribution of those tokens, and how often it equals the base model's token, describe the code;
- **examples**: for each code, the first positions where the inverse model chose it, as (the tail of the
  context -> the token the world model emits with that code, the base model's token, the real next token).

Image-segment tokens are never emitted, as in generation. Image-text samples are scored on their image-text
states ``e^{VT}``; text-only samples on ``P(e^T).mu`` when the export holds a projector and was trained with it
(``use_projector`` recorded in the export or its lineage), on the raw ``e^T`` otherwise, as in training.

A pipeline run directory is laid out as ``<run>/<phase>/export/phase.json`` (one export per phase) with the
synthetic world under ``<run>/world/``; given a run directory, the latest export that holds a codebook is
used, searching ``latent_rl``, then ``bc``, then ``inverse_dynamics``.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from latent_mca.batch import IGNORE_INDEX, ChatInputs, next_token_targets
from latent_mca.checkpoint import PHASE_FILE, PhaseExport, load_phase
from latent_mca.models import (
    Backbone, Codebook, CodebookConfig, CrossModalProjector, InverseDynamics, InverseDynamicsConfig,
    ProjectorConfig, WorldModel, WorldModelConfig, code_usage_stats,
)
from latent_mca.shards import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

#: Phases searched in a pipeline run directory, latest first.
RUN_PHASES: tuple[str, ...] = ("latent_rl", "bc", "inverse_dynamics")
#: Modules an export must hold to be inspected.
REQUIRED_MODULES: tuple[str, ...] = ("inverse", "codebook", "world_model")
TAIL_TOKENS = 10
TOP_TOKENS = 5
#: Largest number of logits computed at once when forcing codes (bounds memory at large vocabularies).
LOGIT_BUDGET = 1 << 24


def find_export(run: str | Path) -> Path:
    """The export to inspect: ``run`` itself if it holds ``phase.json``, else its latest export with a codebook.

    Raises:
        FileNotFoundError: If ``run`` is neither an export nor a run directory with a usable export.
    """
    run = Path(run)
    if (run / PHASE_FILE).exists():
        return run
    tried = [run / phase / "export" for phase in RUN_PHASES]
    for candidate in tried:
        if (candidate / PHASE_FILE).exists() and load_phase(candidate).has("codebook"):
            return candidate
    raise FileNotFoundError(f"{run} is neither a phase export (no {PHASE_FILE}) nor a pipeline run with an export "
                            f"holding a codebook; looked for {[str(p / PHASE_FILE) for p in tried]}")


def default_data(run: str | Path, export_dir: Path) -> Path:
    """``<run>/world/paired``, or the same folder of the run that holds ``export_dir``.

    Raises:
        FileNotFoundError: If neither exists (pass ``data`` explicitly).
    """
    candidates = [Path(run) / "world" / "paired"]
    if export_dir.name == "export":  # <run>/<phase>/export
        candidates.append(export_dir.parent.parent / "world" / "paired")
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no data given and no default data found at {[str(c) for c in candidates]}; "
                            f"pass --data DIR (a directory of webdataset shards)")


@dataclass
class Latent:
    """The frozen backbone and the latent modules of an export, in eval mode."""

    backbone: Backbone
    inverse: InverseDynamics
    codebook: Codebook
    world_model: WorldModel
    projector: CrossModalProjector | None

    def token_logits(self, states: Tensor, code_emb: Tensor) -> Tensor:
        """World-model next-token logits ``lm_head(e + Delta(e, c))`` ``(..., V)``, image tokens excluded."""
        return self.emittable(self.backbone.lm_head(self.world_model(states, code_emb)))

    def emittable(self, logits: Tensor) -> Tensor:
        """Logits with image-segment tokens set to ``-inf`` (they only come from the processor)."""
        ids = self.backbone.image_segment_token_ids
        if ids:
            logits = logits.clone()
            logits[..., ids] = float("-inf")
        return logits


def uses_projector(export: PhaseExport) -> bool:
    """Whether text-only states were ``P(e^T).mu`` in training (default True).

    Reads the ``use_projector`` flag of the export's ``extra``, or of the newest export in its lineage that
    records one.
    """
    for extra in [export.extra, *(_extra(Path(d)) for d in reversed(export.lineage))]:
        if "use_projector" in extra:
            return bool(extra["use_projector"])
    return True


def _extra(directory: Path) -> dict[str, Any]:
    try:
        return load_phase(directory).extra
    except (OSError, ValueError):  # a moved or deleted ancestor export: nothing recorded
        return {}


def load_latent(export: PhaseExport, device: torch.device) -> Latent:
    """Load the export's backbone (frozen) and modules.

    Raises:
        KeyError: If the export lacks a module the report needs.
    """
    missing = [name for name in REQUIRED_MODULES if not export.has(name)]
    if missing:
        raise KeyError(f"{export.directory} (phase {export.phase!r}) lacks modules {missing} needed to inspect the "
                       f"codebook; it holds {sorted(export.configs)}")
    backbone = Backbone.from_pretrained(export.backbone.path)
    export.check_backbone(backbone)
    export.check_codes(int(export.configs["inverse"]["num_codes"]))
    classes = {"inverse": (InverseDynamicsConfig, InverseDynamics), "codebook": (CodebookConfig, Codebook),
               "world_model": (WorldModelConfig, WorldModel), "projector": (ProjectorConfig, CrossModalProjector)}
    modules = {name: export.build(name, *cls) if export.has(name) else None for name, cls in classes.items()}
    if not uses_projector(export):
        modules["projector"] = None
    for module in (backbone, *modules.values()):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return Latent(backbone=backbone, **modules)


@dataclass
class Sample:
    """One decoded conversation: key, messages (ending with the reply) and its images."""

    key: str
    messages: list[dict[str, Any]]
    images: list[Any]


def _decode(raw: dict[str, Any]) -> Sample:
    """Turn a raw webdataset sample (bytes per extension) into a :class:`Sample` (``ValueError`` if unusable)."""
    from PIL import Image

    key = raw.get("__key__", "?")
    record = json.loads(raw["json"]) if "json" in raw else None
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError(f"sample {key!r}: json has no list of messages with roles")
    if messages and messages[-1]["role"] == "user" and record.get("reference"):
        messages = messages + [{"role": "assistant", "content": record["reference"]}]  # dialogue sample
    images = [Image.open(io.BytesIO(raw[ext])).convert("RGB") for ext in IMAGE_EXTENSIONS if ext in raw]
    return Sample(key=key, messages=messages, images=images)


def read_samples(data: str | Path, num_samples: int) -> tuple[list[Sample], Counter, list[str]]:
    """Read the first ``num_samples`` samples of the shards in ``data``, in order.

    Returns:
        The decoded samples, skip counts by reason, and the first few skip messages (naming the samples).

    Raises:
        FileNotFoundError: If ``data`` holds no ``.tar`` shards.
    """
    import webdataset as wds

    shards = sorted(str(p) for p in Path(data).glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no .tar shards in {data}")
    skipped: Counter = Counter()
    notes: list[str] = []

    def count(reason: str, exn: Exception) -> bool:
        skipped[reason] += 1
        if len(notes) < 10:
            notes.append(f"{reason}: {exn}")
        return True  # keep reading

    samples = []
    for raw in wds.WebDataset(shards, shardshuffle=False, handler=lambda e: count("unreadable", e), empty_check=False):
        if len(samples) + sum(skipped.values()) >= num_samples:
            break
        try:
            samples.append(_decode(raw))
        except (ValueError, OSError) as err:  # bad JSON, bad image bytes
            where = f"{raw.get('__url__', '?')}#{raw.get('__key__', '?')}"
            count("bad_record", ValueError(f"{where}: {type(err).__name__}: {err}"))
    return samples, skipped, notes


@dataclass
class Collected:
    """Per scored position (``M`` in data order): codes, tokens, model-input states and examples."""

    codes: list[Tensor] = field(default_factory=list)  # (M,) chosen code
    emitted: list[Tensor] = field(default_factory=list)  # (M,) world model's token with that code
    base: list[Tensor] = field(default_factory=list)  # (M,) base model's token
    target: list[Tensor] = field(default_factory=list)  # (M,) real next token
    states: list[Tensor] = field(default_factory=list)  # (M, d) states the world model reads
    examples: dict[int, list[dict[str, str]]] = field(default_factory=dict)

    def cat(self, name: str) -> Tensor:
        """Concatenate one per-position field over batches."""
        return torch.cat(getattr(self, name))


@torch.no_grad()
def score_batch(latent: Latent, inputs: ChatInputs, text_only: bool, out: Collected, examples_per_code: int) -> None:
    """Run one padded batch and add its scored positions to ``out``."""
    device = latent.codebook.weight.device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    raw = latent.backbone(ids, mask, {k: v.to(device) for k, v in inputs.vision.items()})  # (B, L, d)
    states = latent.projector.t2vt(raw).mu if text_only and latent.projector is not None else raw
    inv = latent.inverse(states, mask)
    targets = next_token_targets(inputs.labels.to(device))  # (B, L)
    select = inv.valid & (targets != IGNORE_INDEX)  # (B, L)
    codes = inv.logits[select].argmax(-1)  # (M,)
    chosen = states[select]  # (M, d)
    emitted = latent.token_logits(chosen, latent.codebook.embed(codes)).argmax(-1)
    base = latent.emittable(latent.backbone.logits(raw[select])).argmax(-1)
    for name, value in (("codes", codes), ("emitted", emitted), ("base", base), ("target", targets[select]),
                        ("states", chosen)):
        getattr(out, name).append(value.cpu())
    tok = latent.backbone.tokenizer
    rows, cols = select.nonzero(as_tuple=True)
    for m, (row, col) in enumerate(zip(rows.tolist(), cols.tolist())):
        found = out.examples.setdefault(int(codes[m]), [])
        if len(found) < examples_per_code:
            found.append({"context": tok.decode(ids[row, max(0, col + 1 - TAIL_TOKENS): col + 1].tolist()),
                          "emitted": token_text(tok, [int(emitted[m])]), "base": token_text(tok, [int(base[m])]),
                          "actual": token_text(tok, [int(targets[row, col])])})


@torch.no_grad()
def forced_tokens(latent: Latent, states: Tensor) -> Tensor:
    """The world model's argmax token with each code forced at each context: ``(K, C)``."""
    num, width = states.shape[0], latent.backbone.vocab_size
    chunk = max(1, LOGIT_BUDGET // max(1, num * width))  # codes per pass
    out = []
    for start in range(0, latent.codebook.num_codes, chunk):
        codes = latent.codebook.weight[start: start + chunk]  # (k, d)
        grid_s = states.unsqueeze(0).expand(codes.shape[0], -1, -1)  # (k, C, d)
        grid_c = codes.unsqueeze(1).expand(-1, num, -1)  # (k, C, d)
        out.append(latent.token_logits(grid_s, grid_c).argmax(-1).cpu())  # (k, C)
    return torch.cat(out)


def collect(latent: Latent, samples: list[Sample], batch_size: int, max_length: int, examples_per_code: int,
            skipped: Counter, notes: list[str]) -> tuple[Collected, dict[str, int]]:
    """Encode the samples, batch them by kind (image-text / text-only) and score every batch."""
    from data_modules.collate import ChatEncoder, SampleError

    encoder = ChatEncoder(latent.backbone.processor, latent.backbone.special_tokens, max_length=max_length)
    kinds: dict[bool, list] = {False: [], True: []}  # text_only -> encodings
    for sample in samples:
        try:
            enc = encoder.encode(sample.messages, sample.images, with_labels=True)
        except SampleError as err:
            skipped[err.reason] += 1
            if len(notes) < 10:
                notes.append(f"{err.reason}: sample {sample.key!r}: {err}")
            continue
        if not bool((enc.labels[1:] != IGNORE_INDEX).any()):
            skipped["no_reply"] += 1
            continue
        kinds[not sample.images].append(enc)
    out = Collected()
    for text_only, items in kinds.items():
        for start in range(0, len(items), batch_size):
            score_batch(latent, encoder.pad(items[start: start + batch_size]), text_only, out, examples_per_code)
    return out, {"image_text": len(kinds[False]), "text_only": len(kinds[True])}


def token_text(tokenizer: Any, ids: list[int]) -> str:
    """Decoded text; a piece of a multi-byte character is shown as its raw token in angle brackets."""
    text = tokenizer.decode(ids)
    return f"<{''.join(tokenizer.convert_ids_to_tokens(ids))}>" if "\ufffd" in text else text


def _token_table(tokens: Tensor, tokenizer: Any) -> list[dict[str, Any]]:
    ids, counts = tokens.unique(return_counts=True)
    order = sorted(zip(counts.tolist(), ids.tolist()), key=lambda x: (-x[0], x[1]))
    return [{"id": i, "token": token_text(tokenizer, [i]), "count": c} for c, i in order]


def build_report(latent: Latent, got: Collected, max_contexts: int) -> dict[str, Any]:
    """Usage, forced-code token distributions and examples, one entry per code."""
    codes, base = got.cat("codes"), got.cat("base")
    k, total = latent.codebook.num_codes, int(codes.numel())
    counts = torch.bincount(codes, minlength=k).tolist()
    stats = code_usage_stats(codes, k)
    pick = torch.linspace(0, total - 1, min(max_contexts, total)).round().long().unique()  # evenly spaced contexts
    forced = forced_tokens(latent, got.cat("states")[pick].to(latent.codebook.weight.device))  # (K, C)
    rows = []
    for code in range(k):
        hist = _token_table(forced[code], latent.backbone.tokenizer)
        rows.append({
            "code": code, "count": counts[code], "share": counts[code] / total,
            "forced": {"contexts": int(pick.numel()), "distinct": len(hist),
                       "base_agreement": float((forced[code] == base[pick]).float().mean()), "tokens": hist},
            "examples": got.examples.get(code, []),
        })
    target = got.cat("target")
    return {
        "num_codes": k, "positions": total, "contexts": int(pick.numel()),
        "usage": {"perplexity": float(stats["perplexity"]), "codes_used": int(stats["used"])},
        "world_model_accuracy": float((got.cat("emitted") == target).float().mean()),
        "base_accuracy": float((base == target).float().mean()),
        "codes": rows,
    }


def _cell(text: str) -> str:
    """A string shown exactly (quotes, escapes) and safe inside a markdown table cell."""
    return json.dumps(text, ensure_ascii=False).replace("|", "\\|").replace("`", "'")


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: a summary, then one table row per code, most used first."""
    usage = report["usage"]
    lines = [
        "# Codebook report", "",
        f"- export: `{report['export']}` (phase `{report['phase']}`), backbone `{report['backbone']}`",
        f"- data: `{report['data']}`: {report['samples']} samples ({report['image_text_samples']} image-text, "
        f"{report['text_only_samples']} text-only), skipped {report['skipped'] or 'none'}",
        f"- scored positions: {report['positions']}; codes in use: {usage['codes_used']} / {report['num_codes']}; "
        f"code perplexity: {usage['perplexity']:.2f}",
        f"- next-token accuracy: world model with the inverse model's codes {report['world_model_accuracy']:.3f}, "
        f"base model {report['base_accuracy']:.3f}",
        f"- forced tokens: each code applied at {report['contexts']} contexts; 'same as base' = share of contexts "
        f"where the code leaves the base model's token unchanged", "",
        "| code | usage | share | top emitted tokens (forced) | same as base | examples: context -> emitted "
        "(base, actual) |",
        "|---:|---:|---:|---|---:|---|",
    ]
    for row in sorted(report["codes"], key=lambda r: (-r["count"], r["code"])):
        forced = row["forced"]
        top = ", ".join(f"{_cell(t['token'])} {t['count'] / forced['contexts']:.0%}"
                        for t in forced["tokens"][:TOP_TOKENS])
        examples = "<br>".join(f"{_cell(e['context'])} -> {_cell(e['emitted'])} ({_cell(e['base'])}, "
                               f"{_cell(e['actual'])})" for e in row["examples"])
        lines.append(f"| {row['code']} | {row['count']} | {row['share']:.3f} | {top} | "
                     f"{forced['base_agreement']:.2f} | {examples} |")
    return "\n".join(lines) + "\n"


def write_tensorboard(folder: Path, report: dict[str, Any], codes: Tensor, markdown: str) -> None:
    """Usage histogram, usage scalars and the markdown table as TensorBoard summaries."""
    import numpy as np
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(folder))
    try:
        edges = np.arange(report["num_codes"] + 1) - 0.5  # one bin per code
        writer.add_histogram("codebook/usage", codes.float().numpy(), global_step=0, bins=edges)
        writer.add_scalar("codebook/perplexity", report["usage"]["perplexity"], 0)
        writer.add_scalar("codebook/codes_used", report["usage"]["codes_used"], 0)
        writer.add_text("codebook/report", markdown, 0)
    finally:
        writer.close()


def inspect_codebook(run: str, data: str | None = None, out: str | None = None, num_samples: int = 64,
                     examples_per_code: int = 3, batch_size: int = 8, max_length: int = 512,
                     max_contexts: int = 512, device: str = "auto") -> dict:
    """Report what every latent code does: usage, the tokens it makes the world model emit, and examples.

    Args:
        run: A phase export directory (holds ``phase.json``) or a pipeline run directory
            (``<run>/<phase>/export/phase.json``; the latest of ``latent_rl``, ``bc``, ``inverse_dynamics`` that
            holds a codebook is used).
        data: A directory of webdataset shards with ``json`` messages (and ``png``/``jpg``/``webp`` images for
            image-text samples; a dialogue sample's ``reference`` is used as its reply). Default:
            ``<run>/world/paired``.
        out: Output directory for ``codebook_report.md``, ``codebook_report.json`` and ``tb/`` (TensorBoard).
            Default: ``<run>/codebook_report``.
        num_samples: Samples read, the first ones in shard order.
        examples_per_code: Examples listed per code (positions where the inverse model chose it).
        batch_size: Conversations per forward pass.
        max_length: Longest conversation in tokens; longer ones are skipped and counted.
        max_contexts: Contexts (evenly spaced scored positions) at which every code is forced.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, ...

    Returns:
        The report (also written as JSON).
    """
    if min(num_samples, batch_size, max_contexts) < 1 or examples_per_code < 0:
        raise ValueError("num_samples, batch_size and max_contexts must be >= 1 and examples_per_code >= 0")
    export = load_phase(find_export(run))
    data_dir = Path(data) if data else default_data(run, export.directory)
    out_dir = Path(out) if out else Path(run) / "codebook_report"
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    latent = load_latent(export, dev)
    samples, skipped, notes = read_samples(data_dir, num_samples)
    got, kinds = collect(latent, samples, batch_size, max_length, examples_per_code, skipped, notes)
    if not got.codes:
        raise ValueError(f"no usable sample with an assistant reply among the first {num_samples} samples of "
                         f"{data_dir}; skipped: {dict(skipped)}; first problems: {notes}")
    report = {
        "export": str(export.directory), "phase": export.phase, "backbone": export.backbone.path,
        "data": str(data_dir), "samples": sum(kinds.values()), "image_text_samples": kinds["image_text"],
        "text_only_samples": kinds["text_only"], "skipped": dict(skipped), "skip_notes": notes,
        "text_states": "projector" if latent.projector is not None else "raw",
        **build_report(latent, got, max_contexts),
    }
    if skipped:
        log.warning("inspect-codebook skipped %s of the first %d samples of %s: %s", dict(skipped), num_samples,
                    data_dir, notes[:3])
    markdown = render_markdown(report)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "codebook_report.md").write_text(markdown, encoding="utf-8")
    (out_dir / "codebook_report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")
    write_tensorboard(out_dir / "tb", report, got.cat("codes"), markdown)
    usage = report["usage"]
    print(f"codebook report of {export.directory} on {report['samples']} samples: {usage['codes_used']}/"
          f"{report['num_codes']} codes in use, perplexity {usage['perplexity']:.2f}; written to {out_dir}")
    return report
