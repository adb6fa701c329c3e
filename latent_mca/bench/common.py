"""What every benchmark shares: sizes, the tiny backbone and latent modules, prompts, timing, memory, output.

Each benchmark times *ours* against a *baseline* in the same process: ``warmup`` untimed calls of each, then
``repeats`` timed calls with :func:`time.perf_counter`, alternating which of the two goes first so that
slow drift of a shared machine hits both alike. The median is reported; the ratio is ours / baseline.

Peak memory (:func:`peak_rss`) is the growth of the process's resident set during one extra call, read
from Linux's ``VmHWM`` after resetting it through ``/proc/self/clear_refs``. Freed memory that malloc still
caches is first returned to the OS (glibc ``malloc_trim``) so that a call's working set is not hidden by
pages an earlier call left behind. It counts everything the call touches (tensors, autograd activations,
library buffers), page-granular: a coarse process-level number, comparable between the two sides of one
run, not an exact tensor peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from latent_mca.batch import ChatInputs
from latent_mca.models import (
    Backbone,
    Codebook,
    CodebookConfig,
    LatentPolicy,
    LatentPolicyConfig,
    WorldModel,
    WorldModelConfig,
)
from latent_mca.models.agent import LatentAgent
from latent_mca.models.tiny import TinyBackboneSpec, build_tiny_backbone


@dataclass
class BenchSizes:
    """Model and workload sizes of one benchmark configuration.

    Attributes:
        backbone: The tiny Qwen2.5-VL's sizes.
        policy_layers: Latent policy transformer blocks.
        policy_heads: Latent policy attention heads.
        inverse_layers: Inverse-dynamics transformer blocks.
        inverse_heads: Inverse-dynamics attention heads.
        num_codes: Codebook size K.
        merge_blocks: World-model merge blocks.
        batch_size: Prompts per batch (and paired / text-only conversations per stage-1 batch).
        new_tokens: Tokens generated per reply (every reply has exactly this length).
        group_size: Samples per prompt G in rollouts and RL updates.
    """

    backbone: TinyBackboneSpec
    policy_layers: int
    policy_heads: int
    inverse_layers: int
    inverse_heads: int
    num_codes: int = 128
    merge_blocks: int = 2
    batch_size: int = 8
    new_tokens: int = 32
    group_size: int = 4


#: ``tiny`` is for tests and smoke runs; ``demo`` is the embedded default; ``large`` shows how ratios scale.
PRESETS: dict[str, BenchSizes] = {
    "tiny": BenchSizes(
        TinyBackboneSpec(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                         num_kv_heads=2, vision_depth=1, vision_hidden_size=32, image_size=56),
        policy_layers=1, policy_heads=2, inverse_layers=1, inverse_heads=2, num_codes=8, batch_size=2,
        new_tokens=4, group_size=2),
    "demo": BenchSizes(TinyBackboneSpec(), policy_layers=2, policy_heads=4, inverse_layers=2, inverse_heads=4),
    "large": BenchSizes(
        TinyBackboneSpec(hidden_size=512, intermediate_size=1536, num_layers=8, num_heads=8, num_kv_heads=2,
                         vision_hidden_size=128),
        policy_layers=4, policy_heads=8, inverse_layers=4, inverse_heads=8),
}


def resolve_sizes(size: str, **overrides: int | None) -> BenchSizes:
    """A preset with the non-None workload ``overrides`` (``batch_size``, ``new_tokens``, ``group_size``) applied."""
    if size not in PRESETS:
        raise ValueError(f"unknown bench size {size!r}; expected one of {sorted(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    for key, value in changes.items():
        if value < 1:
            raise ValueError(f"--{key} must be >= 1, got {value}")
    return dataclasses.replace(PRESETS[size], **changes)


# ---------------------------------------------------------------------------------------------- models
def backbone_dir(cache: Path, size: str, spec: TinyBackboneSpec, seed: int) -> Path:
    """Build the tiny backbone of ``spec`` under ``cache/<size>`` unless an identical build is already there."""
    from latent_mca.world import corpus_texts

    path = cache / size
    meta = path / "latent_mca_tiny.json"
    if meta.is_file():
        saved = json.loads(meta.read_text())
        if saved.get("spec") == asdict(spec) and saved.get("seed") == seed:
            return path
    return build_tiny_backbone(path, corpus_texts(seed), spec, seed=seed)


def latent_agent(backbone: Backbone, sizes: BenchSizes, seed: int) -> LatentAgent:
    """A latent agent with freshly initialised policy, codebook and world model (timing ignores the values)."""
    d = backbone.hidden_size
    torch.manual_seed(seed)
    policy = LatentPolicy(LatentPolicyConfig(d, num_layers=sizes.policy_layers, num_heads=sizes.policy_heads,
                                             num_codes=sizes.num_codes))
    codebook = Codebook(CodebookConfig(d, num_codes=sizes.num_codes))
    world = WorldModel(WorldModelConfig(d, num_blocks=sizes.merge_blocks))
    return LatentAgent(backbone, policy, codebook, world).eval()


def check_length(kind: str, length: int, expected: int) -> None:
    """Fail loudly when a decoder stopped early (the tokens/s comparison would be unfair)."""
    if length != expected:
        raise RuntimeError(f"{kind} produced {length} tokens per reply, expected exactly {expected}")


# ---------------------------------------------------------------------------------------------- data
@dataclass
class Conversation:
    """One synthetic-world conversation in both of its forms.

    Attributes:
        messages: System + user turn showing the image (the prompt of a generation).
        text_messages: The same question with the scene in words instead of the image (text-only data).
        reply: The in-character reference reply.
        image: The rendered scene.
    """

    messages: list[dict[str, Any]]
    text_messages: list[dict[str, Any]]
    reply: str
    image: Any = field(repr=False)


def conversations(count: int, image_size: int, seed: int) -> list[Conversation]:
    """``count`` role-play conversations of the synthetic world (characters, scenes and questions drawn by seed)."""
    from latent_mca.world import WorldSpec
    from latent_mca.world.content import CORES, QUESTIONS, all_scenes, select_characters, user_text_only
    from latent_mca.world.images import render_scene

    rng = random.Random(f"bench-{seed}")
    cast, scenes = select_characters(seed, WorldSpec().num_characters), all_scenes()
    out = []
    for _ in range(count):
        char, scene = rng.choice(cast), rng.choice(scenes)
        qtype = rng.choice(sorted(QUESTIONS))
        question = rng.choice(QUESTIONS[qtype])
        system = {"role": "system", "content": char.system_prompt()}
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
        text_user = {"role": "user", "content": user_text_only(scene, question)}
        reply = char.reply(qtype, scene, rng.randrange(len(char.openers)), rng.randrange(len(CORES[qtype])))
        out.append(Conversation([system, user], [system, text_user], reply, render_scene(scene, image_size)))
    return out


def chat_encoder(backbone: Backbone, max_length: int = 4096) -> Any:
    """The data pipeline's :class:`~data_modules.collate.ChatEncoder` for this backbone."""
    from data_modules.collate import ChatEncoder  # lazy: data_modules depends on latent_mca, not the reverse

    return ChatEncoder(backbone.processor, backbone.special_tokens, max_length=max_length)


