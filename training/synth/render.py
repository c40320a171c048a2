"""Render a synthetic colour fundus photograph that matches a BRSET record's labels.

Each concern draws from its own random stream, split off the caller's generator, so that two records
that differ only in their DR grades get identical pixels except where lesions are drawn:

- base: anatomy (field of view, laterality, disc, vessels), background albedo, camera colour profile;
- lesion: the DR lesion plan (`training.synth.lesions`) and lesion shapes;
- pathology: non-DR findings from the pathology flags and the anatomical assessments;
- quality: illumination, blur, artefacts and sensor noise.

Painting order: albedo -> optic disc -> deep lesions (haemorrhages, exudates, drusen, scars) -> vessels ->
superficial lesions (cotton-wool spots, new vessels, pre-retinal blood) -> illumination -> camera tone
curve -> blur and artefacts -> noise -> field-of-view mask. Masks are drawn with Pillow at full size and
composited only inside their bounding box; smooth fields are computed on a coarse grid and upsampled.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from index.records import Assessment, Eye, FundusRecord
from training.synth.anatomy import (
    BACKGROUND_GRID,
    Anatomy,
    build_anatomy,
    draw_polyline,
    paint_background,
    paint_disc,
    vessel_masks,
)
from training.synth.lesions import (
    INTRARETINAL_HAEMORRHAGES,
    DrawnLesion,
    LesionInventory,
    LesionPlan,
    PlannedLesion,
    plan_lesions,
    quadrant_of,
)

# -- layers -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Style:
    """How a mask is composited: "over" paints `colour` with the mask as opacity, "multiply" tints what
    lies below by `colour` (255 = unchanged). `blur` softens the mask (field radii)."""

    mode: str
    colour: tuple[int, int, int]
    blur: float


_DEEP_STYLES: dict[str, _Style] = {
    "nevus": _Style("over", (92, 92, 84), 0.02),
    "scar_pale": _Style("over", (232, 216, 182), 0.006),
    "laser_pale": _Style("over", (214, 190, 140), 0.006),
    "pigment": _Style("multiply", (84, 66, 62), 0.004),
    "drusen": _Style("over", (232, 204, 128), 0.008),
    "flame": _Style("multiply", (150, 58, 60), 0.004),
    "haem": _Style("multiply", (104, 34, 44), 0.003),
    "exudate": _Style("over", (248, 232, 150), 0.0012),
    "sheath": _Style("over", (236, 228, 214), 0.006),
}
_VESSEL_STYLES: dict[str, _Style] = {
    "vein": _Style("multiply", (136, 76, 96), 0.004),
    "artery": _Style("multiply", (200, 132, 136), 0.004),
    "reflex": _Style("over", (250, 200, 170), 0.004),
    "irma": _Style("multiply", (150, 64, 78), 0.002),
}
_SUPERFICIAL_STYLES: dict[str, _Style] = {
    "nv": _Style("multiply", (150, 70, 82), 0.002),
    "fibrous": _Style("over", (232, 226, 214), 0.012),
    "cws": _Style("over", (236, 230, 212), 0.014),
    "preretinal": _Style("over", (104, 14, 12), 0.003),
    "detachment": _Style("over", (190, 184, 172), 0.03),
    "fold": _Style("over", (222, 216, 206), 0.006),
    "sheen": _Style("over", (255, 250, 240), 0.02),
}
_ARTEFACT_STYLES: dict[str, _Style] = {
    "lash": _Style("multiply", (70, 60, 55), 0.03),
    "dust": _Style("multiply", (150, 140, 136), 0.006),
    "glare": _Style("over", (232, 238, 250), 0.08),
}


class _Layers:
    """Masks ("L", full size) created on first use, one per style name."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.masks: dict[str, Image.Image] = {}
        self.draws: dict[str, ImageDraw.ImageDraw] = {}

    def draw(self, name: str) -> ImageDraw.ImageDraw:
        """The ImageDraw of a layer's mask."""
        if name not in self.draws:
            self.masks[name] = Image.new("L", (self.size, self.size), 0)
            self.draws[name] = ImageDraw.Draw(self.masks[name])
        return self.draws[name]

    def composite(self, image: Image.Image, styles: dict[str, _Style], radius: float) -> None:
        """Composite the layers named in `styles` onto `image`, in place, in the styles' order."""
        for name, style in styles.items():
            mask = self.masks.get(name)
            if mask is not None:
                _composite(image, mask, style, style.blur * radius)


def _soften(mask: Image.Image, blur_px: float) -> Image.Image:
    """Blur a mask by about `blur_px` (a Gaussian sigma); small radii use one box pass, 3x cheaper."""
    if blur_px < 0.35:
        return mask
    if blur_px < 1.5:
        return mask.filter(ImageFilter.BoxBlur(blur_px))
    return mask.filter(ImageFilter.GaussianBlur(blur_px))


def _composite(image: Image.Image, mask: Image.Image, style: _Style, blur_px: float) -> None:
    """Composite one mask onto `image` in place, touching only the mask's bounding box."""
    box = mask.getbbox()
    if box is None:
        return
    margin = int(3 * blur_px) + 2
    box = (
        max(0, box[0] - margin),
        max(0, box[1] - margin),
        min(image.width, box[2] + margin),
        min(image.height, box[3] + margin),
    )
    sub_mask = _soften(mask.crop(box), blur_px)
    region = image.crop(box)
    solid = Image.new("RGB", region.size, style.colour)
    if style.mode == "over":
        region = Image.composite(solid, region, sub_mask)
    else:
        tint = Image.composite(solid, Image.new("RGB", region.size, (255, 255, 255)), sub_mask)
        region = ImageChops.multiply(region, tint)
    image.paste(region, box)


# -- public API ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CameraProfile:
    """A camera's colour rendering: per-channel gain, then gamma, contrast about mid-grey and black lift."""

    gain: tuple[float, float, float]
    gamma: float
    contrast: float
    lift: float


CAMERA_PROFILES: dict[str, CameraProfile] = {
    # Canon CR: bright, warm orange-yellow.
    "Canon CR": CameraProfile(gain=(1.0, 0.98, 0.88), gamma=0.95, contrast=1.0, lift=0.0),
    # Nikon NF5050: darker, redder and more saturated, with a magenta cast.
    "NIKON NF5050": CameraProfile(gain=(0.96, 0.84, 0.98), gamma=1.0, contrast=1.12, lift=0.01),
}
"""The colour profiles of BRSET's two cameras (by their BRSET `camera` value)."""


def camera_profile(camera: str | None, rng: np.random.Generator) -> CameraProfile:
    """The profile of a BRSET camera name (matched on "canon"/"nikon"), jittered per photograph; an
    unknown or missing camera gets a random blend of the two."""
    name = (camera or "").lower()
    canon, nikon = CAMERA_PROFILES["Canon CR"], CAMERA_PROFILES["NIKON NF5050"]
    mix = 0.0 if "canon" in name else 1.0 if "nikon" in name else float(rng.uniform(0.0, 1.0))
    jitter = rng.normal(1.0, 0.025, size=5)
    gain = [_lerp(a, b, mix) * j for a, b, j in zip(canon.gain, nikon.gain, jitter[:3], strict=True)]
    return CameraProfile(
        gain=(gain[0], gain[1], gain[2]),
        gamma=_lerp(canon.gamma, nikon.gamma, mix) * jitter[3],
        contrast=_lerp(canon.contrast, nikon.contrast, mix) * jitter[4],
        lift=_lerp(canon.lift, nikon.lift, mix),
    )


