"""The procedural image world: captioned pictures of shapes, colours, patterns and styles.

Every picture is a `Scene` (what is in it) rendered by `render(scene, size, rng)`; the same
(seed, index) always gives the same scene and the same pixels, so datasets are reproducible
without shipping them. The world has three kinds of content and style:

- pretraining: `SHAPES` drawn "flat" in `COLOURS` over a `PATTERNS` background; the embedded
  Stable Diffusion model only ever sees these (minus `heldout_prompt_scenes`, kept for evaluation);
- novel: `NOVEL_CONTENT` (a crescent "moon") and `NOVEL_STYLE` ("neon" glow outlines), never seen
  in pretraining: what users customize in the demo and what the quality benchmark measures;
- auxiliary: `AUX_CONTENTS` and `AUX_STYLES`, also never in pretraining, the partner concepts that
  Break-for-Make's multi-correspondence training cycles through.

Captions read like "a red star on a striped blue background"; styled scenes read like
"a star in neon style".

The leaky world (composition benchmark, issue 24) adds what a real user's sets have and the sets above
designed out: each `LEAKY_STYLES` set shows one subject only (`LEAKY_SUBJECTS`, "a heart in sketch
style"), so a style LoRA also learns that subject; each leaky content set shows its content in one
fixed, unnamed appearance (`LEAKY_APPEARANCE`, shaded clay on a wooden ground, captioned "a moon"),
which a composition must replace. The leaky styles re-render the shape (strokes along it, a woven
texture over its surface, engraved metal in light) instead of overlaying it, and share no token with
the leaky contents' names. `render` draws any content in any style: the oracle of every pair.
A content of `NONE_CONTENT` draws the style's ground with no shape (the judges' "none" answer).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("circle", "square", "triangle", "star", "heart", "hexagon", "cross", "diamond")
NOVEL_CONTENT = "moon"
AUX_CONTENTS = ("arrow", "ring", "bolt")
ALL_CONTENTS = SHAPES + (NOVEL_CONTENT,) + AUX_CONTENTS

# Named colours as sRGB; one palette serves objects and backgrounds (never the same in one scene).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "orange": (245, 135, 20),
    "yellow": (250, 220, 30),
    "green": (30, 170, 60),
    "blue": (30, 80, 220),
    "purple": (135, 45, 185),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
PATTERNS = ("plain", "striped", "dotted", "checkered")

FLAT_STYLE = "flat"  # the pretraining rendering: a filled shape over a patterned background
NOVEL_STYLE = "neon"
AUX_STYLES = ("pixel", "blueprint", "watercolor")
ALL_STYLES = (FLAT_STYLE, NOVEL_STYLE) + AUX_STYLES

# The leaky world (see the module docstring).
LEAKY_CONTENTS = (NOVEL_CONTENT,) + AUX_CONTENTS
LEAKY_STYLES = ("sketch", "tweed", "etched")
LEAKY_SUBJECTS = {"sketch": "heart", "tweed": "star", "etched": "hexagon"}  # the one shape each style set shows
LEAKY_APPEARANCE = "clay"  # the fixed look of every leaky content set, never named in its captions
NONE_CONTENT = "none"  # no shape: the ground of a style alone
TRUSTED_CONTENTS = ALL_CONTENTS + (NONE_CONTENT,)
TRUSTED_STYLES = ALL_STYLES + LEAKY_STYLES + (LEAKY_APPEARANCE,)

# Held-out compositions: this fraction of (shape, colour, pattern, background) tuples never appears
# in pretraining captions, so prompt-following is measured on combinations the model never saw.
HELDOUT_FRACTION = 0.1
SHORT_CAPTION_PROBABILITY = 0.25  # "a red star" with no background clause, so short prompts work


@dataclass(frozen=True)
class Scene:
    """What one picture shows; `style` other than "flat" ignores colour/pattern/background."""

    content: str
    colour: str
    pattern: str
    background: str
    style: str = FLAT_STYLE
    short_caption: bool = False

    def caption(self) -> str:
        if self.style == LEAKY_APPEARANCE:  # the appearance a content set never names
            return f"{_article(self.content)} {self.content}"
        if self.style != FLAT_STYLE:
            return f"{_article(self.content)} {self.content} in {self.style} style"
        if self.short_caption:
            return f"{_article(self.colour)} {self.colour} {self.content}"
        return f"{_article(self.colour)} {self.colour} {self.content} on a {self.pattern} {self.background} background"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# Scene sampling (which scenes exist, which are held out)
# ---------------------------------------------------------------------------------------------


def _is_heldout(shape: str, colour: str, pattern: str, background: str) -> bool:
    # A hash rather than an RNG draw: membership is a fixed property of the tuple, stable across
    # versions of numpy and independent of the order in which scenes are enumerated.
    digest = hashlib.sha256(f"{shape}|{colour}|{pattern}|{background}".encode()).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < HELDOUT_FRACTION


def flat_tuples() -> list[tuple[str, str, str, str]]:
    """Every valid (shape, colour, pattern, background) of the pretraining world."""
    return [
        (shape, colour, pattern, background)
        for shape, colour, pattern, background in itertools.product(SHAPES, COLOURS, PATTERNS, COLOURS)
        if colour != background
    ]


def heldout_prompt_scenes(count: int = 64) -> list[Scene]:
    """A fixed list of held-out full-caption scenes (never in pretraining), for prompt accuracy."""
    heldout = [t for t in flat_tuples() if _is_heldout(*t)]
    if count > len(heldout):
        raise ValueError(f"only {len(heldout)} held-out compositions exist; asked for {count}")
    # Evenly spaced over the (shape-major) list, so every shape and colour shows up.
    picks = np.linspace(0, len(heldout) - 1, count).round().astype(int)
    return [Scene(*heldout[i]) for i in picks]


def _flat_scene(rng: np.random.Generator, contents: tuple[str, ...], exclude_heldout: bool) -> Scene:
    while True:
        content = contents[rng.integers(len(contents))]
        colour, background = rng.choice(list(COLOURS), size=2, replace=False)
        pattern = PATTERNS[rng.integers(len(PATTERNS))]
        if exclude_heldout and _is_heldout(content, colour, pattern, background):
            continue
        short = bool(rng.random() < SHORT_CAPTION_PROBABILITY)
        return Scene(content, str(colour), pattern, str(background), FLAT_STYLE, short)


def pretraining_scene(rng: np.random.Generator) -> Scene:
    """A scene the embedded base model may see: pretraining shapes, flat style, no held-out tuple."""
    return _flat_scene(rng, SHAPES, exclude_heldout=True)


def content_scene(rng: np.random.Generator, content: str) -> Scene:
    """`content` drawn flat over a random pretraining colour/background (a content-set picture)."""
    return _flat_scene(rng, (content,), exclude_heldout=False)


def style_scene(rng: np.random.Generator, style: str) -> Scene:
    """A random pretraining shape rendered in `style` (a style-set picture)."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    return Scene(shape, "", "", "", style)


