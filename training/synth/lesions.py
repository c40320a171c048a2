"""What diabetic-retinopathy lesions a synthetic photograph shows, planned from its ICDR and SDRG grades.

`plan_lesions` is pure: it decides lesion kinds, counts, positions and sizes, and draws no pixels. The
renderer (`training.synth.render`) turns a plan into pixels and reports what it drew as a
`LesionInventory`.

Positions are in the *retina frame*: origin at the fovea, x towards the optic disc (nasal), y superior,
unit = the radius of the camera's field of view. Hemi-fields are split by the horizontal line through the
fovea (y >= 0 is superior); quadrants also by the vertical line through it (x >= 0 is nasal).

Grade rules (what a plan guarantees):

- ICDR 0 / SDRG 0: no DR lesion. ICDR 1: microaneurysms only (2-8).
- ICDR 2: microaneurysms plus haemorrhages, exudates or cotton-wool spots; at most 16 microaneurysms and
  intraretinal haemorrhages in any quadrant (far from the 4-2-1 rule), no venous beading, IRMA, new
  vessels, pre-retinal haemorrhage or laser scars.
- ICDR 3: the 4-2-1 rule by at least one route (more than 20 intraretinal haemorrhages in each quadrant,
  venous beading in >= 2 quadrants, IRMA in >= 1 quadrant), nothing proliferative.
- ICDR 4 / SDRG 4: new vessels, pre-retinal haemorrhage or pan-retinal laser scars, usually with NPDR.
- SDRG 1: fewer than 4 blot haemorrhages in each hemi-field; SDRG 2: >= 4 blots in exactly one
  hemi-field; SDRG 3: >= 4 blots in both hemi-fields, or venous beading, or IRMA; SDRG 1-3: nothing
  proliferative.

Compatible (ICDR, SDRG) pairs are those both rule sets can hold at once: (0,0), (1,1), (2,1), (2,2),
(2,3), (3,2), (3,3), (4,4). (2,3) uses the blot route (blots in both hemi-fields, few per quadrant),
since venous beading or IRMA would make the eye severe. (3,2) uses the haemorrhage route with dot and
flame haemorrhages making up the more-than-20 per quadrant and blots kept to one hemi-field (IRMA or
beading would make it SDRG 3). (3,1) is not compatible although the letter of the rules allows it: more
than 80 intraretinal haemorrhages with fewer than four blots per hemi-field is not a background
retinopathy any grader would call R1. Any other pair is a grade conflict: the plan follows the ICDR
grade and says so.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

DR_LESIONS: tuple[str, ...] = (
    "microaneurysm",
    "dot_haemorrhage",
    "blot_haemorrhage",
    "flame_haemorrhage",
    "hard_exudate",
    "cotton_wool_spot",
    "venous_beading",
    "irma",
    "new_vessels_disc",
    "new_vessels_elsewhere",
    "preretinal_haemorrhage",
    "laser_scar",
)
"""The diabetic-retinopathy lesion kinds; any other inventory entry is a non-DR finding."""

INTRARETINAL_HAEMORRHAGES: tuple[str, ...] = ("dot_haemorrhage", "blot_haemorrhage", "flame_haemorrhage")
"""The haemorrhages the 4-2-1 rule counts."""

PROLIFERATIVE: tuple[str, ...] = (
    "new_vessels_disc",
    "new_vessels_elsewhere",
    "preretinal_haemorrhage",
    "laser_scar",
)
"""Lesions that make an eye ICDR 4 / SDRG R4 (proliferative or post-laser)."""

HEMIFIELDS: tuple[str, ...] = ("superior", "inferior")
QUADRANTS: tuple[str, ...] = ("superotemporal", "superonasal", "inferotemporal", "inferonasal")

COMPATIBLE_GRADES: frozenset[tuple[int, int]] = frozenset(
    {(0, 0), (1, 1), (2, 1), (2, 2), (2, 3), (3, 2), (3, 3), (4, 4)}
)
"""(ICDR, SDRG) pairs whose lesion rules can hold together (see the module docstring)."""

FIELD_CENTRE: tuple[float, float] = (0.04, 0.0)
"""Nominal centre of the camera's field of view in the retina frame (the fovea sits a little temporal)."""

