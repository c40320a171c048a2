"""Anatomy of a synthetic fundus photograph: where things are, and the base picture without lesions.

The retina frame (shared with `training.synth.lesions`) has its origin at the fovea, x nasal (towards
the optic disc), y superior, unit = the field-of-view radius. `Anatomy.to_pixels` maps it to the image:
for a right eye the disc lies to the viewer's right of the fovea, for a left eye to the left.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from index.records import Assessment, Eye, FundusRecord
from training.synth.lesions import FIELD_CENTRE

BACKGROUND_GRID = 128
"""Side of the low-resolution grid the smooth background is computed on before upsampling."""

FIELD_LIMIT = 1.12
"""Vessels are grown until they leave this distance (field radii) from the field centre."""

FAZ_RADIUS = 0.085
"""Foveal avascular zone: no vessel comes closer to the fovea than this (field radii)."""


@dataclass(frozen=True, slots=True)
class Vessel:
    """One vessel segment: a polyline in the retina frame with a width (field radii) at each point."""

    points: np.ndarray
    widths: np.ndarray
    vein: bool


@dataclass(frozen=True)
class Anatomy:
    """Geometry of one photograph. Pixel quantities are floats in image coordinates."""

    size: int
    radius: float
    centre: tuple[float, float]
    band: float
    side: int
    fovea: tuple[float, float]
    field_centre: tuple[float, float]
    disc: tuple[float, float]
    disc_radius: float
    cup_ratio: float
    disc_state: str
    tortuous: bool
    artery_scale: float
    vessels: tuple[Vessel, ...]

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        """Retina-frame points (n, 2) -> pixel coordinates (n, 2)."""
        xy = np.asarray(xy, dtype=float)
        px = self.fovea[0] + self.side * xy[..., 0] * self.radius
        py = self.fovea[1] - xy[..., 1] * self.radius
        return np.stack([px, py], axis=-1)

    def to_retina(self, pxy: np.ndarray) -> np.ndarray:
        """Pixel coordinates (n, 2) -> retina-frame points (n, 2)."""
        pxy = np.asarray(pxy, dtype=float)
        x = (pxy[..., 0] - self.fovea[0]) / (self.side * self.radius)
        y = (self.fovea[1] - pxy[..., 1]) / self.radius
        return np.stack([x, y], axis=-1)

    def visible(self, xy: np.ndarray, margin: float = 0.0) -> np.ndarray:
        """Mask of retina-frame points inside the visible field, `margin` (field radii) from its edge."""
        p = self.to_pixels(xy)
        dx, dy = p[..., 0] - self.centre[0], p[..., 1] - self.centre[1]
        limit = self.radius * (1.0 - margin)
        return (np.hypot(dx, dy) <= limit) & (np.abs(dy) <= self.band - margin * self.radius)

    def disc_pixels(self) -> tuple[float, float]:
        """Centre of the optic disc in pixels."""
        x, y = self.to_pixels(np.array(self.disc))
        return float(x), float(y)


def build_anatomy(record: FundusRecord, size: int, rng: np.random.Generator) -> Anatomy:
    """Lay out one photograph for a record: field of view (with an off-centre field when `image_field` is
    abnormal), laterality from `exam_eye` (random when missing), disc and cup (larger cup when
    `increased_cup_disc`, pallor or swelling when `optic_disc` is abnormal) and the vessel tree
    (tortuous when `vessels` is abnormal, narrow arteries with hypertensive retinopathy)."""
    if record.exam_eye is None:
        side = 1 if rng.random() < 0.5 else -1
    else:
        side = 1 if record.exam_eye == Eye.RIGHT else -1
    radius = size * rng.uniform(0.455, 0.49)
    centre = (size / 2 + rng.normal(0, 0.006) * size, size / 2 + rng.normal(0, 0.006) * size)
    # Some cameras' masks crop the circular field at top and bottom.
    band = radius * rng.uniform(0.84, 0.93) if rng.random() < 0.35 else radius * 2
    field = (FIELD_CENTRE[0] + rng.normal(0, 0.02), rng.normal(0, 0.02))
    if record.image_field == Assessment.ABNORMAL or (record.quality_adequate is False and rng.random() < 0.3):
        shift, direction = rng.uniform(0.15, 0.28), rng.uniform(0, 2 * math.pi)
        field = (field[0] + shift * math.cos(direction), field[1] + shift * math.sin(direction))
    fovea = (centre[0] - side * field[0] * radius, centre[1] + field[1] * radius)
    disc = (rng.uniform(0.62, 0.70), rng.uniform(0.03, 0.10))
    disc_radius = rng.uniform(0.12, 0.145)
    cup_ratio = rng.uniform(0.6, 0.85) if record.increased_cup_disc else rng.uniform(0.2, 0.45)
    disc_state = "normal"
    if record.optic_disc == Assessment.ABNORMAL:
        disc_state = "pallor" if rng.random() < 0.6 else "swelling"
    tortuous = record.vessels == Assessment.ABNORMAL and rng.random() < 0.6
    artery_scale = rng.uniform(0.55, 0.7) if record.hypertensive_retinopathy else 1.0
    vessels = _vessel_tree(disc, field, tortuous, artery_scale, rng)
    return Anatomy(
        size=size,
        radius=radius,
        centre=centre,
        band=band,
        side=side,
        fovea=fovea,
        field_centre=field,
        disc=disc,
        disc_radius=disc_radius,
        cup_ratio=cup_ratio,
        disc_state=disc_state,
        tortuous=tortuous,
        artery_scale=artery_scale,
        vessels=tuple(vessels),
    )


# -- vessel tree --------------------------------------------------------------------------------

_STEP = 0.02
_KERNEL = np.hanning(11) / np.hanning(11).sum() * 2.0


def _walk(
    start: np.ndarray,
    heading: float,
    length: float,
    width: tuple[float, float],
    curvature: float,
    wiggle: float,
    field: tuple[float, float],
    rng: np.random.Generator,
    decay: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random path from `start`: heading turns at `curvature` rad per field radius (fading
    with arc length over `decay`, if given) plus smoothed noise; cut where it leaves the field or reaches
    the foveal avascular zone."""
    n = max(3, int(length / _STEP))
    noise = np.convolve(rng.normal(0.0, 1.0, n + len(_KERNEL) - 1), _KERNEL, mode="valid")
    bend = np.full(n, curvature)
    if decay is not None:
        bend = curvature * np.exp(-np.arange(n) * _STEP / decay)
    headings = heading + np.cumsum(bend * _STEP + wiggle * noise * math.sqrt(_STEP))
    steps = _STEP * np.stack([np.cos(headings), np.sin(headings)], axis=1)
    points = np.vstack([start, start + np.cumsum(steps, axis=0)])
    widths = np.linspace(width[0], width[1], n + 1)
    outside = np.hypot(points[:, 0] - field[0], points[:, 1] - field[1]) > FIELD_LIMIT
    in_faz = np.hypot(points[:, 0], points[:, 1]) < FAZ_RADIUS
    stop = np.flatnonzero(outside | in_faz)
    end = int(stop[0]) + 1 if len(stop) else len(points)
    return points[:end], widths[:end]