def judge_scene(rng: np.random.Generator) -> Scene:
    """Any content in any style, for training and checking the judges."""
    style = ALL_STYLES[rng.integers(len(ALL_STYLES))] if rng.random() < 0.4 else FLAT_STYLE
    content = ALL_CONTENTS[rng.integers(len(ALL_CONTENTS))]
    if style == FLAT_STYLE:
        return _flat_scene(rng, (content,), exclude_heldout=False)
    return Scene(content, "", "", "", style)


def trusted_judge_scene(rng: np.random.Generator) -> Scene:
    """Any content (or none) in any style of the leaky world too, for training the trusted judges: a
    tenth of the pictures have no shape, half are styled."""
    content = NONE_CONTENT if rng.random() < 0.1 else ALL_CONTENTS[rng.integers(len(ALL_CONTENTS))]
    if rng.random() < 0.5:
        styles = TRUSTED_STYLES[1:]
        return Scene(content, "", "", "", styles[rng.integers(len(styles))])
    colour, background = rng.choice(list(COLOURS), size=2, replace=False)
    return Scene(content, str(colour), PATTERNS[rng.integers(len(PATTERNS))], str(background), FLAT_STYLE)


def leaky_content_scene(rng: np.random.Generator, content: str) -> Scene:
    """A leaky content-set picture: `content` in the fixed clay appearance."""
    return Scene(content, "", "", "", LEAKY_APPEARANCE)


