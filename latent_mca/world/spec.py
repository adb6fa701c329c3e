"""Sizes and knobs of the synthetic world."""

from __future__ import annotations

from dataclasses import dataclass

from latent_mca.world.content import CHARACTER_POOL


@dataclass
class WorldSpec:
    """How big the synthetic world is and how it is split.

    The defaults make a world a CPU demo can train on in minutes, with several shards per directory so that
    2 ranks x 2 workers all get data.

    Attributes:
        num_paired: Image-text samples (captions and in-character dialogues about the image).
        num_text_only: Text-only samples (the scene described in words), covering all characters and scenes.
        num_dialogue_train: Dialogue prompts with references for post-training (ID characters).
        num_test_id: Test prompts of ID characters (disjoint from the train prompts).
        num_test_ood: Test prompts of OOD characters (seen only in text-only data).
        samples_per_shard: Samples per tar shard.
        image_size: Square image side in pixels, a multiple of 28 (Qwen2.5-VL merges 28 x 28 patches).
        num_characters: Characters in the cast; the first half are ID, the rest OOD.
        caption_fraction: Share of paired and text-only samples that are plain captions (no character).
        paired_scene_fraction: Share of all scenes that appear with images; text-only data covers all.
        jitter_px: Random shift of each shape, in pixels, so no two images of a scene need be identical.
        max_reply_words: Longest reply the judge still counts as fluent, in words.
    """

    num_paired: int = 2000
    num_text_only: int = 4000
    num_dialogue_train: int = 1000
    num_test_id: int = 64
    num_test_ood: int = 64
    samples_per_shard: int = 250
    image_size: int = 84
    num_characters: int = 12
    caption_fraction: float = 0.25
    paired_scene_fraction: float = 0.75
    jitter_px: int = 2
    max_reply_words: int = 30

    def __post_init__(self) -> None:
        counts = ("num_paired", "num_text_only", "num_dialogue_train", "num_test_id", "num_test_ood", "jitter_px")
        for name in counts:
            if getattr(self, name) < 0:
                raise ValueError(f"WorldSpec.{name} must be >= 0, got {getattr(self, name)}")
        if self.samples_per_shard < 1:
            raise ValueError(f"WorldSpec.samples_per_shard must be >= 1, got {self.samples_per_shard}")
        if self.image_size < 28 or self.image_size % 28:
            raise ValueError(f"WorldSpec.image_size must be a positive multiple of 28 pixels, got {self.image_size}")
        if not 2 <= self.num_characters <= len(CHARACTER_POOL):
            raise ValueError(f"WorldSpec.num_characters must be in [2, {len(CHARACTER_POOL)}], "
                             f"got {self.num_characters}")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"WorldSpec.caption_fraction must be in [0, 1], got {self.caption_fraction}")
        if not 0.0 < self.paired_scene_fraction <= 1.0:
            raise ValueError(f"WorldSpec.paired_scene_fraction must be in (0, 1], got {self.paired_scene_fraction}")
        if self.jitter_px > self.image_size // 28:
            raise ValueError(f"WorldSpec.jitter_px must be <= image_size / 28 = {self.image_size // 28} so that "
                             f"shapes stay inside their region, got {self.jitter_px}")
        if self.max_reply_words < 1:
            raise ValueError(f"WorldSpec.max_reply_words must be >= 1, got {self.max_reply_words}")

    @property
    def num_id_characters(self) -> int:
        """Characters seen with images (the first half of the cast, rounded down)."""
        return self.num_characters // 2