PLAN_RADIUS = 0.9
"""Lesions are planned within this distance of `FIELD_CENTRE`; the renderer pulls any that an
off-centre field leaves outside back in along the line to the fovea (which keeps their quadrant)."""

NOMINAL_DISC: tuple[float, float] = (0.66, 0.065)
"""Nominal optic-disc centre in the retina frame; the anatomy varies it by a few hundredths."""

DISC_CLEARANCE = 0.24
"""Lesions other than NVD are planned at least this far from `NOMINAL_DISC`."""

MODERATE_QUADRANT_CAP = 16
"""ICDR 2: most microaneurysms plus intraretinal haemorrhages in one quadrant (4-2-1 needs > 20)."""

SEVERE_QUADRANT_MIN = 21
"""ICDR 3 by the haemorrhage route: fewest intraretinal haemorrhages in every quadrant."""

BLOT_THRESHOLD = 4
"""SDRG: blot haemorrhages in one hemi-field that make R2 (in both: R3)."""


def hemifield_of(y: float) -> str:
    """The hemi-field of a retina-frame point (the horizontal line through the fovea counts as superior)."""
    return "superior" if y >= 0 else "inferior"


def quadrant_of(x: float, y: float) -> str:
    """The quadrant of a retina-frame point: superior/inferior by y, nasal (towards the disc) by x >= 0."""
    return ("supero" if y >= 0 else "infero") + ("nasal" if x >= 0 else "temporal")


def grades_compatible(icdr: int | None, sdrg: int | None) -> bool:
    """Whether one image can satisfy both grades' lesion rules; a missing grade constrains nothing."""
    if icdr is None or sdrg is None:
        return True
    return (icdr, sdrg) in COMPATIBLE_GRADES


class DrawnLesion(BaseModel):
    """Where one DR lesion was drawn, in pixels of the written photograph: its centre (x to the right, y
    down, from the top-left corner) and `r`, the radius of a circle about the centre that holds the drawn
    shape (for an elongated lesion, its half-length; for venous beading, half the beaded run)."""

    model_config = ConfigDict(frozen=True)

    kind: str
    x: float
    y: float
    r: float


class LesionInventory(BaseModel):
    """What a rendered photograph shows: lesion counts by hemi-field and by quadrant.

    Only kinds that were drawn appear, each with every hemi-field and quadrant key. DR lesions use the
    names in `DR_LESIONS`; other findings their own names (a diffuse finding, such as tessellation, is
    counted once in each quadrant it covers).

    `lesions`: every DR lesion as drawn, in pixels of the photograph (`DrawnLesion`); None in a plan's
    inventory (nothing drawn yet) and in archives written before positions were recorded.
    """

    model_config = ConfigDict(frozen=True)

    counts: dict[str, dict[str, int]]
    quadrant_counts: dict[str, dict[str, int]]
    grade_conflict: bool = False
    lesions: list[DrawnLesion] | None = None

    def total(self, lesion: str) -> int:
        """How many lesions of this kind were drawn (0 when none)."""
        return sum(self.counts.get(lesion, {}).values())

    def in_quadrant(self, lesion: str, quadrant: str) -> int:
        """How many lesions of this kind lie in the quadrant."""
        return self.quadrant_counts.get(lesion, {}).get(quadrant, 0)

    def in_hemifield(self, lesion: str, hemifield: str) -> int:
        """How many lesions of this kind lie in the hemi-field."""
        return self.counts.get(lesion, {}).get(hemifield, 0)

    def dr_lesions(self) -> list[str]:
        """The DR lesion kinds present."""
        return [kind for kind in DR_LESIONS if self.total(kind) > 0]

    @classmethod
    def from_points(
        cls,
        points: Iterable[tuple[str, float, float]],
        grade_conflict: bool = False,
        lesions: Iterable[DrawnLesion] | None = None,
    ) -> LesionInventory:
        """Count (kind, x, y) retina-frame points into an inventory (with the drawn DR lesions in pixels,
        when given)."""
        counts: dict[str, dict[str, int]] = {}
        quadrants: dict[str, dict[str, int]] = {}
        for kind, x, y in points:
            if kind not in counts:
                counts[kind] = dict.fromkeys(HEMIFIELDS, 0)
                quadrants[kind] = dict.fromkeys(QUADRANTS, 0)
            counts[kind][hemifield_of(y)] += 1
            quadrants[kind][quadrant_of(x, y)] += 1
        drawn = None if lesions is None else list(lesions)
        return cls(counts=counts, quadrant_counts=quadrants, grade_conflict=grade_conflict, lesions=drawn)