def generation_prompts(backbone: Backbone, convs: list[Conversation]) -> ChatInputs:
    """Left-padded image-text prompts ending with the assistant prefix."""
    encoder = chat_encoder(backbone)
    items = [encoder.encode(c.messages, [c.image], add_generation_prompt=True, with_labels=False) for c in convs]
    return encoder.pad(items, padding_side="left")


# ---------------------------------------------------------------------------------------------- measuring
def time_pair(ours: Callable[[], Any], baseline: Callable[[], Any], repeats: int,
              warmup: int) -> dict[str, list[float]]:
    """Wall-clock seconds of ``repeats`` calls of each function after ``warmup`` untimed calls of each.

    The order alternates (ours first on even repetitions, the baseline first on odd ones).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    for _ in range(warmup):
        ours()
        baseline()
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    pair = [("ours", ours), ("baseline", baseline)]
    for i in range(repeats):
        for key, fn in pair if i % 2 == 0 else pair[::-1]:
            gc.collect()  # a collection triggered by the other side's garbage must not land in this timing
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return times


def _status_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def _release_free_memory() -> None:
    """Hand memory that malloc keeps cached back to the OS, so the next call's working set shows up in RSS."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)  # glibc only; elsewhere the measurement is merely coarser


def peak_rss(fn: Callable[[], Any]) -> int | None:
    """Bytes by which the resident set grew at its peak during ``fn()`` (None where Linux's counters are missing)."""
    _release_free_memory()
    try:
        start = _status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        fn()
        return None
    fn()
    return max(0, _status_kib("VmHWM") - start) * 1024