def _lerp(a: float, b: float, t: float) -> float:
    """Linear interpolation from a (t = 0) to b (t = 1)."""
    return a + (b - a) * t


def render_fundus(
    record: FundusRecord, size: int, rng: np.random.Generator
) -> tuple[Image.Image, LesionInventory]:
    """Render a `size` x `size` RGB fundus photograph for `record` and the inventory of what it shows.

    Deterministic for the state of `rng`. DR lesions follow `plan_lesions(record.dr_icdr,
    record.dr_sdrg, ...)`; every lesion keeps its planned quadrant; non-DR findings are inventoried
    under their own names.
    """
    seeds = rng.integers(0, 2**63 - 1, size=4)
    base_rng, lesion_rng, pathology_rng, quality_rng = (np.random.default_rng(int(s)) for s in seeds)

    anatomy = build_anatomy(record, size, base_rng)
    myopic = bool(record.myopic_fundus)
    image = paint_background(anatomy, myopic, base_rng)
    paint_disc(image, anatomy, myopic, base_rng)
    profile = camera_profile(record.camera, base_rng)
    vein_mask, artery_mask, reflex_mask = vessel_masks(anatomy)
    quality = _plan_quality(record, quality_rng)

    plan = plan_lesions(record.dr_icdr, record.dr_sdrg, lesion_rng)
    layers = _Layers(size)
    vessel_array = np.maximum(np.asarray(vein_mask), np.asarray(artery_mask))
    painter = _LesionPainter(anatomy, layers, vein_mask, vessel_array, lesion_rng)
    found = painter.paint(plan)
    findings = _FindingPainter(anatomy, layers, vein_mask, artery_mask, pathology_rng)
    found += findings.paint(record, plan)
    drawn = painter.drawn_in_pixels()

    radius = anatomy.radius
    layers.composite(image, _DEEP_STYLES, radius)
    _composite(image, vein_mask, _VESSEL_STYLES["vein"], _VESSEL_STYLES["vein"].blur * radius)
    _composite(image, artery_mask, _VESSEL_STYLES["artery"], _VESSEL_STYLES["artery"].blur * radius)
    _composite(image, reflex_mask, _VESSEL_STYLES["reflex"], _VESSEL_STYLES["reflex"].blur * radius)
    layers.composite(image, {"irma": _VESSEL_STYLES["irma"]}, radius)
    layers.composite(image, _SUPERFICIAL_STYLES, radius)

    image = ImageChops.multiply(image, _illumination(anatomy, quality, quality_rng))
    image = image.point(_tone_lut(profile))
    image = _degrade(image, anatomy, quality, quality_rng)
    image = ImageChops.add(image, _noise_crop(size, quality_rng), scale=1.0, offset=-128)
    image = Image.composite(image, Image.new("RGB", (size, size), 0), _field_mask(anatomy))
    return image, LesionInventory.from_points(found, grade_conflict=plan.grade_conflict, lesions=drawn)


def benchmark_render(n: int, size: int) -> float:
    """Render `n` photographs of a fixed mix of grades, cameras and findings on this core (no JPEG
    encoding) and return images per second."""
    records = _benchmark_records()
    started = time.perf_counter()
    for i in range(n):
        render_fundus(records[i % len(records)], size, np.random.default_rng(i))
    return n / max(time.perf_counter() - started, 1e-9)


def _benchmark_records() -> list[FundusRecord]:
    """A mix heavier in lesions than BRSET (which is 93% grade 0), so the benchmark is conservative."""
    pairs = [(0, 0), (0, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3), (4, 4), (4, 4)]
    extras: list[dict[str, object]] = [
        {},
        {"drusen": True, "increased_cup_disc": True},
        {},
        {"macular_edema": True},
        {"focus": Assessment.ABNORMAL},
        {"hypertensive_retinopathy": True},
        {},
        {"artifacts": Assessment.ABNORMAL, "quality_adequate": False},
        {},
        {"myopic_fundus": True, "nevus": True},
    ]
    records = []
    for i, ((icdr, sdrg), extra) in enumerate(zip(pairs, extras, strict=True)):
        records.append(
            FundusRecord(
                image_id=f"bench{i:02d}",
                patient_id=f"p{i}",
                camera="Canon CR" if i % 3 else "NIKON NF5050",
                exam_eye=Eye.RIGHT if i % 2 else Eye.LEFT,
                dr_icdr=icdr,
                dr_sdrg=sdrg,
                **extra,  # type: ignore[arg-type]
            )
        )
    return records


# -- placement ----------------------------------------------------------------------------------

_SMALL_LESIONS = frozenset({"microaneurysm", "dot_haemorrhage", "hard_exudate"})

_EXTENT: dict[str, float] = {
    "microaneurysm": 1.0,  # a disc of radius `size`
    "dot_haemorrhage": 1.2,  # _blob with roughness 0.15: radius up to (1 + 1.05 x 0.15) x size
    "blot_haemorrhage": 1.5,  # roughness 0.45: up to 1.47 x size
    "flame_haemorrhage": 1.0,  # half-length `size` along its axis
    "hard_exudate": 1.25,  # roughness 0.2 (and at least 1.2 px)
    "cotton_wool_spot": 1.45,  # three 0.8 x size ellipses (+-20%) whose centres scatter by 0.25 x size
    "irma": 1.3,  # a few short tortuous vessels from within 0.5 x size of the centre
    "preretinal_haemorrhage": 1.25,  # a boat 2.5 x size wide, size high
    "laser_scar": 1.45,  # roughness 0.4
    "venous_beading": 1.0,  # a run of about 2 x size along a vein, centred on the point
    "new_vessels_elsewhere": 1.3,  # a frond: loops scattered by 0.4 x size, branches of 1 x size
    "new_vessels_disc": 1.3,  # a frond about the disc (reach at least 1.1 disc radii)
}
"""Radius of the circle that holds each DR lesion's drawn shape, in units of its planned `size` (see the
painters below); the inventory records it in pixels (`DrawnLesion.r`)."""
_FIELD_MARGIN = 0.04