@dataclass(frozen=True, slots=True)
class PlannedLesion:
    """One lesion to draw. `size` is a radius (half-length for elongated kinds) in field radii; `angle`
    an orientation in the retina frame (radians); `strength` its opacity or darkness, 0-1."""

    kind: str
    x: float
    y: float
    size: float
    angle: float = 0.0
    strength: float = 1.0


@dataclass(frozen=True, slots=True)
class LesionPlan:
    """The DR lesions of one photograph and the grades they were planned for.

    `icdr`/`sdrg` are the grades the lesions satisfy: the record's, or, when one was missing or the pair
    conflicts, a compatible stand-in (a conflict keeps the ICDR grade and sets `grade_conflict`).
    """

    icdr: int
    sdrg: int
    grade_conflict: bool
    lesions: tuple[PlannedLesion, ...]

    def inventory(self) -> LesionInventory:
        """The inventory of the plan as planned (the renderer keeps every lesion's quadrant)."""
        return LesionInventory.from_points(
            ((les.kind, les.x, les.y) for les in self.lesions), grade_conflict=self.grade_conflict
        )


# SDRG grades each ICDR grade can be drawn with, and the reverse.
_SDRG_FOR_ICDR: dict[int, tuple[int, ...]] = {0: (0,), 1: (1,), 2: (1, 2, 3), 3: (2, 3), 4: (4,)}
_ICDR_FOR_SDRG: dict[int, tuple[int, ...]] = {0: (0,), 1: (1, 2), 2: (2, 3), 3: (2, 3), 4: (4,)}


def resolve_grades(icdr: int | None, sdrg: int | None, rng: np.random.Generator) -> tuple[int, int, bool]:
    """The (ICDR, SDRG) pair to draw and whether the record's grades conflict.

    Both missing: no DR. One missing: follow the other, with a compatible partner drawn at random.
    Incompatible: keep the ICDR grade, pair it with a compatible SDRG grade, and report a conflict.
    """
    if icdr is None and sdrg is None:
        return 0, 0, False
    if icdr is None:
        assert sdrg is not None
        return int(rng.choice(_ICDR_FOR_SDRG[sdrg])), sdrg, False
    if sdrg is None:
        return icdr, int(rng.choice(_SDRG_FOR_ICDR[icdr])), False
    if (icdr, sdrg) in COMPATIBLE_GRADES:
        return icdr, sdrg, False
    return icdr, int(rng.choice(_SDRG_FOR_ICDR[icdr])), True


def plan_lesions(icdr: int | None, sdrg: int | None, rng: np.random.Generator) -> LesionPlan:
    """Plan the DR lesions of one photograph so that they satisfy its grades (see the module docstring).

    Pure: consumes only `rng`, draws nothing.
    """
    draw_icdr, draw_sdrg, conflict = resolve_grades(icdr, sdrg, rng)
    planner = _Planner(rng)
    if draw_icdr == 1:
        planner.mild()
    elif draw_icdr == 2:
        planner.moderate(draw_sdrg)
    elif draw_icdr == 3:
        planner.severe(draw_sdrg)
    elif draw_icdr == 4:
        planner.proliferative()
    return LesionPlan(icdr=draw_icdr, sdrg=draw_sdrg, grade_conflict=conflict, lesions=tuple(planner.lesions))


# Quadrant order of per-quadrant count arrays: QUADRANTS. Hemi-field of each quadrant index:
_SUPERIOR_QUADRANTS = (0, 1)
_INFERIOR_QUADRANTS = (2, 3)
_QUADRANT_SIGNS = ((-1.0, 1.0), (1.0, 1.0), (-1.0, -1.0), (1.0, -1.0))  # (x sign, y sign)

# Radius ranges (field radii) by kind: (low, high).
_SIZES: dict[str, tuple[float, float]] = {
    "microaneurysm": (0.016, 0.021),
    "dot_haemorrhage": (0.02, 0.029),
    "blot_haemorrhage": (0.038, 0.062),
    "flame_haemorrhage": (0.05, 0.085),
    "hard_exudate": (0.011, 0.018),
    "cotton_wool_spot": (0.036, 0.06),
    "venous_beading": (0.08, 0.13),
    "irma": (0.06, 0.09),
    "new_vessels_disc": (0.13, 0.2),
    "new_vessels_elsewhere": (0.07, 0.11),
    "preretinal_haemorrhage": (0.07, 0.13),
    "laser_scar": (0.015, 0.03),
}