def _vessel_tree(
    disc: tuple[float, float],
    field: tuple[float, float],
    tortuous: bool,
    artery_scale: float,
    rng: np.random.Generator,
) -> list[Vessel]:
    """Arteries and veins leaving the disc in four main trunks (the temporal arcades arching around the
    macula, two nasal trunks), each with two generations of tapering branches."""
    vessels: list[Vessel] = []
    # Trunks curve smoothly; branches meander more; an abnormal (tortuous) tree meanders everywhere.
    wiggle = 0.9 if tortuous else 0.3
    trunk_wiggle = 0.6 if tortuous else 0.12
    centre = np.array(disc)
    for vein in (True, False):
        base_width = 0.023 if vein else 0.016 * artery_scale
        offset = 0.0 if vein else rng.uniform(0.08, 0.2)
        # (heading deg, curvature, decay, length, fovea side of the trunk: +1 left of heading, -1 right).
        # The temporal arcades bend hard near the disc and straighten as they pass the macula.
        arch = rng.normal(2.5, 0.2)
        trunks = (
            (100 + rng.normal(0, 6) + offset * 40, arch, 0.6, 1.9, 1),
            (-100 + rng.normal(0, 6) - offset * 40, -arch, 0.6, 1.9, -1),
            (50 + rng.normal(0, 10) - offset * 60, rng.normal(-0.25, 0.25), None, 1.0, 0),
            (-50 + rng.normal(0, 10) + offset * 60, rng.normal(0.25, 0.25), None, 1.0, 0),
        )
        for heading_deg, curvature, decay, length, fovea_side in trunks:
            # Vessels emerge across the cup, not from one point.
            start = centre + rng.normal(0, 0.02, 2)
            heading = math.radians(heading_deg)
            points, widths = _walk(
                start,
                heading,
                length,
                (base_width, base_width * 0.45),
                curvature,
                trunk_wiggle,
                field,
                rng,
                decay,
            )
            vessels.append(Vessel(points, widths, vein))
            _branch(vessels, points, widths, vein, fovea_side, wiggle, field, rng, depth=0)
        # Small vessels leaving the disc towards the macula and nasally.
        for heading_deg in (180 + rng.normal(0, 12), rng.normal(0, 15)):
            start = centre + rng.normal(0, 0.015, 2)
            points, widths = _walk(
                start,
                math.radians(heading_deg),
                rng.uniform(0.3, 0.55),
                (base_width * 0.45, base_width * 0.2),
                rng.normal(0, 0.8),
                wiggle * 1.4,
                field,
                rng,
            )
            vessels.append(Vessel(points, widths, vein))
    return vessels