def fit_to_field(anatomy: Anatomy, xy: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Pull retina-frame points towards the fovea until each lesion (radius `sizes`) lies inside the
    visible field and clear of the optic disc. Scaling towards the fovea keeps every point's quadrant."""
    if len(xy) == 0:
        return xy
    xy = np.asarray(xy, dtype=float)
    # Field circle, in retina units about the fovea: |t*xy - c| <= rho.
    c = np.array(anatomy.field_centre)
    rho = 1.0 - _FIELD_MARGIN - sizes
    a = np.maximum((xy**2).sum(axis=1), 1e-12)
    b = -2.0 * (xy @ c)
    k = float(c @ c) - rho**2
    t = np.minimum(1.0, (-b + np.sqrt(np.maximum(b**2 - 4 * a * k, 0.0))) / (2 * a))
    # Horizontal band of a cropped field: |fovea_y - t*y*R - centre_y| <= band (pixels).
    band = (anatomy.band - (_FIELD_MARGIN + sizes) * anatomy.radius) / anatomy.radius
    offset = (anatomy.fovea[1] - anatomy.centre[1]) / anatomy.radius  # centre at retina y = offset
    y = xy[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        t_band = np.where(y > 0, (band + offset) / y, np.where(y < 0, (offset - band) / y, np.inf))
    t = np.minimum(t, t_band)
    # Optic disc: stop on the fovea side of the disc's clearance circle if the point falls inside it.
    d = np.array(anatomy.disc)
    clearance = anatomy.disc_radius * 1.15 + sizes + 0.015
    p = xy * t[:, None]
    inside = np.hypot(p[:, 0] - d[0], p[:, 1] - d[1]) < clearance
    if inside.any():
        proj = xy @ d
        root = np.sqrt(np.maximum(proj**2 - a * (float(d @ d) - clearance**2), 0.0))
        t = np.where(inside, np.minimum(t, (proj - root) / a), t)
    return xy * np.maximum(t, 0.05)[:, None]


def _pixel_direction(anatomy: Anatomy, angle: float) -> tuple[float, float]:
    """Unit vector in pixels of a retina-frame direction."""
    return anatomy.side * math.cos(angle), -math.sin(angle)


# -- DR lesions ---------------------------------------------------------------------------------


class _LesionPainter:
    """Draws a lesion plan into the layers and reports (kind, x, y) of what it drew."""

    def __init__(
        self,
        anatomy: Anatomy,
        layers: _Layers,
        vein_mask: Image.Image,
        vessels: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        self.anatomy = anatomy
        self.layers = layers
        self.vein_draw = ImageDraw.Draw(vein_mask)
        self.vessels = vessels
        self.rng = rng
        self.veins = _VeinIndex(anatomy)
        self.drawn: list[tuple[str, float, float, float]] = []
        """(kind, x, y, reach): every drawn lesion in the retina frame, reach in field radii."""

    def paint(self, plan: LesionPlan) -> list[tuple[str, float, float]]:
        """Draw every planned lesion; return its final retina-frame position by kind."""
        anatomy = self.anatomy
        lesions = [les for les in plan.lesions if les.kind not in ("new_vessels_disc",)]
        xy = np.array([(les.x, les.y) for les in lesions], dtype=float).reshape(-1, 2)
        sizes = np.array([les.size for les in lesions], dtype=float)
        fitted = fit_to_field(anatomy, xy, sizes)
        found: list[tuple[str, float, float]] = []
        for les, (x, y) in zip(lesions, fitted, strict=True):
            if les.kind == "venous_beading":
                x, y = self.beading(les, x, y)
            elif les.kind == "new_vessels_elsewhere":
                x, y = self.new_vessels_elsewhere(les, x, y)
            else:
                if les.kind in _SMALL_LESIONS:
                    x, y = self.off_vessels(x, y, les.size)
                self.draw(les, x, y)
            found.append((les.kind, float(x), float(y)))
            self.drawn.append((les.kind, float(x), float(y), les.size * _EXTENT[les.kind]))
        for les in plan.lesions:
            if les.kind == "new_vessels_disc":
                x, y = anatomy.disc
                self.new_vessels_disc(les)
                found.append((les.kind, x, y))
                reach = max(les.size, anatomy.disc_radius * 1.1)
                self.drawn.append((les.kind, float(x), float(y), reach * _EXTENT[les.kind]))
        return found

    def drawn_in_pixels(self) -> list[DrawnLesion]:
        """The lesions drawn so far, in pixels of the photograph (centre and holding radius)."""
        anatomy = self.anatomy
        out = []
        for kind, x, y, reach in self.drawn:
            px, py = (float(v) for v in anatomy.to_pixels(np.array([x, y])))
            r = reach * anatomy.radius
            if kind == "hard_exudate":
                r = max(r, 1.2 * _EXTENT[kind])
            out.append(DrawnLesion(kind=kind, x=round(px, 2), y=round(py, 2), r=round(r, 2)))
        return out

    def off_vessels(self, x: float, y: float, size: float) -> tuple[float, float]:
        """Nudge a small lesion off the large vessels (it would be hidden), keeping its quadrant."""
        if not self.touches_vessel(x, y, size):
            return x, y
        quadrant = quadrant_of(x, y)
        tries = np.array([x, y]) + self.rng.normal(0, 0.035, size=(16, 2))
        tries = fit_to_field(self.anatomy, tries, np.full(16, size))
        for cx, cy in tries.tolist():
            if quadrant_of(cx, cy) == quadrant and not self.touches_vessel(cx, cy, size):
                return cx, cy
        return x, y

    def touches_vessel(self, x: float, y: float, size: float) -> bool:
        """Whether a disc of radius `size` (field radii) at (x, y) overlaps a drawn vessel."""
        anatomy = self.anatomy
        px = anatomy.fovea[0] + anatomy.side * x * anatomy.radius
        py = anatomy.fovea[1] - y * anatomy.radius
        r = size * anatomy.radius + 1.5
        n = self.vessels.shape[0]
        x0, x1 = max(0, int(px - r)), min(n, int(px + r) + 1)
        y0, y1 = max(0, int(py - r)), min(n, int(py + r) + 1)
        if x1 <= x0 or y1 <= y0:
            return False
        return bool(self.vessels[y0:y1, x0:x1].max() > 40)

    def draw(self, les: PlannedLesion, x: float, y: float) -> None:
        """Draw one lesion whose shape needs no vessel."""
        anatomy, rng = self.anatomy, self.rng
        px, py = (float(v) for v in anatomy.to_pixels(np.array([x, y])))
        r = les.size * anatomy.radius
        s = les.strength
        kind = les.kind
        if kind == "microaneurysm":
            self.layers.draw("haem").ellipse(_box(px, py, r, r), fill=int(255 * s))
        elif kind in ("dot_haemorrhage", "blot_haemorrhage"):
            # A paler rim around a dark core, irregular for blots.
            draw = self.layers.draw("haem")
            rough = 0.15 if kind == "dot_haemorrhage" else 0.45
            fill = rng.uniform(0.75, 1.0) * 255 * s
            draw.polygon(_blob(px, py, r, rng, rough), fill=int(fill * rng.uniform(0.72, 0.88)))
            cx, cy = px + rng.normal(0, 0.12) * r, py + rng.normal(0, 0.12) * r
            draw.polygon(_blob(cx, cy, r * rng.uniform(0.55, 0.8), rng, rough), fill=int(fill))
        elif kind == "flame_haemorrhage":
            u = _pixel_direction(anatomy, les.angle)
            self.layers.draw("flame").polygon(_flame(px, py, r, u, rng), fill=int(235 * s))
        elif kind == "hard_exudate":
            self.layers.draw("exudate").polygon(_blob(px, py, max(r, 1.2), rng, 0.2), fill=int(255 * s))
        elif kind == "cotton_wool_spot":
            u = _pixel_direction(anatomy, les.angle)
            draw = self.layers.draw("cws")
            for _ in range(3):  # overlapping puffs make the fluffy outline
                ox, oy = px + rng.normal(0, 0.25) * r, py + rng.normal(0, 0.25) * r
                draw.polygon(
                    _ellipse_points(ox, oy, r * 0.8, r * 0.5, u, rng, 0.2),
                    fill=int(rng.uniform(150, 215) * s),
                )
        elif kind == "irma":
            self.irma(px, py, r)
        elif kind == "preretinal_haemorrhage":
            a, b = r * 1.25, r
            top = py - b * 0.45
            boat = [(px + a * math.cos(t), top + b * math.sin(t)) for t in np.linspace(0, math.pi, 16)]
            self.layers.draw("preretinal").polygon(boat, fill=int(245 * s))
        elif kind == "laser_scar":
            self.laser_scar(px, py, r, s)
        else:  # pragma: no cover - plan_lesions emits only the kinds above
            raise ValueError(f"cannot draw lesion kind {kind!r}")

    def laser_scar(self, px: float, py: float, r: float, s: float) -> None:
        """A photocoagulation burn: pale atrophic halo and/or a pigmented centre, irregular."""
        rng = self.rng
        style = rng.random()
        if style < 0.85:
            self.layers.draw("laser_pale").polygon(
                _blob(px, py, r, rng, 0.4), fill=int(rng.uniform(120, 220) * s)
            )
        if style < 0.6:
            core = r * rng.uniform(0.35, 0.65)
            self.layers.draw("pigment").polygon(
                _blob(px, py, core, rng, 0.5), fill=int(rng.uniform(110, 220) * s)
            )
        elif style >= 0.85:
            core = r * rng.uniform(0.6, 0.9)
            self.layers.draw("pigment").polygon(
                _blob(px, py, core, rng, 0.5), fill=int(rng.uniform(150, 240) * s)
            )

    def irma(self, px: float, py: float, r: float) -> None:
        """Intraretinal microvascular abnormality: a few short, tortuous, calibre-irregular vessels."""
        rng = self.rng
        width = max(1, round(0.006 * self.anatomy.radius))
        draw = self.layers.draw("irma")
        for _ in range(int(rng.integers(3, 6))):
            start = (px + rng.uniform(-0.5, 0.5) * r, py + rng.uniform(-0.5, 0.5) * r)
            heading = rng.uniform(0, 2 * math.pi)
            path = [start]
            for _ in range(int(rng.integers(8, 14))):
                heading += rng.normal(0, 1.0)
                last = path[-1]
                step = r * rng.uniform(0.12, 0.22)
                path.append((last[0] + step * math.cos(heading), last[1] + step * math.sin(heading)))
            draw.line(path, fill=235, width=width, joint="curve")

    def beading(self, les: PlannedLesion, x: float, y: float) -> tuple[float, float]:
        """Venous beading on a vein run in the lesion's quadrant: the run is redrawn narrow with
        sausage-like dilatations. Returns the run's middle (retina frame)."""
        anatomy = self.anatomy
        run = self.veins.run_near(x, y, les.size)
        if run is None:
            return self.beaded_segment(les, x, y)
        points, widths = run
        pixels = anatomy.to_pixels(points)
        width_px = widths * anatomy.radius
        self.vein_draw.line([tuple(p) for p in pixels.tolist()], fill=0, width=int(width_px.max()) + 3)
        draw_polyline(self.vein_draw, pixels, np.maximum(width_px * 0.55, 1.0))
        self.beads(pixels, width_px)
        middle = points[len(points) // 2]
        return float(middle[0]), float(middle[1])

    def beads(self, pixels: np.ndarray, width_px: np.ndarray) -> None:
        """Sausage-like dilatations along a vein path (pixels), spaced about three calibres apart."""
        steps = np.hypot(*np.diff(pixels, axis=0).T)
        arc = np.concatenate([[0.0], np.cumsum(steps)])
        min_radius = 0.012 * self.anatomy.radius
        position = float(self.rng.uniform(0, 2))
        while position < arc[-1]:
            i = int(np.searchsorted(arc, position))
            i = min(i, len(pixels) - 1)
            w = max(float(width_px[i]), min_radius)
            self.vein_draw.ellipse(_box(pixels[i][0], pixels[i][1], w * 1.05, w * 1.05), fill=255)
            position += w * 3.2

    def beaded_segment(self, les: PlannedLesion, x: float, y: float) -> tuple[float, float]:
        """Fallback when no vein crosses the quadrant: a short beaded vein at the planned point."""
        anatomy = self.anatomy
        angle = self.rng.uniform(0, math.pi)
        t = np.linspace(-1, 1, 12)[:, None]
        points = np.array([x, y]) + t * les.size * np.array([math.cos(angle), math.sin(angle)])
        points = fit_to_field(anatomy, points, np.full(len(points), 0.02))
        keep = [quadrant_of(*p) == quadrant_of(x, y) for p in points]
        points = points[np.array(keep)] if any(keep) else np.array([[x, y]])
        pixels = anatomy.to_pixels(points)
        width_px = np.full(len(points), 0.012 * anatomy.radius)
        if len(points) > 1:
            draw_polyline(self.vein_draw, pixels, width_px * 0.6)
        self.beads(pixels, width_px)
        middle = points[len(points) // 2]
        return float(middle[0]), float(middle[1])

    def new_vessels_elsewhere(self, les: PlannedLesion, x: float, y: float) -> tuple[float, float]:
        """A frond of new vessels on a vein in the lesion's quadrant (at the planned point if none)."""
        point = self.veins.point_near(x, y)
        if point is not None:
            x, y = point
        px, py = (float(v) for v in self.anatomy.to_pixels(np.array([x, y])))
        self.frond(px, py, les.size * self.anatomy.radius, loops=int(self.rng.integers(10, 18)))
        return x, y

    def new_vessels_disc(self, les: PlannedLesion) -> None:
        """New vessels on and around the optic disc."""
        px, py = self.anatomy.disc_pixels()
        reach = max(les.size, self.anatomy.disc_radius * 1.1) * self.anatomy.radius
        self.frond(px, py, reach, loops=int(self.rng.integers(10, 18)))

    def frond(self, px: float, py: float, r: float, loops: int) -> None:
        """Fine tangled vessel loops within `r` pixels of a point, with a faint fibrous veil."""
        rng = self.rng
        draw = self.layers.draw("nv")
        width = max(1, round(0.006 * self.anatomy.radius))
        for _ in range(loops):
            cx, cy = px + rng.normal(0, 0.4) * r, py + rng.normal(0, 0.4) * r
            loop = _blob(cx, cy, r * rng.uniform(0.12, 0.32), rng, 0.9)
            draw.line(loop + loop[:1], fill=int(rng.uniform(160, 240)), width=width, joint="curve")
        for _ in range(int(rng.integers(3, 7))):
            heading = rng.uniform(0, 2 * math.pi)
            path = [(px, py)]
            for _ in range(6):
                heading += rng.normal(0, 0.7)
                step = r * 0.17
                path.append((path[-1][0] + step * math.cos(heading), path[-1][1] + step * math.sin(heading)))
            draw.line(path, fill=235, width=width, joint="curve")
        if rng.random() < 0.7:
            self.layers.draw("fibrous").ellipse(
                _box(px, py, r * 0.7, r * 0.6), fill=int(rng.uniform(50, 110))
            )


class _VeinIndex:
    """Vein points of the anatomy, for snapping beading and new vessels onto veins."""

    def __init__(self, anatomy: Anatomy) -> None:
        self.anatomy = anatomy
        veins = [v for v in anatomy.vessels if v.vein]
        self.vessels = veins
        if veins:
            self.points = np.concatenate([v.points for v in veins])
            self.widths = np.concatenate([v.widths for v in veins])
            self.owner = np.concatenate([np.full(len(v.points), i) for i, v in enumerate(veins)])
            self.index = np.concatenate([np.arange(len(v.points)) for v in veins])
        else:  # pragma: no cover - every tree has veins
            self.points = np.zeros((0, 2))
            self.widths = self.owner = self.index = np.zeros(0, int)

    def candidates(self, x: float, y: float, min_width: float) -> np.ndarray:
        """Indices of vein points in the same quadrant as (x, y), visible, off the disc, wide enough."""
        p = self.points
        same = ((p[:, 0] >= 0) == (x >= 0)) & ((p[:, 1] >= 0) == (y >= 0))
        anatomy = self.anatomy
        off_disc = np.hypot(p[:, 0] - anatomy.disc[0], p[:, 1] - anatomy.disc[1]) > anatomy.disc_radius * 1.6
        ok = same & off_disc & (np.hypot(p[:, 0], p[:, 1]) > 0.2) & (self.widths >= min_width)
        ok &= anatomy.visible(p, margin=0.08)
        return np.flatnonzero(ok)

    def point_near(self, x: float, y: float) -> tuple[float, float] | None:
        """The nearest suitable vein point to (x, y) in its quadrant, or None."""
        idx = self.candidates(x, y, 0.006)
        if len(idx) == 0:
            return None
        best = idx[np.argmin(np.hypot(self.points[idx, 0] - x, self.points[idx, 1] - y))]
        return float(self.points[best, 0]), float(self.points[best, 1])

    def run_near(self, x: float, y: float, half_length: float) -> tuple[np.ndarray, np.ndarray] | None:
        """A stretch of one vein near (x, y), about 2 x `half_length` long, entirely within the quadrant
        and the visible field; None when the quadrant has no suitable vein."""
        idx = self.candidates(x, y, 0.009)
        if len(idx) == 0:
            return None
        best = idx[np.argmin(np.hypot(self.points[idx, 0] - x, self.points[idx, 1] - y))]
        vessel = self.vessels[int(self.owner[best])]
        allowed = np.zeros(len(vessel.points), bool)
        allowed[self.index[idx[self.owner[idx] == self.owner[best]]]] = True
        centre = int(self.index[best])
        span = max(2, int(half_length / 0.02))
        lo, hi = centre, centre
        while lo > 0 and centre - lo < span and allowed[lo - 1]:
            lo -= 1
        while hi < len(allowed) - 1 and hi - centre < span and allowed[hi + 1]:
            hi += 1
        if hi - lo < 2:
            return None
        return vessel.points[lo : hi + 1], vessel.widths[lo : hi + 1]


# -- non-DR findings ----------------------------------------------------------------------------


class _FindingPainter:
    """Draws the non-DR findings a record's flags and assessments call for."""

    def __init__(
        self,
        anatomy: Anatomy,
        layers: _Layers,
        vein_mask: Image.Image,
        artery_mask: Image.Image,
        rng: np.random.Generator,
    ) -> None:
        self.anatomy = anatomy
        self.layers = layers
        self.vein_mask = vein_mask
        self.artery_mask = artery_mask
        self.rng = rng
        self.found: list[tuple[str, float, float]] = []

    def paint(self, record: FundusRecord, plan: LesionPlan) -> list[tuple[str, float, float]]:
        """Draw every finding the record calls for; return (name, x, y) of each."""
        anatomy = self.anatomy
        if record.drusen or record.amd:
            self.drusen(int(self.rng.integers(10, 40)))
        if record.amd:
            self.pigment_change()
        if record.macular_edema:
            self.macular_edema()
        if record.nevus:
            self.nevus()
        if record.scar:
            self.scar()
        if record.myopic_fundus:
            self.everywhere("tessellation")
            self.found.append(("peripapillary_atrophy", *anatomy.disc))
        if record.vascular_occlusion:
            self.branch_occlusion()
        if record.hypertensive_retinopathy:
            self.everywhere("arteriolar_narrowing")
            self.av_nicking()
        has_dr_haemorrhages = any(les.kind in INTRARETINAL_HAEMORRHAGES for les in plan.lesions)
        if record.hemorrhage and not has_dr_haemorrhages and not record.vascular_occlusion:
            self.haemorrhages("hemorrhage_other", int(self.rng.integers(1, 4)))
        if record.retinal_detachment:
            self.detachment()
        if anatomy.disc_state != "normal":
            self.found.append((f"disc_{anatomy.disc_state}", *anatomy.disc))
        if record.vessels == Assessment.ABNORMAL:
            if anatomy.tortuous:
                self.everywhere("vessel_tortuosity")
            else:
                self.sheathing()
        if record.macula == Assessment.ABNORMAL and not (record.amd or record.macular_edema):
            if self.rng.random() < 0.5:
                self.pigment_change()
            else:
                self.epiretinal_membrane()
        if record.other:
            self.myelinated_fibres()
        return self.found

    def everywhere(self, name: str) -> None:
        """Record a diffuse finding once in each quadrant."""
        for x, y in ((-0.4, 0.4), (0.4, 0.4), (-0.4, -0.4), (0.4, -0.4)):
            self.found.append((name, x, y))

    def pixels(self, x: float, y: float) -> tuple[float, float]:
        """Pixel position of a retina-frame point."""
        px, py = self.anatomy.to_pixels(np.array([x, y]))
        return float(px), float(py)

    def scatter(self, n: int, spread: float, around: tuple[float, float], size: float) -> np.ndarray:
        """`n` points, normally spread about a retina-frame point, fitted into the field off the disc."""
        points = np.array(around) + self.rng.normal(0, spread, size=(n, 2))
        return fit_to_field(self.anatomy, points, np.full(n, size))

    def drusen(self, n: int) -> None:
        """Small soft yellow deposits clustered around the macula."""
        r_field = self.anatomy.radius
        for x, y in self.scatter(n, 0.11, (0.0, 0.0), 0.02):
            px, py = self.pixels(x, y)
            r = self.rng.uniform(0.008, 0.019) * r_field
            self.layers.draw("drusen").ellipse(_box(px, py, r, r), fill=int(self.rng.uniform(110, 200)))
            self.found.append(("drusen", float(x), float(y)))

    def pigment_change(self) -> None:
        """Macular pigment clumping with patchy depigmentation."""
        r_field = self.anatomy.radius
        for x, y in self.scatter(int(self.rng.integers(4, 10)), 0.06, (0.0, 0.0), 0.02):
            px, py = self.pixels(x, y)
            r = self.rng.uniform(0.006, 0.014) * r_field
            self.layers.draw("pigment").polygon(_blob(px, py, r, self.rng, 0.35), fill=200)
        for x, y in self.scatter(int(self.rng.integers(2, 5)), 0.05, (0.0, 0.0), 0.03):
            px, py = self.pixels(x, y)
            r = self.rng.uniform(0.02, 0.04) * r_field
            self.layers.draw("laser_pale").polygon(_blob(px, py, r, self.rng, 0.3), fill=90)
        self.found.append(("macular_pigment_change", 0.0, 0.0))

    def macular_edema(self) -> None:
        """Exudates in a partial ring or star about the fovea, and a sheen of retinal thickening."""
        rng, r_field = self.rng, self.anatomy.radius
        n = int(rng.integers(8, 26))
        theta = rng.uniform(0, 2 * math.pi, n)
        rho = rng.uniform(0.05, 0.17, n)
        points = fit_to_field(
            self.anatomy, np.stack([rho * np.cos(theta), rho * np.sin(theta)], 1), np.full(n, 0.02)
        )
        for x, y in points:
            px, py = self.pixels(x, y)
            r = rng.uniform(0.01, 0.016) * r_field
            self.layers.draw("exudate").polygon(_blob(px, py, r, rng, 0.25), fill=int(rng.uniform(200, 255)))
            self.found.append(("macular_edema_exudate", float(x), float(y)))
        fx, fy = self.anatomy.fovea
        self.layers.draw("sheen").ellipse(
            _box(fx, fy, 0.16 * r_field, 0.14 * r_field), fill=int(rng.uniform(25, 45))
        )
        self.found.append(("macular_thickening", 0.0, 0.0))

    def random_site(self, low: float, high: float, size: float) -> tuple[float, float]:
        """A retina-frame point `low`..`high` from the fovea, fitted into the field off the disc."""
        angle, dist = self.rng.uniform(0, 2 * math.pi), self.rng.uniform(low, high)
        point = np.array([[dist * math.cos(angle), dist * math.sin(angle)]])
        fitted = fit_to_field(self.anatomy, point, np.array([size]))[0]
        return float(fitted[0]), float(fitted[1])

    def nevus(self) -> None:
        """A flat slate-grey choroidal naevus."""
        size = self.rng.uniform(0.05, 0.1)
        x, y = self.random_site(0.3, 0.8, size)
        px, py = self.pixels(x, y)
        r = size * self.anatomy.radius
        fill = int(self.rng.uniform(130, 190))
        self.layers.draw("nevus").polygon(_blob(px, py, r, self.rng, 0.15), fill=fill)
        self.found.append(("nevus", x, y))

    def scar(self) -> None:
        """A chorioretinal scar: pale atrophic centre with clumped pigment at and inside its border."""
        rng = self.rng
        size = rng.uniform(0.05, 0.11)
        x, y = self.random_site(0.1, 0.7, size)
        px, py = self.pixels(x, y)
        r = size * self.anatomy.radius
        self.layers.draw("scar_pale").polygon(_blob(px, py, r, rng, 0.3), fill=int(rng.uniform(200, 245)))
        for _ in range(int(rng.integers(5, 12))):
            angle, dist = rng.uniform(0, 2 * math.pi), r * rng.uniform(0.3, 1.05)
            cx, cy = px + dist * math.cos(angle), py + dist * math.sin(angle)
            self.layers.draw("pigment").polygon(_blob(cx, cy, r * rng.uniform(0.1, 0.3), rng, 0.4), fill=230)
        self.found.append(("chorioretinal_scar", x, y))

    def haemorrhages(self, name: str, n: int, around: np.ndarray | None = None) -> None:
        """Non-DR retinal haemorrhages (flame and dot), anywhere or near the given points."""
        rng, anatomy = self.rng, self.anatomy
        for _ in range(n):
            if around is None:
                x, y = self.random_site(0.15, 0.8, 0.05)
            else:
                base = around[int(rng.integers(len(around)))]
                fitted = fit_to_field(anatomy, base[None, :] + rng.normal(0, 0.05, (1, 2)), np.array([0.05]))[
                    0
                ]
                x, y = float(fitted[0]), float(fitted[1])
            px, py = self.pixels(x, y)
            if rng.random() < 0.7:
                dx, dy = x - anatomy.disc[0], y - anatomy.disc[1]
                u = _pixel_direction(anatomy, math.atan2(dy, dx))
                r = rng.uniform(0.04, 0.07) * anatomy.radius
                self.layers.draw("flame").polygon(_flame(px, py, r, u, rng), fill=int(rng.uniform(190, 240)))
            else:
                r = rng.uniform(0.02, 0.04) * anatomy.radius
                self.layers.draw("haem").polygon(_blob(px, py, r, rng, 0.3), fill=int(rng.uniform(190, 235)))
            self.found.append((name, x, y))

    def branch_occlusion(self) -> None:
        """Branch retinal vein occlusion: haemorrhages throughout one temporal vein's territory."""
        superior = self.rng.random() < 0.5
        veins = [v for v in self.anatomy.vessels if v.vein and len(v.points) > 20]
        temporal = [v for v in veins if v.points[-1, 0] < 0 and (v.points[-1, 1] > 0) == superior]
        trunk = max(temporal or veins, key=lambda v: len(v.points))
        points = trunk.points[np.hypot(trunk.points[:, 0], trunk.points[:, 1]) > 0.2]
        points = points[points[:, 0] < self.anatomy.disc[0] - 0.15]
        if len(points) == 0:
            points = trunk.points
        self.haemorrhages("vascular_occlusion_haemorrhage", int(self.rng.integers(20, 46)), around=points)

    def av_nicking(self) -> None:
        """Arteriovenous nicking: the vein is concealed on either side of a few artery crossings."""
        rng = self.rng
        veins = np.asarray(self.vein_mask) > 128
        arteries = np.asarray(self.artery_mask) > 128
        crossings = np.argwhere(veins & arteries)
        if len(crossings) == 0:
            return
        draw = ImageDraw.Draw(self.vein_mask)
        chosen = crossings[
            rng.choice(len(crossings), size=min(len(crossings), int(rng.integers(2, 5))), replace=False)
        ]
        r = max(2.0, 0.022 * self.anatomy.radius)
        for cy, cx in chosen:
            draw.ellipse(_box(float(cx), float(cy), r, r), fill=0)
            x, y = self.anatomy.to_retina(np.array([float(cx), float(cy)]))
            self.found.append(("av_nicking", float(x), float(y)))

    def detachment(self) -> None:
        """A pale grey, elevated sheet of detached retina spreading in from the periphery, with folds."""
        rng, anatomy = self.rng, self.anatomy
        angle = rng.uniform(0, 2 * math.pi)
        ux, uy = math.cos(angle), math.sin(angle)
        cx, cy = (
            anatomy.centre[0] + ux * anatomy.radius * 0.95,
            anatomy.centre[1] + uy * anatomy.radius * 0.95,
        )
        a, b = anatomy.radius * rng.uniform(0.5, 0.75), anatomy.radius * rng.uniform(0.7, 1.0)
        self.layers.draw("detachment").polygon(
            _ellipse_points(cx, cy, a, b, (ux, uy), rng, jitter=0.08), fill=int(rng.uniform(130, 180))
        )
        fold = self.layers.draw("fold")
        for _ in range(int(rng.integers(2, 5))):
            depth = anatomy.radius * rng.uniform(0.1, 0.45)
            sx, sy = cx - ux * depth, cy - uy * depth
            half = anatomy.radius * rng.uniform(0.15, 0.35)
            path = [
                (sx - uy * half * t + rng.normal(0, 2), sy + ux * half * t + rng.normal(0, 2))
                for t in np.linspace(-1, 1, 8)
            ]
            fold.line(path, fill=150, width=max(1, round(0.008 * anatomy.radius)), joint="curve")
        inner = anatomy.to_retina(np.array([cx - ux * a * 0.6, cy - uy * a * 0.6]))
        self.found.append(("retinal_detachment", float(inner[0]), float(inner[1])))

    def sheathing(self) -> None:
        """Perivascular sheathing: a pale cuff along a stretch of one of the larger veins."""
        veins = [v for v in self.anatomy.vessels if v.vein and len(v.points) > 24 and v.widths[0] >= 0.012]
        veins = veins or [v for v in self.anatomy.vessels if v.vein]
        vessel = veins[int(self.rng.integers(len(veins)))]
        lo = int(self.rng.integers(4, max(5, len(vessel.points) // 3)))
        stretch = slice(lo, min(len(vessel.points), lo + 20))
        pixels = self.anatomy.to_pixels(vessel.points[stretch])
        widths = vessel.widths[stretch] * self.anatomy.radius
        draw_polyline(self.layers.draw("sheath"), pixels, widths * 1.7 + 1, fill=120)
        middle = vessel.points[stretch][len(pixels) // 2]
        self.found.append(("vessel_sheathing", float(middle[0]), float(middle[1])))

    def epiretinal_membrane(self) -> None:
        """A cellophane sheen over the macula with fine radiating folds."""
        rng, r_field = self.rng, self.anatomy.radius
        fx, fy = self.anatomy.fovea
        self.layers.draw("sheen").ellipse(
            _box(fx, fy, 0.2 * r_field, 0.17 * r_field), fill=int(rng.uniform(35, 60))
        )
        fold = self.layers.draw("fold")
        for angle in rng.uniform(0, 2 * math.pi, int(rng.integers(4, 8))):
            r0, r1 = 0.04 * r_field, rng.uniform(0.12, 0.2) * r_field
            fold.line(
                [
                    (fx + r0 * math.cos(angle), fy + r0 * math.sin(angle)),
                    (fx + r1 * math.cos(angle), fy + r1 * math.sin(angle)),
                ],
                fill=70,
                width=1,
            )
        self.found.append(("epiretinal_membrane", 0.0, 0.0))

    def myelinated_fibres(self) -> None:
        """Myelinated nerve fibres: a white feathery patch at the disc margin, following the fibres."""
        rng, anatomy = self.rng, self.anatomy
        up = 1.0 if rng.random() < 0.5 else -1.0
        dx, dy = anatomy.disc[0] - 0.05, anatomy.disc[1] + up * anatomy.disc_radius * 1.3
        px, py = self.pixels(dx, dy)
        draw = self.layers.draw("fibrous")
        for _ in range(int(rng.integers(5, 9))):
            angle = math.atan2(dy - anatomy.disc[1], dx - anatomy.disc[0]) + rng.normal(0, 0.3)
            u = _pixel_direction(anatomy, angle)
            r = anatomy.radius * rng.uniform(0.05, 0.1)
            ox, oy = px + rng.normal(0, 0.3) * r, py + rng.normal(0, 0.3) * r
            draw.polygon(_ellipse_points(ox, oy, r, r * 0.3, u, rng), fill=int(rng.uniform(150, 230)))
        self.found.append(("myelinated_nerve_fibres", dx, dy))


# -- quality --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Quality:
    """The image-quality defects of one photograph."""

    blur_px: float  # fraction of the image size
    illumination: str  # "normal", "dark", "uneven" or "crescent"
    artefacts: tuple[str, ...]
    strength: float


def _plan_quality(record: FundusRecord, rng: np.random.Generator) -> _Quality:
    """Decide the defects from `focus`, `illumination`, `artifacts` and `quality_adequate` (an inadequate
    photograph with no named defect gets one or two, and every defect is stronger)."""
    blurred = record.focus == Assessment.ABNORMAL
    dim = record.illumination == Assessment.ABNORMAL
    marked = record.artifacts == Assessment.ABNORMAL
    inadequate = record.quality_adequate is False
    picks = rng.random(3)
    if inadequate and not (blurred or dim or marked or record.image_field == Assessment.ABNORMAL):
        blurred, dim, marked = picks[0] < 0.55, picks[1] < 0.4, picks[2] < 0.35
        if not (blurred or dim or marked):
            blurred = True
    strength = 1.6 if inadequate else 1.0
    blur_px = rng.uniform(0.006, 0.012) * strength if blurred else 0.0
    illumination = str(rng.choice(["dark", "uneven", "crescent"])) if dim else "normal"
    artefacts: tuple[str, ...] = ()
    if marked:
        count = int(rng.integers(1, 3))
        artefacts = tuple(str(a) for a in rng.choice(["lash", "dust", "glare"], size=count, replace=False))
    return _Quality(blur_px, illumination, artefacts, strength)


def _illumination(anatomy: Anatomy, quality: _Quality, rng: np.random.Generator) -> Image.Image:
    """Illumination gain (RGB, full size): vignetting and a slight tilt always, plus the defect."""
    n = BACKGROUND_GRID
    scale = anatomy.size / n
    ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
    u = ((xs + 0.5) * scale - anatomy.centre[0]) / anatomy.radius
    v = ((ys + 0.5) * scale - anatomy.centre[1]) / anatomy.radius
    r = np.hypot(u, v)
    angle = rng.uniform(0, 2 * math.pi)
    along = u * math.cos(angle) + v * math.sin(angle)
    gain = 1.0 - rng.uniform(0.3, 0.45) * np.minimum(r, 1.1) ** rng.uniform(2.2, 3.2)
    gain *= 1.0 + rng.uniform(0.0, 0.08) * along
    gain *= rng.uniform(0.9, 1.0)
    s = quality.strength
    if quality.illumination == "dark":
        gain *= rng.uniform(0.45, 0.65) ** s
    elif quality.illumination == "uneven":
        gain *= np.clip(1.0 - rng.uniform(0.45, 0.6) * s * (0.5 + 0.5 * along), 0.12, 1.0)
    elif quality.illumination == "crescent":
        gain *= 1.0 - np.clip((along - 0.45) / 0.3, 0, 1) * min(0.9, 0.6 * s)
    grey = Image.fromarray(np.clip(gain * 255, 0, 255).astype(np.uint8), "L")
    grey = grey.resize((anatomy.size, anatomy.size), Image.Resampling.BICUBIC)
    return Image.merge("RGB", (grey, grey, grey))


def _tone_lut(profile: CameraProfile) -> list[int]:
    """The camera's per-channel tone curve as a 768-entry lookup table for `Image.point`."""
    v = np.arange(256, dtype=np.float64) / 255.0
    table = []
    for gain in profile.gain:
        out = np.clip(v * gain, 0, 1) ** profile.gamma
        out = (out - 0.35) * profile.contrast + 0.35 + profile.lift
        table.append(np.clip(np.rint(out * 255), 0, 255).astype(int))
    return np.concatenate(table).tolist()


def _degrade(
    image: Image.Image, anatomy: Anatomy, quality: _Quality, rng: np.random.Generator
) -> Image.Image:
    """Defocus blur and artefacts (eyelash shadows, dust on the optics, reflections)."""
    size = anatomy.size
    if quality.blur_px > 0:
        image = image.filter(ImageFilter.GaussianBlur(quality.blur_px * size))
    if not quality.artefacts:
        return image
    layers = _Layers(size)
    r_field, (cx, cy) = anatomy.radius, anatomy.centre
    for artefact in quality.artefacts:
        if artefact == "lash":
            draw = layers.draw("lash")
            edge = -1 if rng.random() < 0.6 else 1  # mostly the upper lid
            for _ in range(int(rng.integers(2, 6))):
                x0 = cx + rng.uniform(-0.7, 0.7) * r_field
                y0 = cy + edge * r_field * rng.uniform(0.95, 1.1)
                bend = rng.uniform(-0.3, 0.3) * r_field
                length = rng.uniform(0.3, 0.6) * r_field
                path = [(x0 + bend * t * t, y0 - edge * length * t) for t in np.linspace(0, 1, 6)]
                draw.line(
                    path,
                    fill=int(rng.uniform(110, 200) * min(1.0, quality.strength * 0.8)),
                    width=max(2, round(0.05 * r_field)),
                )
        elif artefact == "dust":
            draw = layers.draw("dust")
            for _ in range(int(rng.integers(3, 9))):
                x, y = cx + rng.uniform(-0.8, 0.8) * r_field, cy + rng.uniform(-0.8, 0.8) * r_field
                r = rng.uniform(0.01, 0.03) * r_field
                draw.ellipse(_box(x, y, r, r), fill=int(rng.uniform(120, 230)))
        else:
            draw = layers.draw("glare")
            angle = rng.uniform(0, 2 * math.pi)
            dist = rng.uniform(0.0, 0.75) * r_field
            x, y = cx + dist * math.cos(angle), cy + dist * math.sin(angle)
            r = rng.uniform(0.12, 0.3) * r_field
            draw.ellipse(
                _box(x, y, r, r * rng.uniform(0.5, 1.0)),
                fill=int(rng.uniform(70, 140) * min(1.5, quality.strength)),
            )
    layers.composite(image, _ARTEFACT_STYLES, r_field)
    return image


@functools.lru_cache(maxsize=4)
def _noise_texture(size: int) -> Image.Image:
    """A fixed sensor-noise texture (mid-grey 128 + noise), twice the image size; images crop it at a
    random offset, which is far cheaper than drawing fresh noise per image."""
    rng = np.random.default_rng(20240517)
    luma = rng.normal(0.0, 2.2, size=(2 * size, 2 * size, 1))
    chroma = rng.normal(0.0, 0.8, size=(2 * size, 2 * size, 3))
    return Image.fromarray(np.clip(128 + luma + chroma, 0, 255).astype(np.uint8), "RGB")


def _noise_crop(size: int, rng: np.random.Generator) -> Image.Image:
    """A size x size window of the noise texture at a random offset."""
    ox, oy = (int(v) for v in rng.integers(0, size, size=2))
    return _noise_texture(size).crop((ox, oy, ox + size, oy + size))


def _field_mask(anatomy: Anatomy) -> Image.Image:
    """The camera's field of view: a disc, cropped top and bottom on some cameras, with a soft edge."""
    size = anatomy.size
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = anatomy.centre
    draw.ellipse(_box(cx, cy, anatomy.radius, anatomy.radius), fill=255)
    if anatomy.band < anatomy.radius:
        draw.rectangle((0, 0, size, cy - anatomy.band), fill=0)
        draw.rectangle((0, cy + anatomy.band, size, size), fill=0)
    return _soften(mask, max(0.5, size / 700))


# -- shapes -------------------------------------------------------------------------------------


def _box(x: float, y: float, rx: float, ry: float) -> tuple[float, float, float, float]:
    """Bounding box of an ellipse."""
    return (x - rx, y - ry, x + rx, y + ry)


def _blob(
    x: float, y: float, r: float, rng: np.random.Generator, roughness: float
) -> list[tuple[float, float]]:
    """An irregular roundish polygon of mean radius `r`: a circle bent by a few low harmonics."""
    angles = np.linspace(0, 2 * math.pi, 18, endpoint=False)
    amps = roughness * rng.uniform(0, 1, 3) * np.array([0.5, 0.35, 0.2])
    phases = rng.uniform(0, 2 * math.pi, 3)
    radii = r * (
        1.0 + sum(a * np.cos((k + 2) * angles + p) for k, (a, p) in enumerate(zip(amps, phases, strict=True)))
    )
    return list(
        zip((x + radii * np.cos(angles)).tolist(), (y + radii * np.sin(angles)).tolist(), strict=True)
    )


def _flame(
    x: float, y: float, half_length: float, u: tuple[float, float], rng: np.random.Generator
) -> list[tuple[float, float]]:
    """A flame (splinter) haemorrhage: elongated along `u`, blunt at one end and feathered at the other."""
    t = np.linspace(-1, 1, 9)
    half_width = half_length * rng.uniform(0.3, 0.42) * np.sqrt(1 - t**2) * (1.0 - 0.35 * (t + 1) / 2)
    wobble = 1.0 + rng.uniform(-0.2, 0.2, len(t))
    ux, uy = u
    vx, vy = -uy, ux
    cx, cy = x + t * half_length * ux, y + t * half_length * uy
    upper = list(
        zip((cx + vx * half_width * wobble).tolist(), (cy + vy * half_width * wobble).tolist(), strict=True)
    )
    lower = list(zip((cx - vx * half_width).tolist(), (cy - vy * half_width).tolist(), strict=True))
    return upper + lower[::-1]


def _ellipse_points(
    x: float,
    y: float,
    a: float,
    b: float,
    u: tuple[float, float],
    rng: np.random.Generator,
    jitter: float = 0.12,
) -> list[tuple[float, float]]:
    """A rotated ellipse (semi-axis `a` along `u`, `b` across) as a slightly irregular polygon."""
    theta = np.linspace(0, 2 * math.pi, 16, endpoint=False)
    wobble = 1.0 + rng.uniform(-jitter, jitter, len(theta))
    ux, uy = u
    px = x + (a * np.cos(theta) * ux - b * np.sin(theta) * uy) * wobble
    py = y + (a * np.cos(theta) * uy + b * np.sin(theta) * ux) * wobble
    return list(zip(px.tolist(), py.tolist(), strict=True))