def leaky_style_scene(rng: np.random.Generator, style: str) -> Scene:
    """A leaky style-set picture: the style's one subject."""
    return Scene(LEAKY_SUBJECTS[style], "", "", "", style)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for picture `index` of stream `seed`: pictures are independent of each other."""
    return np.random.default_rng([seed, index])


# ---------------------------------------------------------------------------------------------
# Geometry: each content is a mask drawn on a supersampled canvas
# ---------------------------------------------------------------------------------------------

_SUPERSAMPLE = 4


def _polygon(
    points: list[tuple[float, float]], cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    cos_a, sin_a = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos_a - y * sin_a), cy + r * (x * sin_a + y * cos_a)) for x, y in points]


def _regular(n: int, phase: float = -math.pi / 2) -> list[tuple[float, float]]:
    return [(math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]


def _star_points() -> list[tuple[float, float]]:
    outer, inner = _regular(5), _regular(5, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, [(0.45 * x, 0.45 * y) for x, y in inner]) for p in pair]


def _heart_points() -> list[tuple[float, float]]:
    # The classic parametric heart, scaled into the unit disc, point down.
    points = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((x / 17, -y / 17 - 0.1))
    return points


_OUTLINES: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": _regular(3),
    "star": _star_points(),
    "heart": _heart_points(),
    "hexagon": _regular(6),
    "cross": [
        (-0.3, -1),
        (0.3, -1),
        (0.3, -0.3),
        (1, -0.3),
        (1, 0.3),
        (0.3, 0.3),
        (0.3, 1),
        (-0.3, 1),
        (-0.3, 0.3),
        (-1, 0.3),
        (-1, -0.3),
        (-0.3, -0.3),
    ],
    "diamond": [(0, -1), (0.65, 0), (0, 1), (-0.65, 0)],
    "arrow": [(-1, -0.25), (0.2, -0.25), (0.2, -0.65), (1, 0), (0.2, 0.65), (0.2, 0.25), (-1, 0.25)],
    "bolt": [(0.2, -1), (-0.55, 0.15), (-0.05, 0.15), (-0.25, 1), (0.55, -0.2), (0.05, -0.2), (0.35, -1)],
}


def content_mask(content: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A float mask in [0, 1] of shape (size, size) with `content` at a random place, size and tilt."""
    cx, cy = rng.uniform(0.38, 0.62, size=2).tolist()
    r = float(rng.uniform(0.24, 0.32))
    angle = float(rng.uniform(-0.35, 0.35))  # small tilt: a tilted star is still a star
    return shape_mask(content, size, cx, cy, r, angle)


def shape_mask(content: str, size: int, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """`content` centred at (cx, cy) with radius r (fractions of the side), tilted by `angle` radians."""
    canvas = size * _SUPERSAMPLE
    cx, cy, r = cx * canvas, cy * canvas, r * canvas
    image = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(image)
    if content == NONE_CONTENT:
        pass  # the same draws as any content, so a shapeless picture's ground varies like the others'
    elif content == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif content == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
    elif content == "moon":
        # A crescent: a disc with an offset disc cut out, opening towards the tilt direction.
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        ox, oy = cx + 0.55 * r * math.cos(angle), cy + 0.55 * r * math.sin(angle)
        draw.ellipse((ox - 0.85 * r, oy - 0.85 * r, ox + 0.85 * r, oy + 0.85 * r), fill=0)
    elif content in _OUTLINES:
        draw.polygon(_polygon(_OUTLINES[content], cx, cy, r, angle), fill=255)
    else:
        raise ValueError(f"unknown content {content!r}; known: {', '.join(ALL_CONTENTS)}")
    # Box downsampling of the supersampled canvas gives anti-aliased edges.
    return np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLOURS[name], dtype=np.float32)


def background_tones(colour: str) -> tuple[np.ndarray, np.ndarray]:
    """The two float RGB tones of a patterned `colour` background: the colour and a tint of it."""
    base = _rgb(colour)
    # The second tone moves the colour towards grey-ish contrast so the base colour stays readable.
    tint = base * 0.55 + (255 - base) * 0.25 if colour != "black" else np.full(3, 85, np.float32)
    if colour == "white":
        tint = np.full(3, 175, np.float32)
    return base, tint


