"""Non-fundus images: what the gate learns to refuse.

Two sources, both available offline:

- **Rendered** (`render_negative`): flat colours, gradients, noise, stripes and checkerboards, random
  shapes, text, and plain discs on black (a bright disc alone is not a fundus photograph: the gate must
  look for vessels and a disc, not just a round field), each with random colours and sizes.
- **Photographic**: scikit-image's bundled sample images (`skimage_samples`), split by name into those
  the gate trains on (`SKIMAGE_TRAIN`) and those it never sees in training (`SKIMAGE_HELD_OUT`), so
  the evaluation can tell memorised images from new ones. `retina` (a real fundus photograph) is not a
  negative and is kept out of training altogether: it is a held-out positive.

Every training negative is drawn afresh from a seeded stream, with random crops, flips and colour
changes of the photographic ones.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

SKIMAGE_TRAIN: tuple[str, ...] = (
    "astronaut", "camera", "coins", "brick", "grass", "moon", "text", "horse", "binary_blobs",
    "hubble_deep_field", "immunohistochemistry", "shepp_logan_phantom",
)
SKIMAGE_HELD_OUT: tuple[str, ...] = (
    "cat", "chelsea", "coffee", "rocket", "clock", "colorwheel", "page", "gravel", "logo", "cell",
    "checkerboard", "lfw_subset", "microaneurysms",
)
"""Never used in training: the evaluation's unseen photographic negatives. `microaneurysms` is a grey
crop of a retina (no field, no colour): not a fundus photograph either."""
SKIMAGE_FUNDUS = "retina"
"""scikit-image's one real fundus photograph: a held-out positive."""


def _rgb(array: np.ndarray) -> Image.Image:
    """Any scikit-image sample array (bool, float, grey, RGBA, a stack) -> an 8-bit RGB image."""
    if array.ndim == 3 and array.shape[-1] not in (3, 4):  # a stack of images (lfw_subset): the first
        array = array[0]
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = ((array - low) / max(high - low, 1e-9) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.getchannel("A"))
        return background
    image = image.convert("RGB")
    if min(image.size) < 64:  # a 25-px face: upscale to a size a camera would give
        image = image.resize((image.width * 8, image.height * 8), Image.Resampling.BICUBIC)
    return image


def skimage_samples(names: tuple[str, ...]) -> dict[str, Image.Image]:
    """scikit-image's bundled sample images by name, as RGB images."""
    import skimage.data

    return {name: _rgb(np.asarray(getattr(skimage.data, name)())) for name in names}


def skimage_fundus() -> Image.Image:
    """scikit-image's bundled fundus photograph (`skimage.data.retina`)."""
    return skimage_samples((SKIMAGE_FUNDUS,))[SKIMAGE_FUNDUS]


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _flat(rng: np.random.Generator, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), _colour(rng))


def _gradient(rng: np.random.Generator, size: int) -> Image.Image:
    a, b = np.array(_colour(rng), float), np.array(_colour(rng), float)
    angle = rng.uniform(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size] / size
    t = np.clip((x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle) + 0.5, 0, 1)[..., None]
    return Image.fromarray((a * (1 - t) + b * t).astype(np.uint8))


def _noise(rng: np.random.Generator, size: int) -> Image.Image:
    scale = int(rng.choice([1, 4, 16]))
    small = rng.normal(128, rng.uniform(10, 80), (size // scale, size // scale, 1 if rng.random() < 0.3 else 3))
    image = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8).repeat(3 // small.shape[-1], axis=-1))
    return image.resize((size, size), Image.Resampling.BILINEAR)


def _stripes(rng: np.random.Generator, size: int) -> Image.Image:
    period = int(rng.integers(4, size // 3))
    y, x = np.mgrid[0:size, 0:size]
    pattern = ((x // period) + (y // period if rng.random() < 0.5 else 0)) % 2
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    return Image.fromarray(np.where(pattern[..., None] == 1, a, b).astype(np.uint8))


def _shapes(rng: np.random.Generator, size: int) -> Image.Image:
    image = _gradient(rng, size) if rng.random() < 0.5 else _flat(rng, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 25))):
        box = sorted(rng.integers(0, size, 2).tolist()), sorted(rng.integers(0, size, 2).tolist())
        xy = (box[0][0], box[1][0], box[0][1], box[1][1])
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.rectangle(xy, fill=_colour(rng))
        elif kind == 1:
            draw.ellipse(xy, fill=_colour(rng))
        else:
            draw.line(xy, fill=_colour(rng), width=int(rng.integers(1, 8)))
    return image


def _text(rng: np.random.Generator, size: int) -> Image.Image:
    small = Image.new("RGB", (size // 2, size // 2), _colour(rng) if rng.random() < 0.5 else (255, 255, 255))
    draw = ImageDraw.Draw(small)
    font = ImageFont.load_default()
    ink = _colour(rng) if rng.random() < 0.5 else (0, 0, 0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,"))
    for line in range(0, size // 2, 12):
        draw.text((2, line), "".join(rng.choice(letters, 40)), fill=ink, font=font)
    return small.resize((size, size), Image.Resampling.NEAREST)


def _disc(rng: np.random.Generator, size: int) -> Image.Image:
    """A plain disc on black: the round field of a fundus photograph with nothing in it."""
    radius = size * rng.uniform(0.3, 0.5)
    cx, cy = size / 2 + rng.normal(0, size * 0.03, 2)
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    red = int(rng.integers(120, 256))
    reddish = (red, int(red * rng.uniform(0.2, 0.7)), int(red * rng.uniform(0.0, 0.3)))
    fill = Image.new("RGB", (size, size), reddish if rng.random() < 0.7 else _colour(rng))
    if rng.random() < 0.5:
        fill = Image.blend(fill, _noise(rng, size), 0.3)
    return Image.composite(fill, Image.new("RGB", (size, size)), mask)


RENDERERS: tuple[Callable[[np.random.Generator, int], Image.Image], ...] = (
    _flat, _gradient, _noise, _stripes, _shapes, _text, _disc,
)


def render_negative(rng: np.random.Generator, size: int) -> Image.Image:
    """One rendered non-fundus image of `size` x `size` pixels."""
    return RENDERERS[int(rng.integers(len(RENDERERS)))](rng, size)


def photographic_negative(rng: np.random.Generator, sources: list[Image.Image]) -> Image.Image:
    """A random crop (a quarter to all of it), flip and colour change of one of `sources`."""
    image = sources[int(rng.integers(len(sources)))]
    scale = rng.uniform(0.5, 1.0)
    width, height = max(16, int(image.width * scale)), max(16, int(image.height * scale))
    left, top = int(rng.integers(0, image.width - width + 1)), int(rng.integers(0, image.height - height + 1))
    crop = image.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    pixels = np.asarray(crop, dtype=np.float32)
    pixels = pixels * rng.uniform(0.6, 1.3, 3) + rng.uniform(-30, 30)  # per-channel gain: tinted, even reddish
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def negatives(count: int, seed: int, size: int, photographic: dict[str, Image.Image]) -> list[Image.Image]:
    """`count` non-fundus images: half rendered, half from the photographic `sources` (all rendered when
    there are none), from the stream of `seed`."""
    rng = np.random.default_rng([seed, 0x6A7E])
    sources = list(photographic.values())
    return [
        photographic_negative(rng, sources) if sources and i % 2 else render_negative(rng, size)
        for i in range(count)
    ]