MEMORY_METHOD = ("peak resident-set growth during one call: Linux VmHWM minus VmRSS, after gc, glibc malloc_trim "
                 "and a clear_refs reset; process-wide (tensors, activations, allocator and library buffers), "
                 "page-granular; weights and caches allocated before the call are not counted")


def memory_pair(ours: Callable[[], Any], baseline: Callable[[], Any]) -> dict[str, Any]:
    """:func:`peak_rss` of one more call of each side."""
    return {"method": MEMORY_METHOD, "ours_bytes": peak_rss(ours), "baseline_bytes": peak_rss(baseline)}


def profile_top(fn: Callable[[], Any], rows: int = 15) -> list[dict[str, Any]]:
    """The operators with the most self CPU time in one call of ``fn`` (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return [{"op": e.key, "calls": int(e.count), "self_ms": e.self_cpu_time_total / 1000.0,
             "total_ms": e.cpu_time_total / 1000.0} for e in events]


def environment() -> dict[str, Any]:
    """Versions, thread count and machine facts recorded with every result."""
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    return {
        "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
        "platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
        "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
        "git_commit": commit, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Other processes on a shared machine slow both sides unevenly; the load says how much to trust a run.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class Target:
    """A goal for a benchmark's ratio.

    Attributes:
        op: ``<=`` (a time ratio, lower is better) or ``>=`` (a throughput ratio, higher is better).
        value: The goal.
        paper: The paper's (authors' code) value for the same ratio, if reported.
    """

    op: str
    value: float
    paper: float | None = None

    def met(self, ratio: float) -> bool:
        """Whether ``ratio`` reaches the goal."""
        return ratio <= self.value if self.op == "<=" else ratio >= self.value


def summarise(name: str, description: str, times: dict[str, list[float]], labels: dict[str, str], *,
              throughput: bool, tokens: int | None, target: Target | None, sizes: dict[str, Any],
              notes: list[str]) -> dict[str, Any]:
    """The result record of one benchmark (raw timings, medians, ratio, target and verdict)."""
    sides = {}
    for key in ("ours", "baseline"):
        med = statistics.median(times[key])
        sides[key] = {"label": labels[key], "times_s": times[key], "median_s": med, "min_s": min(times[key]),
                      "tokens_per_s": tokens / med if tokens else None}
    time_ratio = sides["ours"]["median_s"] / sides["baseline"]["median_s"]
    ratio = 1.0 / time_ratio if throughput else time_ratio
    return {
        "benchmark": name, "description": description, "sizes": sizes, "tokens_per_call": tokens,
        "ours": sides["ours"], "baseline": sides["baseline"], "time_ratio": time_ratio, "ratio": ratio,
        # Interference from other processes only ever adds time: the minima are a check on a noisy median.
        "time_ratio_of_minima": sides["ours"]["min_s"] / sides["baseline"]["min_s"],
        "ratio_definition": ("throughput ratio: ours tokens/s / baseline tokens/s (higher is better)" if throughput
                             else "time ratio: ours median s / baseline median s (lower is better)"),
        "target": None if target is None else asdict(target),
        "passed": None if target is None else target.met(ratio), "notes": notes,
    }


def format_result(result: dict[str, Any]) -> str:
    """A Markdown table of one result: both sides, then the ratio with its target and verdict."""
    from latent_mca.eval.records import markdown_table

    if result.get("kind") == "memory":
        from latent_mca.bench.memory import format_memory

        return format_memory(result)
    target = result["target"]
    verdict = "-" if result["passed"] is None else ("pass" if result["passed"] else "miss")
    rows = [{"run": f"{k}: {result[k]['label']}", "median_s": result[k]["median_s"], "min_s": result[k]["min_s"],
             "tokens_per_s": result[k]["tokens_per_s"]} for k in ("ours", "baseline")]
    rows.append({"run": "ratio ours/baseline" + (" (tokens/s)" if "throughput" in result["ratio_definition"]
                                                 else " (time)"),
                 "ratio": result["ratio"], "target": f"{target['op']} {target['value']}" if target else "-",
                 "paper": target.get("paper") if target else None, "result": verdict})
    columns = {"run": "run", "median_s": "median s", "min_s": "min s", "tokens_per_s": "tokens/s", "ratio": "ratio",
               "target": "target", "paper": "paper", "result": "result"}
    head = f"### {result['benchmark']} ({result.get('size', '?')}): {result['description']}\n\n"
    return head + markdown_table(rows, columns, digits=4)


def write_result(out: Path, result: dict[str, Any]) -> Path:
    """Write ``<out>/<benchmark>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{result['benchmark']}.json"
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return path