def _background(pattern: str, colour: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float RGB: `colour` alternating with a tint of itself in `pattern`."""
    base, tint = background_tones(colour)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    period = float(rng.uniform(10, 14)) * size / 64
    offset = float(rng.uniform(0, period))
    if pattern == "plain":
        second = np.zeros((size, size), np.float32)
    elif pattern == "striped":
        theta = float(rng.choice([0.0, math.pi / 2, math.pi / 4, -math.pi / 4]))
        u = xx * math.cos(theta) + yy * math.sin(theta) + offset
        second = ((u % period) < period / 2).astype(np.float32)
    elif pattern == "dotted":
        du = (xx + offset) % period - period / 2
        dv = (yy + offset) % period - period / 2
        second = (du**2 + dv**2 < (period * 0.28) ** 2).astype(np.float32)
    elif pattern == "checkered":
        second = ((((xx + offset) // period) + ((yy + offset) // period)) % 2).astype(np.float32)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")
    return base * (1 - second[..., None]) + tint * second[..., None]


def _outline(mask: np.ndarray, width: int) -> np.ndarray:
    image = Image.fromarray((mask * 255).astype(np.uint8))
    grown = np.asarray(image.filter(ImageFilter.MaxFilter(2 * width + 1)), np.float32) / 255
    shrunk = np.asarray(image.filter(ImageFilter.MinFilter(2 * width + 1)), np.float32) / 255
    return np.clip(grown - shrunk, 0, 1)


def _blur(array: np.ndarray, radius: float) -> np.ndarray:
    image = Image.fromarray(np.clip(array * 255, 0, 255).astype(np.uint8))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


NEON_PALETTE = ((255, 40, 200), (40, 240, 255), (140, 255, 40))
PIXEL_PALETTE = ((15, 56, 15), (48, 98, 48), (139, 172, 15), (155, 188, 15))  # four greens
WATERCOLOR_PALETTE = ((230, 120, 130), (110, 160, 220), (120, 190, 140), (235, 180, 90))


def render(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw `scene` as a (size × size) RGB picture; geometry and texture jitter come from `rng`."""
    mask = content_mask(scene.content, size, rng)
    a = mask[..., None]
    noise = rng.normal(0, 1, (size, size, 1)).astype(np.float32)
    if scene.style == FLAT_STYLE:
        image = _background(scene.pattern, scene.background, size, rng) * (1 - a) + _rgb(scene.colour) * a
    elif scene.style == "neon":
        # Dark navy ground, the shape only as a bright outline with a soft glow around it.
        colour = np.asarray(NEON_PALETTE[rng.integers(len(NEON_PALETTE))], np.float32)
        line = _outline(mask, max(1, size // 40))
        glow = _blur(line, size / 24)
        ground = np.asarray((12, 10, 40), np.float32) + 4 * noise
        light = np.clip(line + 0.8 * glow, 0, 1)[..., None]
        image = ground * (1 - light) + colour * light
    elif scene.style == "pixel":
        # Blocky 12x12 rendering on a four-green palette: "pixel art".
        cells = 12
        small = (
            np.asarray(
                Image.fromarray((mask * 255).astype(np.uint8)).resize((cells, cells), Image.Resampling.BOX), np.float32
            )
            / 255
        )
        shade = (np.add.outer(np.arange(cells), np.arange(cells)) % 2).astype(np.float32)
        palette = np.asarray(PIXEL_PALETTE, np.float32)
        # Inside the shape the two dark greens alternate, outside the two light ones.
        index = np.where(small > 0.5, shade, 3 - shade).astype(int)
        image = np.asarray(
            Image.fromarray(palette[index].astype(np.uint8)).resize((size, size), Image.Resampling.NEAREST), np.float32
        )
    elif scene.style == "blueprint":
        # Blue paper with a fine grid; the shape as a thin white outline with light hatching inside.
        yy, xx = np.mgrid[0:size, 0:size]
        grid = (((xx % 8) == 0) | ((yy % 8) == 0)).astype(np.float32)[..., None]
        ground = (
            np.asarray((25, 70, 150), np.float32) * (1 - 0.35 * grid)
            + np.asarray((90, 140, 210), np.float32) * 0.35 * grid
        )
        hatch = ((((xx + yy) % 6) == 0).astype(np.float32) * mask)[..., None] * 0.5
        line = np.clip(_outline(mask, max(1, size // 64))[..., None] + hatch, 0, 1)
        image = ground * (1 - line) + np.asarray((235, 240, 255), np.float32) * line
    elif scene.style == "watercolor":
        # Cream paper, a pastel blot with soft edges, a darker rim and grainy pigment.
        colour = np.asarray(WATERCOLOR_PALETTE[rng.integers(len(WATERCOLOR_PALETTE))], np.float32)
        soft = _blur(mask, size / 40)
        rim = np.clip(soft - _blur(mask, size / 14) * 0.8, 0, 1)
        paper = np.asarray((245, 236, 215), np.float32) + 6 * noise
        pigment = colour * (0.9 + 0.08 * noise) - 60 * rim[..., None]
        coverage = np.clip(soft * (0.75 + 0.15 * noise[..., 0]), 0, 1)[..., None]
        image = paper * (1 - coverage) + pigment * coverage
    elif scene.style in LEAKY_RENDERERS:
        image = LEAKY_RENDERERS[scene.style](mask, size, rng, noise)
    else:
        raise ValueError(f"unknown style {scene.style!r}; known: {', '.join(TRUSTED_STYLES)}")
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8), "RGB")


def _height(mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A smooth bump over the shape and its gradient (dy, dx): what light and texture follow."""
    height = _blur(mask, size / 16) * mask
    dy, dx = np.gradient(height)
    return height, dy * size / 8, dx * size / 8


def _clay(mask: np.ndarray, size: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Terracotta lit from the upper left, fine grain, a soft shadow on a wooden ground."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    grain = np.sin(yy * 0.9 + 2.5 * np.sin(xx * 0.15)) * 0.5 + 0.5
    wood = np.asarray((150, 98, 58), np.float32) * (0.85 + 0.15 * grain[..., None]) + 5 * noise
    shadow = np.roll(_blur(mask, size / 20), (max(1, size // 24), max(1, size // 24)), axis=(0, 1))
    ground = wood * (1 - 0.45 * shadow[..., None])
    _, dy, dx = _height(mask, size)
    light = np.clip(0.75 - 1.2 * (dx + dy), 0.35, 1.3)[..., None]
    clay = np.asarray((205, 112, 78), np.float32) * light * (1 + 0.06 * noise)
    a = mask[..., None]
    return ground * (1 - a) + clay * a


def _sketch(mask: np.ndarray, size: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Pencil on paper: a wobbly outline and hatching strokes whose density follows the shading."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    paper = np.asarray((238, 234, 222), np.float32) + 4 * noise
    _, dy, dx = _height(mask, size)
    shade = np.clip(0.5 + 1.5 * (dx + dy), 0, 1)  # darker away from the light
    period = max(3.0, size / 16)
    hatch = (((xx + yy + float(rng.uniform(0, period))) % period) < period * (0.2 + 0.4 * shade)).astype(np.float32)
    cross = (((xx - yy) % period) < period * 0.3).astype(np.float32) * (shade > 0.6)
    strokes = np.clip(hatch + cross, 0, 1) * mask
    line = _outline(np.clip(mask + 0.08 * noise[..., 0], 0, 1), max(1, size // 48))
    ink = np.clip(strokes * 0.6 + line, 0, 1)[..., None]
    return paper * (1 - ink) + np.asarray((55, 55, 70), np.float32) * ink


def _tweed(mask: np.ndarray, size: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Woven wool: a herringbone of two yarn colours over the shape, bent by its surface, on felt."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    height, _, _ = _height(mask, size)
    warp = xx + 6 * height  # the weave follows the bump of the surface
    period = max(4.0, size / 12)
    zig = np.abs(((yy + warp * 0.0) % (2 * period)) - period)
    herring = (((warp + zig) % period) < period / 2).astype(np.float32)
    yarn = np.where(herring[..., None] > 0, (120, 95, 60), (70, 85, 60)).astype(np.float32)
    yarn = yarn * (0.85 + 0.3 * height[..., None]) + 10 * noise
    felt = np.asarray((60, 45, 70), np.float32) + 6 * noise
    a = mask[..., None]
    return felt * (1 - a) + yarn * a


def _etched(mask: np.ndarray, size: int, rng: np.random.Generator, noise: np.ndarray) -> np.ndarray:
    """Engraved steel: a metal plate lit by one light, fine engraved lines across the shape, a rim."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    _, dy, dx = _height(mask, size)
    plate = np.asarray((40, 44, 52), np.float32) + 3 * noise
    light = np.clip(0.55 - 2.0 * (dx + dy), 0, 1)
    specular = np.clip(1.0 - 3.0 * np.abs(dx + dy + 0.15), 0, 1) ** 3
    lines = (((yy * 0.8 + xx * 0.3) % max(2.0, size / 24)) < 1).astype(np.float32)
    steel = (120 + 110 * light + 90 * specular - 40 * lines)[..., None] * np.asarray((0.95, 0.98, 1.0), np.float32)
    rim = _outline(mask, max(1, size // 64))[..., None]
    a = mask[..., None]
    return plate * (1 - a) + steel * a * (1 - rim) + np.asarray((230, 235, 245), np.float32) * rim * a


LEAKY_RENDERERS = {LEAKY_APPEARANCE: _clay, "sketch": _sketch, "tweed": _tweed, "etched": _etched}


def render_array(scenes: list[Scene], seed: int, start: int, size: int) -> np.ndarray:
    """(len(scenes), size, size, 3) uint8 renders of `scenes`, picture i drawn with scene_rng(seed, start + i)."""
    return np.stack([np.asarray(render(s, size, scene_rng(seed, start + i))) for i, s in enumerate(scenes)])


# ---------------------------------------------------------------------------------------------
# Streams and shipped sets
# ---------------------------------------------------------------------------------------------


def sample_stream(kind: str, seed: int, count: int, start: int = 0) -> Iterator[tuple[Scene, np.random.Generator]]:
    """Scenes of `kind` ("pretraining", "judge" or "trusted-judge") with the generator that renders each one."""
    sampler = {"pretraining": pretraining_scene, "judge": judge_scene, "trusted-judge": trusted_judge_scene}[kind]
    for index in range(start, start + count):
        rng = scene_rng(seed, index)
        yield sampler(rng), rng


def render_stream(kind: str, seed: int, count: int, size: int, start: int = 0) -> tuple[np.ndarray, list[Scene]]:
    """Render `count` pictures of stream (kind, seed) from `start`: (N, size, size, 3) uint8 and scenes."""
    scenes, images = [], []
    for scene, rng in sample_stream(kind, seed, count, start):
        scenes.append(scene)
        images.append(np.asarray(render(scene, size, rng)))
    return np.stack(images), scenes


def concept_sets() -> dict[str, dict[str, str]]:
    """Name -> description of every shipped image set: the novel ones and the auxiliary ones."""
    sets = {f"content-{NOVEL_CONTENT}": {"kind": "content", "concept": NOVEL_CONTENT, "role": "novel"}}
    sets[f"style-{NOVEL_STYLE}"] = {"kind": "style", "concept": NOVEL_STYLE, "role": "novel"}
    for content in AUX_CONTENTS:
        sets[f"content-{content}"] = {"kind": "content", "concept": content, "role": "auxiliary"}
    for style in AUX_STYLES:
        sets[f"style-{style}"] = {"kind": "style", "concept": style, "role": "auxiliary"}
    return sets


def leaky_sets() -> dict[str, dict[str, str]]:
    """Name -> description of the leaky world's sets (rendered on demand, not shipped)."""
    sets = {f"leaky-content-{c}": {"kind": "content", "concept": c, "role": "leaky"} for c in LEAKY_CONTENTS}
    sets.update({f"leaky-style-{s}": {"kind": "style", "concept": s, "role": "leaky"} for s in LEAKY_STYLES})
    return sets


def write_concept_set(folder: str | Path, name: str, count: int, seed: int, size: int = 64) -> Path:
    """Render set `name` (shipped or leaky) into `folder` as PNGs plus a `metadata.jsonl` of captions and labels."""
    spec = {**concept_sets(), **leaky_sets()}[name]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # Each set gets its own stream so adding a set never changes another set's pictures.
    set_seed = int.from_bytes(hashlib.sha256(f"{seed}|{name}".encode()).digest()[:4], "little")
    rows = []
    for index in range(count):
        rng = scene_rng(set_seed, index)
        if spec["role"] == "leaky":
            draw = leaky_content_scene if spec["kind"] == "content" else leaky_style_scene
        else:
            draw = content_scene if spec["kind"] == "content" else style_scene
        scene = draw(rng, spec["concept"])
        file_name = f"{index:03d}.png"
        render(scene, size, rng).save(folder / file_name, optimize=True)
        rows.append({"file_name": file_name, "text": scene.caption(), **asdict(scene)})
    with open(folder / "metadata.jsonl", "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return folder


def caption_words() -> list[str]:
    """Every word a pretraining caption can use (the tiny CLIP tokenizer's whole-word vocabulary)."""
    words = {"a", "an", "on", "background", "in", "style"} | set(SHAPES) | set(COLOURS) | set(PATTERNS)
    return sorted(words)
