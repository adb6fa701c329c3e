"""``python -m latent_mca synth``: generate the synthetic world."""

from __future__ import annotations

from typing import Any

from latent_mca.world.generator import generate_world
from latent_mca.world.spec import WorldSpec


def synth(
    out: str,
    seed: int = 0,
    num_paired: int = 2000,
    num_text_only: int = 4000,
    num_dialogue_train: int = 1000,
    num_test_id: int = 64,
    num_test_ood: int = 64,
    samples_per_shard: int = 250,
    image_size: int = 84,
    num_characters: int = 12,
    caption_fraction: float = 0.25,
    paired_scene_fraction: float = 0.75,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Generate the synthetic multimodal role-play world as webdataset shards.

    Writes ``paired/``, ``text_only/`` and ``dialogue/`` shards with ``sizes.json``, ``corpus.txt`` (the
    tokenizer corpus) and ``world.json`` under ``out``. The same seed and sizes give byte-identical files.

    Args:
        out: Output directory.
        seed: Seed of the cast, the scenes shown with images and every sample.
        num_paired: Image-text samples (captions and in-character dialogues, ID characters).
        num_text_only: Text-only samples (scenes described in words, all characters and scenes).
        num_dialogue_train: Dialogue prompts with references for post-training (ID characters).
        num_test_id: Test prompts of ID characters.
        num_test_ood: Test prompts of OOD characters (seen only in text-only data).
        samples_per_shard: Samples per tar shard.
        image_size: Image side in pixels, a multiple of 28.
        num_characters: Characters in the cast (2 to 16); the first half are ID, the rest OOD.
        caption_fraction: Share of paired and text-only samples that are plain captions.
        paired_scene_fraction: Share of all scenes shown with images; text-only data covers all.
        overwrite: Replace the world files already in ``out``.

    Returns:
        The summary of counts.
    """
    spec = WorldSpec(
        num_paired=num_paired, num_text_only=num_text_only, num_dialogue_train=num_dialogue_train,
        num_test_id=num_test_id, num_test_ood=num_test_ood, samples_per_shard=samples_per_shard,
        image_size=image_size, num_characters=num_characters, caption_fraction=caption_fraction,
        paired_scene_fraction=paired_scene_fraction,
    )
    summary = generate_world(out, spec, seed=seed, overwrite=overwrite)
    shards = summary["shards"]
    print(f"synthetic world (seed {seed}) written to {out}")
    print(f"  paired    {summary['paired']:>6} samples ({summary['paired_captions']} captions) in "
          f"{shards['paired']} shards")
    print(f"  text-only {summary['text_only']:>6} samples ({summary['text_only_captions']} captions) in "
          f"{shards['text_only']} shards")
    print(f"  dialogue  train {summary['dialogue_train']}, test_id {summary['dialogue_test_id']}, "
          f"test_ood {summary['dialogue_test_ood']}")
    print(f"  ID characters: {', '.join(summary['id_characters'])}")
    print(f"  OOD characters: {', '.join(summary['ood_characters'])}")
    print(f"  corpus.txt: {summary['corpus_texts']} texts")
    return summary