# Where each kind is planned: distance from the fovea (low, high), field radii.
_RADII: dict[str, tuple[float, float]] = {
    "microaneurysm": (0.06, 0.8),
    "dot_haemorrhage": (0.06, 0.88),
    "blot_haemorrhage": (0.08, 0.85),
    "flame_haemorrhage": (0.1, 0.85),
    "cotton_wool_spot": (0.18, 0.7),
    "venous_beading": (0.3, 0.8),
    "irma": (0.2, 0.75),
    "new_vessels_elsewhere": (0.3, 0.8),
    "preretinal_haemorrhage": (0.2, 0.7),
}


def nerve_fibre_angle(x: float, y: float) -> float:
    """Direction of the nerve fibre layer at a retina-frame point: roughly radial from the optic disc,
    bending to arch around the fovea on the temporal side."""
    dx, dy = x - NOMINAL_DISC[0], y - NOMINAL_DISC[1]
    angle = math.atan2(dy, dx)
    if x < 0.25:
        # Temporal fibres arc above and below the fovea: flatten the direction towards horizontal.
        angle = math.atan2(dy * 0.45, dx)
    return angle


class _Planner:
    """Accumulates planned lesions; one method per ICDR grade."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.lesions: list[PlannedLesion] = []

    # -- grades -------------------------------------------------------------------------------

    def mild(self) -> None:
        """ICDR 1 / SDRG 1: a few microaneurysms and nothing else."""
        total = int(self.rng.integers(2, 9))
        self.scatter("microaneurysm", self.split(total))

    def moderate(self, sdrg: int) -> None:
        """ICDR 2, with blots by the SDRG grade (1: < 4 per hemi-field, 2: one hemi-field, 3: both)."""
        rng = self.rng
        blots = self.blots_by_hemifield(sdrg, low=4, high=7)
        mas = self.split(int(rng.integers(4, 15)))
        dots = self.split(int(rng.integers(1, 11)))
        flames = self.split(int(rng.integers(1, 5))) if rng.random() < 0.5 else np.zeros(4, int)
        # Keep every quadrant well below the 4-2-1 rule, counting microaneurysms too.
        for q in range(4):
            while mas[q] + dots[q] + flames[q] + blots[q] > MODERATE_QUADRANT_CAP:
                if dots[q] > 0 and dots.sum() > 1:
                    dots[q] -= 1
                elif flames[q] > 0:
                    flames[q] -= 1
                else:
                    mas[q] -= 1
        if mas.sum() == 0:
            mas[int(rng.integers(4))] = 1
        self.scatter("microaneurysm", mas)
        self.scatter("dot_haemorrhage", dots)
        self.scatter("blot_haemorrhage", blots)
        self.scatter("flame_haemorrhage", flames)
        if rng.random() < 0.55:
            self.exudate_clusters(int(rng.integers(1, 3)))
        if rng.random() < 0.35:
            self.scatter("cotton_wool_spot", self.split(int(rng.integers(1, 4))))

    def severe(self, sdrg: int) -> None:
        """ICDR 3 by one or more 4-2-1 routes; SDRG 2 allows only the haemorrhage route with blots in
        one hemi-field, SDRG 3 any route."""
        rng = self.rng
        if sdrg == 2:
            routes = {"haemorrhages"}
        else:
            routes = {str(rng.choice(["haemorrhages", "beading", "irma"], p=[0.45, 0.3, 0.25]))}
            for extra in ("haemorrhages", "beading", "irma"):
                if rng.random() < 0.25:
                    routes.add(extra)
        if "haemorrhages" in routes:
            blots = self.blots_by_hemifield(sdrg, low=4, high=8)
            totals = rng.integers(SEVERE_QUADRANT_MIN + 1, 31, size=4)
            rest = np.maximum(totals - blots, 0)
            flames = rng.binomial(rest, 0.25)
            dots = rest - flames
        else:
            blots = self.split(int(rng.integers(0, 13)))
            dots = rng.integers(3, 13, size=4)
            flames = rng.integers(0, 4, size=4)
        self.scatter("blot_haemorrhage", blots)
        self.scatter("dot_haemorrhage", dots)
        self.scatter("flame_haemorrhage", flames)
        self.scatter("microaneurysm", self.split(int(rng.integers(10, 31))))
        if "beading" in routes:
            quadrants = rng.choice(4, size=int(rng.integers(2, 5)), replace=False)
            self.scatter("venous_beading", np.bincount(quadrants, minlength=4))
        if "irma" in routes:
            quadrants = rng.choice(4, size=int(rng.integers(1, 4)), replace=False)
            counts = np.bincount(quadrants, minlength=4) * rng.integers(1, 3, size=4)
            self.scatter("irma", counts)
        if rng.random() < 0.65:
            self.exudate_clusters(int(rng.integers(1, 4)))
        if rng.random() < 0.6:
            self.scatter("cotton_wool_spot", self.split(int(rng.integers(2, 7))))

    def proliferative(self) -> None:
        """ICDR 4 / SDRG 4: active new vessels (with or without pre-retinal haemorrhage) or pan-retinal
        laser scars, over a moderate or severe background."""
        rng = self.rng
        lasered = rng.random() < 0.4
        if lasered:
            self.laser_scars()
            self.moderate(int(rng.integers(1, 4)))
            if rng.random() < 0.25:
                self.new_vessels(disc=rng.random() < 0.5, elsewhere=0)
            return
        if rng.random() < 0.5:
            self.moderate(int(rng.integers(1, 4)))
        else:
            self.severe(int(rng.integers(2, 4)))
        disc = rng.random() < 0.55
        elsewhere = int(rng.integers(0, 4))
        if not disc and elsewhere == 0:
            elsewhere = 1
        self.new_vessels(disc=disc, elsewhere=elsewhere)
        if rng.random() < 0.35:
            self.scatter("preretinal_haemorrhage", self.split(int(rng.integers(1, 3))))

    # -- building blocks ----------------------------------------------------------------------

    def split(self, total: int) -> np.ndarray:
        """Split a count over the four quadrants with uneven random weights."""
        weights = self.rng.dirichlet(np.full(4, 1.5))
        return self.rng.multinomial(total, weights)

    def blots_by_hemifield(self, sdrg: int, low: int, high: int) -> np.ndarray:
        """Per-quadrant blot counts meeting the SDRG blot rule: SDRG 1 fewer than 4 in each hemi-field,
        SDRG 2 `low`..`high` in one hemi-field and fewer than 3 in the other, SDRG 3 `low`..`high` in both."""
        rng = self.rng
        if sdrg >= 3:
            superior, inferior = int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))
        elif sdrg == 2:
            superior, inferior = int(rng.integers(low, high + 1)), int(rng.integers(0, 3))
            if rng.random() < 0.5:
                superior, inferior = inferior, superior
        else:
            superior, inferior = int(rng.integers(0, BLOT_THRESHOLD)), int(rng.integers(0, BLOT_THRESHOLD))
        counts = np.zeros(4, int)
        for hemi_total, (qa, qb) in ((superior, _SUPERIOR_QUADRANTS), (inferior, _INFERIOR_QUADRANTS)):
            counts[qa] = rng.binomial(hemi_total, rng.uniform(0.25, 0.75))
            counts[qb] = hemi_total - counts[qa]
        return counts

    def scatter(self, kind: str, per_quadrant: np.ndarray) -> None:
        """Add `per_quadrant[q]` lesions of `kind` at random positions in each quadrant."""
        r_low, r_high = _RADII[kind]
        for q, n in enumerate(per_quadrant):
            if n <= 0:
                continue
            for x, y in self.points_in_quadrant(int(n), q, r_low, r_high):
                self.add(kind, x, y)

    def add(self, kind: str, x: float, y: float) -> None:
        """Add one lesion of `kind` at (x, y) with a size, orientation and strength drawn for its kind."""
        rng = self.rng
        low, high = _SIZES[kind]
        size = float(rng.uniform(low, high))
        if kind in ("flame_haemorrhage", "cotton_wool_spot"):
            angle = nerve_fibre_angle(x, y) + float(rng.normal(0, 0.15))
        else:
            angle = float(rng.uniform(0, math.pi))
        strength = float(rng.uniform(0.8, 1.0))
        self.lesions.append(PlannedLesion(kind, float(x), float(y), size, angle, strength))

    def points_in_quadrant(self, n: int, quadrant: int, r_low: float, r_high: float) -> np.ndarray:
        """`n` uniform points of one quadrant, within the planned field, off the disc, and `r_low`..`r_high`
        from the fovea (the lower bound relaxes if the region is too small to fill)."""
        sx, sy = _QUADRANT_SIGNS[quadrant]
        found: list[np.ndarray] = []
        have = 0
        for attempt in range(60):
            low = r_low if attempt < 40 else 0.0
            cand = self.rng.uniform(0.0, 1.0, size=(4 * n + 16, 2))
            cand[:, 0] *= sx
            cand[:, 1] *= sy
            keep = _valid(cand, low, r_high, DISC_CLEARANCE)
            found.append(cand[keep])
            have += int(keep.sum())
            if have >= n:
                break
        points = np.concatenate(found)[:n]
        if len(points) < n:  # pragma: no cover - the quadrant regions are never that small
            raise RuntimeError(f"could not place {n} lesions in quadrant {QUADRANTS[quadrant]}")
        return points

    def exudate_clusters(self, clusters: int) -> None:
        """Hard exudates in clusters near the macula: rings (circinate) or clumps of 4-14 spots."""
        rng = self.rng
        for _ in range(clusters):
            centre = self.points_in_quadrant(1, int(rng.integers(4)), 0.12, 0.45)[0]
            n = int(rng.integers(4, 15))
            if rng.random() < 0.4:
                ring = rng.uniform(0.04, 0.09)
                theta = rng.uniform(0, 2 * math.pi, n)
                rho = ring * rng.uniform(0.85, 1.15, n)
                spots = centre + np.stack([rho * np.cos(theta), rho * np.sin(theta)], axis=1)
            else:
                spots = centre + rng.normal(0, 0.028, size=(n, 2))
            for x, y in spots[_valid(spots, 0.03, 0.88, DISC_CLEARANCE)]:
                self.add("hard_exudate", x, y)

    def laser_scars(self) -> None:
        """Pan-retinal photocoagulation: a jittered hexagonal grid of burns outside the arcades, sparing
        the macula and the disc, some patches left untreated."""
        rng = self.rng
        spacing = rng.uniform(0.065, 0.085)
        rows = np.arange(-1.0, 1.0, spacing * 0.866)
        xs, ys = [], []
        for i, y in enumerate(rows):
            offset = spacing / 2 if i % 2 else 0.0
            row_x = np.arange(-1.0 + offset, 1.0, spacing)
            xs.append(row_x)
            ys.append(np.full_like(row_x, y))
        grid = np.stack([np.concatenate(xs), np.concatenate(ys)], axis=1)
        grid += rng.normal(0, spacing * 0.12, size=grid.shape)
        keep = _valid(grid, 0.5, 2.0, DISC_CLEARANCE + 0.06) & (
            rng.random(len(grid)) < rng.uniform(0.7, 0.95)
        )
        for x, y in grid[keep]:
            self.add("laser_scar", x, y)

    def new_vessels(self, disc: bool, elsewhere: int) -> None:
        """New vessels at the disc (NVD) and/or `elsewhere` fronds along the vessels (NVE)."""
        if disc:
            self.add("new_vessels_disc", *NOMINAL_DISC)
        if elsewhere:
            quadrants = self.rng.choice(4, size=elsewhere, replace=True)
            self.scatter("new_vessels_elsewhere", np.bincount(quadrants, minlength=4))


def _valid(points: np.ndarray, r_low: float, r_high: float, disc_clearance: float) -> np.ndarray:
    """Mask of retina-frame points inside the planned field, `r_low`..`r_high` from the fovea and at
    least `disc_clearance` from the nominal disc."""
    x, y = points[:, 0], points[:, 1]
    r = np.hypot(x, y)
    in_field = np.hypot(x - FIELD_CENTRE[0], y - FIELD_CENTRE[1]) <= PLAN_RADIUS
    off_disc = np.hypot(x - NOMINAL_DISC[0], y - NOMINAL_DISC[1]) >= disc_clearance
    return in_field & off_disc & (r >= r_low) & (r <= r_high)