def _branch(
    vessels: list[Vessel],
    points: np.ndarray,
    widths: np.ndarray,
    vein: bool,
    fovea_side: int,
    wiggle: float,
    field: tuple[float, float],
    rng: np.random.Generator,
    depth: int,
) -> None:
    """Grow side branches off a parent path (recursively, two generations)."""
    n = len(points)
    if n < 6:
        return
    count = int(rng.integers(3, 6)) if depth == 0 else int(rng.integers(0, 3))
    for _ in range(count):
        i = int(rng.integers(max(2, n // 8), n - 2))
        tangent = points[min(i + 1, n - 1)] - points[i - 1]
        parent_heading = math.atan2(tangent[1], tangent[0])
        if fovea_side and depth == 0:
            # Arcade branches mostly run away from the macula; the rest feed it.
            side = -fovea_side if rng.random() < 0.7 else fovea_side
        else:
            side = 1 if rng.random() < 0.5 else -1
        towards_fovea = fovea_side != 0 and depth == 0 and side == fovea_side
        turn = side * math.radians(rng.uniform(30, 65))
        width0 = widths[i] * rng.uniform(0.55, 0.78)
        length = rng.uniform(0.2, 0.4) if towards_fovea else rng.uniform(0.3, 0.7) * (0.6 if depth else 1.0)
        child_points, child_widths = _walk(
            points[i],
            parent_heading + turn,
            length,
            (width0, width0 * 0.35),
            side * rng.uniform(-0.3, 1.2),
            wiggle * 1.5,
            field,
            rng,
        )
        if len(child_points) < 3:
            continue
        vessels.append(Vessel(child_points, child_widths, vein))
        if depth == 0:
            _branch(vessels, child_points, child_widths, vein, 0, wiggle, field, rng, depth + 1)


def vessel_masks(anatomy: Anatomy) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Vein, artery and central light-reflex masks ("L", full size), drawn crisp (blur them before
    compositing). Vessels narrower than a pixel are drawn one pixel wide and proportionally fainter."""
    size = anatomy.size
    veins, arteries, reflex = (Image.new("L", (size, size), 0) for _ in range(3))
    draws = {True: ImageDraw.Draw(veins), False: ImageDraw.Draw(arteries)}
    reflex_draw = ImageDraw.Draw(reflex)
    for vessel in anatomy.vessels:
        pixels = anatomy.to_pixels(vessel.points)
        width_px = vessel.widths * anatomy.radius
        draw_polyline(draws[vessel.vein], pixels, width_px)
        wide = width_px >= 3.0
        if wide.sum() >= 2:
            # The light reflex runs along the middle of the larger vessels (brighter on arteries).
            fill = 110 if vessel.vein else 170
            draw_polyline(reflex_draw, pixels[wide], np.maximum(width_px[wide] * 0.28, 1.0), fill=fill)
    return veins, arteries, reflex


def draw_polyline(
    draw: ImageDraw.ImageDraw, pixels: np.ndarray, width_px: np.ndarray, fill: int = 255
) -> None:
    """Draw a polyline whose width varies along it, in runs of constant whole-pixel width."""
    widths = np.maximum(1, np.rint(width_px)).astype(int)
    # Thin vessels are fainter: sub-pixel ones cover less of a pixel, and small vessels carry less blood.
    fills = (np.clip(0.3 + 0.45 * width_px, 0.25, 1.0) * fill).astype(int) // 16 * 16
    keys = widths * 1000 + fills
    breaks = np.flatnonzero(np.diff(keys)) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(keys)]])
    coords = pixels.tolist()
    for s, e in zip(starts, ends, strict=True):
        run = coords[max(0, s - 1) : e]
        if len(run) < 2:
            continue
        draw.line([tuple(p) for p in run], fill=int(fills[s]), width=int(widths[s]), joint="curve")


# -- base picture -------------------------------------------------------------------------------


def paint_background(anatomy: Anatomy, myopic: bool, rng: np.random.Generator) -> Image.Image:
    """The fundus albedo under even illumination: orange-red with choroidal mottling, a darker macula, and
    (myopic eyes) a paler, tessellated fundus. Computed on a coarse grid and upsampled."""
    n = BACKGROUND_GRID
    scale = anatomy.size / n
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    retina = anatomy.to_retina(np.stack([(xs + 0.5) * scale, (ys + 0.5) * scale], axis=-1))
    rx, ry = retina[..., 0], retina[..., 1]
    pigment = rng.uniform(0.0, 1.0)  # 0 lightly pigmented (orange), 1 dark (brown-red)
    colour = np.array([218 - 44 * pigment, 128 - 36 * pigment, 76 - 18 * pigment], dtype=np.float32)
    if myopic:
        colour = colour * np.array([1.02, 1.1, 1.2], dtype=np.float32)
    texture = 0.025 * _smooth_noise(n, 6, rng) + 0.025 * _smooth_noise(n, 48, rng)
    albedo = colour * (1.0 + texture[..., None])
    if myopic:
        # Tessellation: a fine mosaic of dark spaces between the orange choroidal vessels, clearer
        # away from the macula.
        lakes = np.clip((np.abs(_smooth_noise(n, 34, rng)) - 0.3) * 1.8, 0, 1)
        weight = 0.12 * np.clip(np.hypot(rx, ry) / 0.4, 0.3, 1.0)
        albedo *= 1.0 - (weight * lakes)[..., None] * np.array([1.0, 1.15, 1.1], dtype=np.float32)
    # Macula: darker and browner (luteal pigment), strongest at the fovea.
    r_fovea = np.hypot(rx, ry)
    depth = rng.uniform(0.25, 0.42)
    macula = np.exp(-((r_fovea / rng.uniform(0.14, 0.19)) ** 2))
    albedo *= 1.0 - (depth * macula)[..., None] * np.array([0.7, 1.0, 0.9], dtype=np.float32)
    image = Image.fromarray(np.clip(albedo, 0, 255).astype(np.uint8), "RGB")
    return image.resize((anatomy.size, anatomy.size), Image.Resampling.BICUBIC)


def _smooth_noise(n: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-mean, unit-ish smooth noise on an n x n grid with about `cells` features across."""
    coarse = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse, "F").resize((n, n), Image.Resampling.BICUBIC)
    return np.asarray(image)


def paint_disc(image: Image.Image, anatomy: Anatomy, myopic: bool, rng: np.random.Generator) -> None:
    """Draw the optic disc in place: neuroretinal rim, pale cup (cup/disc ratio), optional peripapillary
    atrophy crescent (myopia), pallor or swelling."""
    cx, cy = anatomy.disc_pixels()
    r = anatomy.disc_radius * anatomy.radius
    state = anatomy.disc_state
    if myopic:
        # Peripapillary atrophy: a pale crescent on the temporal side of the disc.
        shift = -anatomy.side * r * 0.28
        over_ellipse(image, (cx + shift, cy), (r * 1.18, r * 1.18), (226, 204, 164), 0.8, r * 0.05)
    if state == "swelling":
        # Swollen disc: larger, hyperaemic, with blurred margins and no visible cup.
        over_ellipse(image, (cx, cy), (r * 1.55, r * 1.65), (238, 168, 112), 0.85, r * 0.3)
        over_ellipse(image, (cx, cy), (r * 1.05, r * 1.15), (248, 196, 146), 0.85, r * 0.25)
        return
    pale = state == "pallor"
    over_ellipse(image, (cx, cy), (r * 1.3, r * 1.38), (236, 160, 100), 0.4, r * 0.2)
    over_ellipse(image, (cx, cy), (r, r * 1.1), (248, 226, 200) if pale else (246, 194, 138), 0.97, r * 0.06)
    over_ellipse(
        image, (cx, cy), (r * 0.8, r * 0.88), (250, 234, 212) if pale else (250, 212, 160), 0.6, r * 0.15
    )
    cup = anatomy.cup_ratio
    cup_shift = -anatomy.side * r * rng.uniform(0.0, 0.15)
    cup_colour = (255, 248, 236) if pale else (255, 240, 205)
    over_ellipse(image, (cx + cup_shift, cy), (r * cup, r * cup * 1.1), cup_colour, 0.92, r * 0.1)
    if rng.random() < 0.5:
        # Foveal light reflex.
        fx, fy = anatomy.fovea
        spot = anatomy.radius * 0.012
        over_ellipse(image, (fx, fy), (spot, spot), (250, 236, 200), 0.45, spot * 0.6)


def over_ellipse(
    image: Image.Image,
    centre: tuple[float, float],
    radii: tuple[float, float],
    colour: tuple[int, int, int],
    opacity: float,
    blur: float,
) -> None:
    """Paint a soft-edged filled ellipse of one colour over `image`, in place (only its box is touched)."""
    margin = int(3 * blur) + 2
    left = max(0, int(centre[0] - radii[0]) - margin)
    top = max(0, int(centre[1] - radii[1]) - margin)
    right = min(image.width, int(centre[0] + radii[0]) + margin + 1)
    bottom = min(image.height, int(centre[1] + radii[1]) + margin + 1)
    if right <= left or bottom <= top:
        return
    box = (left, top, right, bottom)
    mask = Image.new("L", (right - left, bottom - top), 0)
    ImageDraw.Draw(mask).ellipse(
        (
            centre[0] - radii[0] - left,
            centre[1] - radii[1] - top,
            centre[0] + radii[0] - left,
            centre[1] + radii[1] - top,
        ),
        fill=int(255 * opacity),
    )
    if blur > 0.3:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    region = image.crop(box)
    image.paste(Image.composite(Image.new("RGB", region.size, colour), region, mask), box)
