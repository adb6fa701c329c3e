"""Drawing the world's images: one flat-coloured shape on a plain light background.

Shapes are large (about 40% of the image side) and drawn without anti-aliasing, so every pixel of the
shape has exactly the colour the sample claims; a shape covers about 2 x 2 of the 28-pixel cells a
Qwen2.5-VL vision tower merges into one image token, so a 84-pixel image (9 tokens) is enough to tell
colour, shape and position apart.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from latent_mca.world.content import COLOURS, POSITIONS, SHAPES, Scene

#: Half the side of a shape's bounding box, as a fraction of the image side (before the random scale).
HALF_SIZE = 0.2
#: Range of the random scale of a shape.
SCALE_RANGE = (0.85, 1.0)
#: Range of each background channel: light, and far from every shape colour.
BACKGROUND_RANGE = (232, 250)


def position_center(position: str, size: int) -> tuple[int, int]:
    """Pixel (x, y) of the nominal centre of a position in a ``size`` x ``size`` image.

    Raises:
        KeyError: On an unknown position name.
    """
    if position not in POSITIONS:
        raise KeyError(f"unknown position {position!r}; known: {sorted(POSITIONS)}")
    fx, fy = POSITIONS[position]
    return round(fx * size), round(fy * size)


def render_scene(scene: Scene, size: int, rng: random.Random | None = None, jitter_px: int = 0) -> Image.Image:
    """Draw a scene.

    Args:
        scene: Colour, shape and position.
        size: Image side in pixels.
        rng: Source of the background tint, shape scale and shift; None draws the canonical image.
        jitter_px: Largest shift of the shape centre along each axis, in pixels.

    Returns:
        An RGB image whose pixel at :func:`position_center` has the scene's colour.

    Raises:
        KeyError: On an unknown colour, shape or position.
    """
    if scene.colour not in COLOURS:
        raise KeyError(f"unknown colour {scene.colour!r}; known: {sorted(COLOURS)}")
    cx, cy = position_center(scene.position, size)
    if rng is None:
        background, scale = (BACKGROUND_RANGE[1],) * 3, SCALE_RANGE[1]
    else:
        background = tuple(rng.randint(*BACKGROUND_RANGE) for _ in range(3))
        scale = rng.uniform(*SCALE_RANGE)
        cx += rng.randint(-jitter_px, jitter_px)
        cy += rng.randint(-jitter_px, jitter_px)
    half = max(2, round(HALF_SIZE * size * scale))
    image = Image.new("RGB", (size, size), background)
    _draw_shape(ImageDraw.Draw(image), scene.shape, cx, cy, half, COLOURS[scene.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, half: int,
                fill: tuple[int, int, int]) -> None:
    box = (cx - half, cy - half, cx + half, cy + half)
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        # Apex up; the centre (cx, cy) lies inside, half-way up.
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=fill)
    else:
        raise KeyError(f"unknown shape {shape!r}; known: {list(SHAPES)}")