# ---------------------------------------------------------------------------------------------- context
@dataclass
class BenchContext:
    """What one ``bench`` call hands to each benchmark.

    Attributes:
        size: Preset name (a key of :data:`PRESETS`).
        sizes: Model and workload sizes.
        path: Directory of the saved tiny backbone.
        seed: Seed of prompts, latent modules and sampling.
        repeats: Timed calls per side.
        warmup: Untimed calls per side first.
        memory: Also measure peak memory (one extra call per side).
        profile: Also record the top operators of one extra call per side (torch.profiler).
        token_trainable: Which backbone parameters the token RL baseline trains (``all`` or ``top_n``).
    """

    size: str
    sizes: BenchSizes
    path: Path
    seed: int = 0
    repeats: int = 5
    warmup: int = 1
    memory: bool = True
    profile: bool = False
    token_trainable: str = "all"
    _backbone: Backbone | None = field(default=None, repr=False)

    @property
    def backbone(self) -> Backbone:
        """The frozen backbone, loaded once from ``path`` the way any checkpoint is loaded."""
        if self._backbone is None:
            self._backbone = Backbone.from_pretrained(str(self.path))
        return self._backbone

    def generator(self) -> torch.Generator:
        """A freshly seeded random generator."""
        return torch.Generator().manual_seed(self.seed)

    def measure(self, name: str, description: str, ours: Callable[[], Any], baseline: Callable[[], Any],
                labels: dict[str, str], *, throughput: bool = False, tokens: int | None = None,
                target: Target | None = None, sizes: dict[str, Any] | None = None,
                notes: list[str] | None = None) -> dict[str, Any]:
        """Time both sides, then add memory and profile entries as configured; returns the result record."""
        times = time_pair(ours, baseline, self.repeats, self.warmup)
        all_sizes = {**asdict(self.sizes), **(sizes or {})}
        result = summarise(name, description, times, labels, throughput=throughput, tokens=tokens, target=target,
                           sizes=all_sizes, notes=list(notes or []))
        result.update(size=self.size, repeats=self.repeats, warmup=self.warmup)
        result["memory"] = memory_pair(ours, baseline) if self.memory else None
        if self.profile:
            result["profile"] = {"ours": profile_top(ours), "baseline": profile_top(baseline)}
        return result
