"""Generating the synthetic world as webdataset shards, deterministically from a seed.

Layout under ``out/``::

    paired/     train-*.tar + sizes.json   image + captions / in-character dialogues (ID characters, seen scenes)
    text_only/  train-*.tar + sizes.json   the scene in words; all characters and all scenes
    dialogue/   train-*.tar, test_id-*.tar, test_ood-*.tar + one sizes.json
    corpus.txt  every text a sample can hold, one per line (the tiny tokenizer's training corpus)
    world.json  cast, colours, shapes, positions, the scenes seen with images, spec and seed

Splits: the first half of the cast (ID) appears with images; the second half (OOD) only in text-only data
and in ``test_ood``. Only a ``paired_scene_fraction`` share of the scenes (every colour, shape and position
still among them) appears with ID images; text-only data covers them all. The dialogue prompts of the test
splits, a (character, scene, question) triple each, appear nowhere else, and ``train`` and ``test_id`` are
disjoint.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from itertools import product
from pathlib import Path
from typing import Any

from latent_mca.shards import ShardSink, encode_png, safe_key
from latent_mca.world.content import (
    CAPTION_PROMPTS, CAPTIONS, COLOURS, CORES, HELPER_SYSTEM, POSITIONS, QUESTION_TYPES, QUESTIONS, SHAPES,
    Character, Scene, all_scenes, make_facts, select_characters, user_text_only, where, world_texts,
)
from latent_mca.world.images import render_scene
from latent_mca.world.spec import WorldSpec

#: mtime of every tar member (2020-01-01 UTC), so shards are byte-identical across runs.
FIXED_MTIME = 1577836800
_DIRS = ("paired", "text_only", "dialogue")
_FILES = ("corpus.txt", "world.json")

#: A dialogue prompt: (character name, scene, question type, question index).
Prompt = tuple[str, Scene, str, int]


def corpus_texts(seed: int = 0, spec: WorldSpec | None = None) -> list[str]:
    """Every text a sample of the world generated with ``seed`` and ``spec`` can hold, sorted, unique.

    System prompts, questions, replies, captions and scene descriptions of the seed's cast: the corpus
    the tiny tokenizer is trained on, so it sees everything the data holds.
    """
    spec = spec or WorldSpec()
    return world_texts(select_characters(seed, spec.num_characters))


def _seen_scenes(rng: random.Random, fraction: float) -> list[Scene]:
    """A ``fraction`` of all scenes that still holds every colour, shape and position."""
    scenes = all_scenes()
    count = max(max(len(COLOURS), len(SHAPES), len(POSITIONS)), round(fraction * len(scenes)))
    for _ in range(1000):
        chosen = sorted(rng.sample(scenes, min(count, len(scenes))))
        if all({getattr(s, a) for s in chosen} == set(v) for a, v in
               (("colour", COLOURS), ("shape", SHAPES), ("position", POSITIONS))):
            return chosen
    raise ValueError(f"paired_scene_fraction={fraction} is too small to show every colour, shape and position")


def _unique_prompts(rng: random.Random, cast: list[Character], scenes: list[Scene], count: int,
                    taken: set[Prompt], split: str) -> list[Prompt]:
    """``count`` distinct prompts not in ``taken`` (which then holds them too)."""
    pool = [(c.name, s, t, q) for c, s, t in product(cast, scenes, QUESTION_TYPES) for q in range(len(QUESTIONS[t]))]
    pool = [p for p in pool if p not in taken]
    if count > len(pool):
        raise ValueError(f"dialogue split {split!r} asks for {count} distinct prompts but only {len(pool)} exist "
                         f"for its characters and scenes; lower the size or raise num_characters")
    chosen = rng.sample(pool, count)
    taken.update(chosen)
    return chosen


def _free_prompt(rng: random.Random, cast: list[Character], scenes: list[Scene], held: set[Prompt]) -> Prompt:
    """A random prompt that is not held out for testing."""
    for _ in range(10000):
        qtype = rng.choice(QUESTION_TYPES)
        prompt = (rng.choice(cast).name, rng.choice(scenes), qtype, rng.randrange(len(QUESTIONS[qtype])))
        if prompt not in held:
            return prompt
    raise ValueError("every prompt of these characters and scenes is held out for testing; "
                     "lower num_test_id / num_test_ood")


class _WorldWriter:
    """Draws and writes the samples of one world."""

    def __init__(self, out: Path, spec: WorldSpec, seed: int) -> None:
        self.out, self.spec, self.seed = out, spec, seed
        self.cast = select_characters(seed, spec.num_characters)
        self.by_name = {c.name: c for c in self.cast}
        self.id_cast = self.cast[:spec.num_id_characters]
        self.ood_cast = self.cast[spec.num_id_characters:]
        self.seen = _seen_scenes(self._rng("scenes"), spec.paired_scene_fraction)

    def _rng(self, stream: str) -> random.Random:
        # String seeds hash deterministically (sha512), independent of PYTHONHASHSEED.
        return random.Random(f"{self.seed}-{stream}")

    def _png(self, scene: Scene, rng: random.Random) -> bytes:
        return encode_png(render_scene(scene, self.spec.image_size, rng, self.spec.jitter_px))

    def _reply(self, prompt: Prompt, rng: random.Random) -> str:
        char = self.by_name[prompt[0]]
        return char.reply(prompt[2], prompt[1], rng.randrange(len(char.openers)), rng.randrange(len(CORES[prompt[2]])))

    def _messages(self, prompt: Prompt, image: bool) -> list[dict[str, Any]]:
        name, scene, qtype, q = prompt
        question = QUESTIONS[qtype][q]
        user: Any = ([{"type": "image"}, {"type": "text", "text": question}] if image
                     else user_text_only(scene, question))
        return [{"role": "system", "content": self.by_name[name].system_prompt()}, {"role": "user", "content": user}]

    def _caption(self, scene: Scene, rng: random.Random, image: bool) -> list[dict[str, Any]]:
        prompt = rng.choice(CAPTION_PROMPTS)
        user: Any = [{"type": "image"}, {"type": "text", "text": prompt}] if image else user_text_only(scene, prompt)
        return [{"role": "system", "content": HELPER_SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": scene.fill(rng.choice(CAPTIONS))}]

    def write_pretraining(self, name: str, count: int, held: set[Prompt]) -> tuple[int, int, dict[str, int]]:
        """Paired (``name == "paired"``) or text-only samples; returns (samples, captions, sizes)."""
        image = name == "paired"
        cast, scenes = (self.id_cast, self.seen) if image else (self.cast, all_scenes())
        rng, captions = self._rng(name), 0
        with ShardSink(self.out / name, "train", self.spec.samples_per_shard, mtime=FIXED_MTIME) as sink:
            for i in range(count):
                if rng.random() < self.spec.caption_fraction:
                    scene = rng.choice(scenes)
                    messages = self._caption(scene, rng, image)
                    captions += 1
                else:
                    prompt = _free_prompt(rng, cast, scenes, held)
                    scene = prompt[1]
                    messages = self._messages(prompt, image)
                    messages.append({"role": "assistant", "content": self._reply(prompt, rng)})
                sample_id = f"{name}-{i:06d}"
                fields: dict[str, Any] = {"json": {"id": sample_id, "source": "synth", "messages": messages}}
                if image:
                    fields["png"] = self._png(scene, rng)
                sink.write(safe_key(sample_id), fields)
        return count, captions, dict(sink.sizes)

    def dialogue_prompts(self) -> dict[str, list[Prompt]]:
        """The prompts of each dialogue split (test splits drawn first, so train avoids them)."""
        rng, taken, spec = self._rng("dialogue-prompts"), set(), self.spec
        test_ood = _unique_prompts(rng, self.ood_cast, all_scenes(), spec.num_test_ood, taken, "test_ood")
        test_id = _unique_prompts(rng, self.id_cast, self.seen, spec.num_test_id, taken, "test_id")
        train = _unique_prompts(rng, self.id_cast, self.seen, spec.num_dialogue_train, taken, "train")
        return {"train": train, "test_id": test_id, "test_ood": test_ood}

    def write_dialogue(self, split: str, prompts: list[Prompt]) -> dict[str, int]:
        """One dialogue split; returns its shard sizes."""
        rng = self._rng(f"dialogue-{split}")
        with ShardSink(self.out / "dialogue", split, self.spec.samples_per_shard, mtime=FIXED_MTIME) as sink:
            for i, prompt in enumerate(prompts):
                char, scene, qtype = self.by_name[prompt[0]], prompt[1], prompt[2]
                sample_id = f"{split}-{i:06d}"
                record = {
                    "id": sample_id, "messages": self._messages(prompt, image=True),
                    "reference": self._reply(prompt, rng), "character": char.name, "profile": char.profile(),
                    "task": "roleplay", "split": split,
                    "facts": make_facts(char, scene, qtype, self.cast, self.spec.max_reply_words),
                }
                sink.write(safe_key(sample_id), {"png": self._png(scene, rng), "json": record})
        return dict(sink.sizes)

    def world_record(self) -> dict[str, Any]:
        """The contents of ``world.json``."""
        chars = [{**c.profile(), "style_words": list(c.style_words), "openers": list(c.openers),
                  "split": "id" if i < self.spec.num_id_characters else "ood"} for i, c in enumerate(self.cast)]
        return {
            "seed": self.seed, "spec": asdict(self.spec), "characters": chars,
            "id_characters": [c.name for c in self.id_cast], "ood_characters": [c.name for c in self.ood_cast],
            "colours": {k: list(v) for k, v in COLOURS.items()}, "shapes": list(SHAPES),
            "positions": {k: {"center": list(v), "phrase": where(k)} for k, v in POSITIONS.items()},
            "paired_scenes": [[s.colour, s.shape, s.position] for s in self.seen],
        }


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with an existing world, or (``overwrite``) remove only the files a world consists of."""
    existing = [n for n in (*_DIRS, *_FILES) if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out} already holds world files {existing}; pass overwrite=True (--overwrite true) "
                              f"to replace them")
    for name in _DIRS:
        folder = out / name
        if folder.is_dir():
            for path in [*folder.glob("*.tar"), folder / "sizes.json"]:
                path.unlink(missing_ok=True)
    for name in _FILES:
        (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def generate_world(out: str | Path, spec: WorldSpec | None = None, seed: int = 0,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write the synthetic world under ``out`` (see the module docstring for the layout).

    The same seed and spec give byte-identical files.

    Args:
        out: Output directory (created).
        spec: Sizes and knobs; default :class:`WorldSpec`.
        seed: Seed of the cast, the scenes seen with images and every sample.
        overwrite: Replace the world files already in ``out`` (other files are left alone).

    Returns:
        A summary: sample counts per directory and split, captions, shard counts and the cast.

    Raises:
        FileExistsError: If ``out`` already holds world files and ``overwrite`` is False.
        ValueError: If a dialogue split asks for more distinct prompts than exist.
    """
    spec = spec or WorldSpec()
    out = Path(out)
    writer = _WorldWriter(out, spec, seed)
    prompts = writer.dialogue_prompts()  # before touching the disk: too-large splits fail early
    _prepare_out(out, overwrite)
    held = set(prompts["test_id"]) | set(prompts["test_ood"])
    paired, paired_captions, paired_sizes = writer.write_pretraining("paired", spec.num_paired, held)
    text, text_captions, text_sizes = writer.write_pretraining("text_only", spec.num_text_only, held)
    dialogue_sizes = {split: writer.write_dialogue(split, p) for split, p in prompts.items()}
    corpus = corpus_texts(seed, spec)
    (out / "corpus.txt").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    (out / "world.json").write_text(json.dumps(writer.world_record(), indent=1), encoding="utf-8")
    return {
        "out": str(out), "seed": seed,
        "paired": paired, "paired_captions": paired_captions,
        "text_only": text, "text_only_captions": text_captions,
        **{f"dialogue_{split}": len(p) for split, p in prompts.items()},
        "shards": {"paired": len(paired_sizes), "text_only": len(text_sizes),
                   **{f"dialogue_{s}": len(v) for s, v in dialogue_sizes.items()}},
        "id_characters": [c.name for c in writer.id_cast], "ood_characters": [c.name for c in writer.ood_cast],
        "corpus_texts": len(corpus),
    }
