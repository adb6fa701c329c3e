import random

import numpy as np
import pytest

from latent_mca.world import WorldSpec, corpus_texts
from latent_mca.world.content import (
    CHARACTER_POOL, COLOURS, POSITIONS, SHAPES, Scene, all_scenes, select_characters, world_texts,
)
from latent_mca.world.images import position_center, render_scene


def mask(image, colour):
    """The (x, y) pixels of exactly this colour."""
    ys, xs = np.nonzero((np.asarray(image) == np.array(colour, dtype=np.uint8)).all(axis=-1))
    return frozenset(zip(xs.tolist(), ys.tolist()))


def test_each_shape_has_its_own_silhouette_of_a_sensible_size():
    size = 84
    masks = {shape: mask(render_scene(Scene("blue", shape, "center"), size), COLOURS["blue"]) for shape in SHAPES}
    assert len(set(masks.values())) == len(SHAPES)
    cell = 28 * 28  # one merged image token
    for shape, pixels in masks.items():
        assert cell // 2 <= len(pixels) <= 4 * cell, (shape, len(pixels))
    # A square fills its bounding-box corners; the others do not.
    corner = (42 - 15, 42 - 15)
    assert corner in masks["square"] and not any(corner in masks[s] for s in ("circle", "triangle", "diamond"))


@pytest.mark.parametrize("position", list(POSITIONS))
def test_shapes_stay_in_their_region_under_jitter(position):
    size, rng = 84, random.Random(0)
    cx, cy = position_center(position, size)
    for shape in SHAPES:
        for _ in range(5):
            image = render_scene(Scene("red", shape, position), size, rng, jitter_px=3)
            pixels = mask(image, COLOURS["red"])
            assert (cx, cy) in pixels
            xs, ys = [p[0] for p in pixels], [p[1] for p in pixels]
            assert max(abs(x - cx) for x in xs) <= size // 4 and max(abs(y - cy) for y in ys) <= size // 4
            background = image.getpixel((0, 0) if position != "top left" else (size - 1, size - 1))
            assert min(background) >= 200 and background not in COLOURS.values()


def test_colours_are_far_apart():
    values = list(COLOURS.values())
    for i, a in enumerate(values):
        for b in values[i + 1:]:
            assert sum(abs(x - y) for x, y in zip(a, b)) >= 120, (a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(image_size=80), "multiple of 28"), (dict(num_characters=1), "num_characters"),
    (dict(num_characters=len(CHARACTER_POOL) + 1), "num_characters"), (dict(samples_per_shard=0), "samples_per"),
    (dict(num_paired=-1), "num_paired"), (dict(caption_fraction=1.5), "caption_fraction"),
    (dict(paired_scene_fraction=0.0), "paired_scene_fraction"), (dict(jitter_px=20), "jitter_px"),
])
def test_world_spec_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WorldSpec(**kwargs)


def test_defaults_fit_the_cpu_demo():
    spec = WorldSpec()
    assert spec.image_size == 84 and spec.num_characters == 12 and spec.num_id_characters == 6
    assert spec.num_paired // spec.samples_per_shard >= 4  # 2 ranks x 2 workers


def test_characters_have_unique_markers():
    markers = [m.lower() for c in CHARACTER_POOL for m in c.markers()]
    assert len(markers) == len(set(markers))
    scene_words = set(COLOURS) | set(SHAPES) | {w for p in POSITIONS for w in p.split()}
    assert not scene_words & {w.strip("!.,").lower() for c in CHARACTER_POOL
                              for text in (c.catchphrase, *c.openers) for w in text.split()}
    for c in CHARACTER_POOL:
        assert all(any(w in o.lower() for w in c.style_words) for o in c.openers), c.name


def test_cast_depends_on_the_seed_and_corpus_on_the_cast():
    assert select_characters(0, 12) == select_characters(0, 12)
    assert select_characters(0, 12) != select_characters(1, 12)
    small = corpus_texts(0, WorldSpec(num_characters=2))
    cast = select_characters(0, 2)
    assert any(cast[0].name in t for t in small)
    assert not any(c.name in t for t in small for c in CHARACTER_POOL if c not in cast)
    assert world_texts(cast) == small and small == sorted(set(small))
    assert all("\n" not in t for t in small)


def test_replies_fit_the_tiny_tokenizer_budget():
    from latent_mca.models.tiny import train_tokenizer

    cast = select_characters(0, 12)
    tokenizer = train_tokenizer(world_texts(cast), vocab_size=1024)
    replies = [c.reply(q, s, o, k) for c in cast for s in all_scenes()[::7]
               for q, k in (("colour", 2), ("position", 1), ("describe", 0), ("describe", 1))
               for o in range(len(c.openers))]
    lengths = [len(tokenizer(r)["input_ids"]) for r in replies]
    assert max(lengths) <= 30
