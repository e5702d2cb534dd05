"""Demo imaging for a new installation: a few fictional patients with a CT, MRs and chest
radiographs that look like the real thing in a viewer, and the loading of them (and,
optionally, of the public test corpus) through the ingest service.

Everything is synthetic. The pixel data are drawn from simple geometric phantoms in
tissue-like units (Hounsfield units for CT, relative signal for MR, log attenuation for
CR), so window/level presets behave as they do on clinical images. The same seed gives
the same bytes and the same UIDs, which is what makes a second load a no-op."""

import enum
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path

import numpy as np
from django.conf import settings
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.misc import is_dicom
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

DEFAULT_SEED = 1729
DEFAULT_CT_SLICES = 220
# Apex of the lungs to the hips: a chest/abdomen/pelvis scan. Fewer slices cover the
# same anatomy further apart, so a short test series still shows every region.
CT_COVERAGE_MM = 550
MANUFACTURER = "Synthetic demo modality"
SYNTHETIC_NOTE = "Synthetic demo image; not a real patient."


# --- The cast -------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoPatient:
    name: str  # DICOM PN: Family^Given^Middle
    patient_id: str
    issuer: str
    birth_date: date
    sex: str


@dataclass(frozen=True)
class DemoStudy:
    key: str  # stable part of the UIDs and of the file names
    patient: DemoPatient
    modality: str
    description: str
    days_ago: int
    time: str  # HHMMSS
    accession: str
    study_id: str
    referring: str
    institution: str
    station: str
    # None leaves SpecificCharacterSet out: the default repertoire (ASCII), as many
    # older devices write it.
    charset: str | None


TREMBLAY = DemoPatient("Tremblay^Marie^Louise", "4410273", "LRH", date(1961, 3, 14), "F")
OKAFOR = DemoPatient("Okafor^Daniel", "3982615", "LRH", date(1978, 11, 2), "M")
NGUYEN = DemoPatient("Nguyen^Linh", "5127740", "NCC", date(1990, 7, 22), "F")
GAGNE = DemoPatient("Gagné^Étienne", "2206184", "CSL", date(1954, 9, 30), "M")
DEMO_PATIENTS = (TREMBLAY, OKAFOR, NGUYEN, GAGNE)

# Newest first; a CT a few weeks old with a chest radiograph years earlier as its prior,
# so "priors" has something to show.
DEMO_STUDIES = (
    DemoStudy("ct-cap", TREMBLAY, "CT", "CT CHEST ABDOMEN PELVIS W CONTRAST", 19, "104215",
              "LR20517733", "51733", "Chen^Andrew^^Dr", "Lakeview Regional Hospital",
              "LRH-CT2", "ISO_IR 192"),
    DemoStudy("cr-chest-nguyen", NGUYEN, "CR", "XR CHEST PA AND LATERAL", 61, "083007",
              "NC3318204", "18204", "Morrison^Helen^^Dr", "Northgate Community Clinic",
              "NCC-CR1", None),
    DemoStudy("mr-brain-okafor", OKAFOR, "MR", "MRI BRAIN WO CONTRAST", 243, "151922",
              "LR19876021", "76021", "Patel^Ravi^^Dr", "Lakeview Regional Hospital",
              "LRH-MR1", "ISO_IR 192"),
    DemoStudy("cr-chest-tremblay", TREMBLAY, "CR", "XR CHEST 2 VIEWS", 3 * 365 + 41, "091455",
              "NC2290417", "90417", "Bouchard^Sylvie^^Dr", "Northgate Community Clinic",
              "NCC-CR1", None),
    DemoStudy("mr-brain-gagne", GAGNE, "MR", "IRM CERVEAU", 6 * 365 + 102, "132840",
              "CSL0044871", "4871", "Lefebvre^Julien^^Dr", "Clinique Médicale Saint-Laurent",
              "CSL-MR", "ISO_IR 100"),
)


def demo_uid(seed: int, *parts: object) -> str:
    """A valid UID that depends only on the seed and the parts, so regenerating the demo
    gives the same study, series and instance UIDs. The parts are joined with a
    separator because pydicom concatenates its entropy sources as they are."""
    return generate_uid(entropy_srcs=["/".join(["pockethealth-demo", str(seed), *map(str, parts)])])


def study_date(study: DemoStudy, anchor: date) -> date:
    return anchor - timedelta(days=study.days_ago)


# --- Painting on a millimetre grid ---------------------------------------------------


class Canvas:
    """A label image on a grid measured in millimetres from its centre (x to the right,
    y down). Shapes are evaluated inside their bounding box only, so a small organ costs
    a small array operation; later shapes paint over earlier ones."""

    def __init__(self, rows: int, columns: int, spacing: float):
        self.labels = np.zeros((rows, columns), np.uint8)
        self.xs = ((np.arange(columns) - (columns - 1) / 2) * spacing).astype(np.float32)
        self.ys = ((np.arange(rows) - (rows - 1) / 2) * spacing).astype(np.float32)

    def ellipse(self, label: int, cx: float, cy: float, ax: float, ay: float, *,
                angle: float = 0.0, power: float = 2.0, inside: tuple[int, ...] = (),
                outline: Callable[[np.ndarray], np.ndarray] | None = None,
                y_max: float | None = None) -> None:
        """Paint a (super)ellipse. ``angle`` in degrees; ``inside`` limits the paint to
        pixels that already carry one of those labels; ``outline`` maps the angle around
        the centre to a radius factor (at most 1), for folded shapes such as the cortex;
        ``y_max`` keeps only the part above that height (y grows downwards), as gas
        above a fluid level."""
        if ax <= 0.5 or ay <= 0.5:
            return
        reach_x, reach_y = (max(ax, ay),) * 2 if angle else (ax, ay)
        c0, c1 = np.searchsorted(self.xs, [cx - reach_x, cx + reach_x])
        r0, r1 = np.searchsorted(self.ys, [cy - reach_y, cy + reach_y])
        if c0 >= c1 or r0 >= r1:
            return
        dx = self.xs[c0:c1][None, :] - cx
        dy = self.ys[r0:r1][:, None] - cy
        if angle:
            cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
            dx, dy = dx * cos + dy * sin, dy * cos - dx * sin
        u, v = dx / ax, dy / ay
        if power == 2.0:
            level = u * u + v * v
        else:
            level = np.abs(u) ** power + np.abs(v) ** power
        if outline is not None:
            radius = outline(np.arctan2(v, u))
            level = level / (radius * radius)
        mask = level <= 1.0
        region = self.labels[r0:r1, c0:c1]
        if inside:
            mask &= np.isin(region, inside)
        if y_max is not None:
            mask &= np.broadcast_to(self.ys[r0:r1][:, None] <= y_max, mask.shape)
        region[mask] = label


def smooth(image: np.ndarray) -> np.ndarray:
    """3x3 binomial blur: the partial-volume softening a real reconstruction has, so
    painted edges do not alias."""
    padded = np.pad(image, 1, mode="edge")
    rows = padded[:-2] + 2 * padded[1:-1] + padded[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 16


def profile(t: float, start: float, end: float, sharpness: float = 0.6) -> float:
    """0 outside [start, end], rising to 1 mid-way: how big an organ is at depth ``t``."""
    if not start < t < end:
        return 0.0
    return math.sin(math.pi * (t - start) / (end - start)) ** sharpness


# --- CT: chest, abdomen and pelvis -----------------------------------------------------


class CT(enum.IntEnum):
    AIR = 0
    SKIN = enum.auto()
    FAT = enum.auto()
    MUSCLE = enum.auto()
    LUNG = enum.auto()
    LUNG_VESSEL = enum.auto()
    SOFT = enum.auto()
    BLOOD = enum.auto()
    MYOCARDIUM = enum.auto()
    LIVER = enum.auto()
    PORTAL = enum.auto()
    SPLEEN = enum.auto()
    KIDNEY_CORTEX = enum.auto()
    KIDNEY_MEDULLA = enum.auto()
    PANCREAS = enum.auto()
    FLUID = enum.auto()
    BOWEL = enum.auto()
    STOOL = enum.auto()
    GAS = enum.auto()
    CORTICAL = enum.auto()
    CANCELLOUS = enum.auto()
    DISC = enum.auto()
    CSF = enum.auto()
    CARTILAGE = enum.auto()
    GLANDULAR = enum.auto()
    UTERUS = enum.auto()
    IVC = enum.auto()
    COUCH_SHELL = enum.auto()
    COUCH_CORE = enum.auto()


# Portal-venous phase after iodinated contrast: enhanced blood, liver, spleen, kidneys.
CT_HU = {
    CT.AIR: -1000, CT.SKIN: 35, CT.FAT: -105, CT.MUSCLE: 52, CT.LUNG: -865,
    CT.LUNG_VESSEL: 40, CT.SOFT: 40, CT.BLOOD: 165, CT.MYOCARDIUM: 105, CT.LIVER: 112,
    CT.PORTAL: 175, CT.SPLEEN: 122, CT.KIDNEY_CORTEX: 190, CT.KIDNEY_MEDULLA: 135,
    CT.PANCREAS: 98, CT.FLUID: 8, CT.BOWEL: 28, CT.STOOL: -60, CT.GAS: -960,
    CT.CORTICAL: 1150, CT.CANCELLOUS: 240, CT.DISC: 85, CT.CSF: 14, CT.CARTILAGE: 95,
    CT.GLANDULAR: 20, CT.UTERUS: 92, CT.IVC: 130, CT.COUCH_SHELL: 320, CT.COUCH_CORE: -780,
}
CT_LUT = np.array([CT_HU[label] for label in CT], np.float32)
CT_NOISE_HU = 13.0


def _spine_levels() -> np.ndarray:
    """Depths (mm below the lung apex) of the top of each vertebral body from T1 to L5;
    the sacrum starts where the last one ends."""
    heights = [21, 21, 22, 22, 23, 23, 24, 24, 25, 25, 26, 26] + [33] * 5
    return -20 + np.concatenate([[0], np.cumsum(heights)]).astype(np.float32)


@dataclass(frozen=True)
class _Section:
    """The body outline at one depth, in mm, that the organs are placed against."""

    ax: float  # half-width of the skin outline
    ay: float  # half-depth, front to back
    cy: float  # centre, from the centre of the image
    ix: float  # half-width inside the abdominal or chest wall muscles
    iy: float
    fat: float  # subcutaneous fat thickness
    front: float  # y of the skin at the front
    back: float  # y of the skin at the back
    vr: float  # vertebral body radius
    vy: float  # y of the vertebral body centre


@dataclass(frozen=True)
class _BowelLoop:
    x: float  # centre, as a fraction of the abdomen's inner half-width
    y: float  # and half-depth, from its centre
    radius: float  # mm
    start: float  # depth where it appears, as a fraction of the scan
    length: float
    phase: float  # of the meander that shifts it from slice to slice
    gassy: bool


class CtPhantom:
    """An axial chest/abdomen/pelvis phantom in Hounsfield units, 512x512 at 0.78 mm.
    ``slice_hu(depth_mm)`` draws the anatomy at a depth below the lung apex; organs start,
    grow and end along the body as they do in a real scan."""

    size = 512
    spacing = 400 / 512  # 40 cm reconstruction field

    def __init__(self, seed: int, *, female: bool):
        self.seed = seed
        self.female = female
        self.levels = _spine_levels()
        layout = np.random.default_rng([seed, 0xC7])
        # Small-bowel loops: where they sit and over which depths, fixed for the scan so a
        # loop can be followed from slice to slice.
        self.loops = [
            _BowelLoop(x=layout.uniform(-0.55, 0.55), y=layout.uniform(-0.75, 0.15),
                       radius=layout.uniform(9, 15), start=layout.uniform(0.50, 0.78),
                       length=layout.uniform(0.05, 0.11), phase=layout.uniform(0, 6.3),
                       gassy=layout.random() < 0.35)
            for _ in range(16)
        ]
        canvas = Canvas(self.size, self.size, self.spacing)
        x, y = canvas.xs[None, :], canvas.ys[:, None]
        self.outside_fov = (x * x + y * y) > 250.0**2
        couch_top = 126 + 0.0007 * x * x
        across = np.abs(x) < 215
        self.couch_shell = across & (((y >= couch_top) & (y < couch_top + 2))
                                     | ((y >= couch_top + 9) & (y < couch_top + 11)))
        self.couch_core = across & (y >= couch_top + 2) & (y < couch_top + 9)

    def slice_hu(self, depth_mm: float) -> np.ndarray:
        """The slice at ``depth_mm`` as int16 Hounsfield units."""
        canvas = Canvas(self.size, self.size, self.spacing)
        canvas.labels[self.couch_shell] = CT.COUCH_SHELL
        canvas.labels[self.couch_core] = CT.COUCH_CORE
        t = depth_mm / CT_COVERAGE_MM
        rng = np.random.default_rng([self.seed, 0xC7, round(depth_mm * 100)])
        body = self._body(canvas, t)
        self._thorax(canvas, t, body, rng)
        self._abdomen(canvas, t, body)
        self._pelvis(canvas, t, body)
        self._skeleton(canvas, t, depth_mm, body)

        hu = CT_LUT[canvas.labels]
        stool = canvas.labels == CT.STOOL
        # Faeces are a mottle of gas and solid rather than one density.
        hu[stool] += rng.normal(0, 260, int(stool.sum())).astype(np.float32)
        hu = smooth(hu)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * CT_NOISE_HU
        # Outside the reconstructed circle a scanner writes its lowest value.
        hu[self.outside_fov] = -1024
        return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)

    def _body(self, canvas: Canvas, t: float) -> _Section:
        ax = float(np.interp(t, [0, 0.05, 0.15, 0.35, 0.5, 0.7, 0.85, 1],
                             [168, 172, 160, 158, 150, 158, 172, 170]))
        ay = float(np.interp(t, [0, 0.05, 0.15, 0.35, 0.5, 0.7, 0.85, 1],
                             [100, 108, 114, 117, 111, 106, 108, 104]))
        cy = 126.0 - ay  # lying on the couch, the back just touching it
        fat = float(np.interp(t, [0, 0.35, 0.55, 0.85, 1], [10, 13, 24, 26, 22]))
        wall = 11.0
        canvas.ellipse(CT.SKIN, 0, cy, ax, ay, power=2.4)
        canvas.ellipse(CT.FAT, 0, cy, ax - 2, ay - 2, power=2.4)
        canvas.ellipse(CT.MUSCLE, 0, cy, ax - 2 - fat, ay - 2 - fat, power=2.4)
        inner_x, inner_y = ax - 2 - fat - wall, ay - 2 - fat - wall
        canvas.ellipse(CT.FAT, 0, cy, inner_x, inner_y, power=2.4)
        if self.female and 0.12 < t < 0.34:
            size = profile(t, 0.12, 0.34)
            for side in (-1, 1):
                bx, by = side * 70, cy - ay + 14
                canvas.ellipse(CT.SKIN, bx, by, 64 * size, 34 * size, inside=(CT.AIR, CT.SKIN))
                canvas.ellipse(CT.FAT, bx, by, 62 * size, 32 * size,
                               inside=(CT.AIR, CT.SKIN, CT.FAT))
                canvas.ellipse(CT.GLANDULAR, bx, by - 8, 32 * size, 14 * size, inside=(CT.FAT,))
        posterior = cy + ay
        vertebra_r = float(np.interp(t, [0, 0.4, 0.75], [14, 18, 23]))
        vertebra_y = posterior - float(np.interp(t, [0, 0.4, 0.75, 1], [70, 74, 80, 74]))
        # Paraspinal muscles sit either side of the spinous processes.
        for side in (-1, 1):
            canvas.ellipse(CT.MUSCLE, side * 36, vertebra_y + 40, 27, 24, inside=(CT.FAT,))
        return _Section(ax=ax, ay=ay, cy=cy, ix=inner_x, iy=inner_y, fat=fat,
                        front=cy - ay, back=posterior, vr=vertebra_r, vy=vertebra_y)

    def _thorax(self, canvas: Canvas, t: float, body: _Section, rng) -> None:
        cy, ix, iy, vy, vr = body.cy, body.ix, body.iy, body.vy, body.vr
        # The right hemidiaphragm sits higher than the left: the liver is under it.
        for side, end in ((-1, 0.405), (1, 0.425)):
            size = profile(t, -0.02, end, 0.45)
            if size:
                canvas.ellipse(CT.LUNG, side * ix * 0.48, cy + 4, ix * 0.47 * size,
                               iy * 0.86 * size, power=2.2, inside=(CT.FAT,))
        if t < 0.43:
            # Vessels seen end-on: the grey dots of a lung window, thicker near the hila.
            for side in (-1, 1):
                hx, hy = side * ix * 0.28, cy
                for _ in range(80):
                    angle = rng.uniform(0, 2 * math.pi)
                    reach = rng.uniform(0.1, 1.0)
                    px = hx + math.cos(angle) * reach * ix * 0.6
                    py = hy + math.sin(angle) * reach * iy * 0.9
                    radius = 0.5 + 3.0 * (1 - reach) ** 2
                    canvas.ellipse(CT.LUNG_VESSEL, px, py, radius, radius, inside=(CT.LUNG,))
        mediastinum_y = vy - vr
        if t < 0.15:  # trachea, in front of the oesophagus
            canvas.ellipse(CT.SOFT, 0, mediastinum_y - 22, 11, 10)
            canvas.ellipse(CT.AIR, 0, mediastinum_y - 22, 9, 8)
        elif t < 0.21:  # below the carina: the main bronchi part to each lung
            spread = 12 + 160 * (t - 0.15)
            for side in (-1, 1):
                canvas.ellipse(CT.SOFT, side * spread, mediastinum_y - 22, 8, 8)
                canvas.ellipse(CT.AIR, side * spread, mediastinum_y - 22, 6, 6)
        if t < 0.40:
            canvas.ellipse(CT.MUSCLE, 4, mediastinum_y - 7, 8, 6)  # oesophagus
        if 0.06 < t < 0.17:
            canvas.ellipse(CT.BLOOD, -24, cy - 28, 10, 10)  # superior vena cava
        if 0.075 < t < 0.10:
            # The arch runs from front right to back left above the heart.
            canvas.ellipse(CT.BLOOD, 2, (cy - 22 + vy - 2) / 2, 30, 12, angle=55)
        if 0.10 < t < 0.22:
            canvas.ellipse(CT.BLOOD, -12, cy - 22, 15, 15)  # ascending aorta
        if 0.14 < t < 0.19:
            canvas.ellipse(CT.BLOOD, 8, cy - 34, 14, 14)  # pulmonary trunk
        if 0.17 < t < 0.40:
            # The heart points forward and to the left, in its fat; two chambers of
            # contrast-filled blood inside the muscle.
            size = profile(t, 0.17, 0.40, 0.7)
            hx, hy = 24, cy - 12
            canvas.ellipse(CT.FAT, hx, hy, 68 * size, 56 * size, angle=-30)
            canvas.ellipse(CT.MYOCARDIUM, hx, hy, 62 * size, 50 * size, angle=-30)
            canvas.ellipse(CT.BLOOD, hx + 12, hy + 6, 24 * size, 18 * size, angle=-30)
            canvas.ellipse(CT.BLOOD, hx - 18, hy - 14, 22 * size, 14 * size, angle=-30)
        if 0.075 < t < 0.77:
            # Descending aorta: beside the spine in the chest, in front of it lower down,
            # narrowing until it divides.
            ax_x = float(np.interp(t, [0.08, 0.4, 0.77], [24, 10, 5]))
            ax_y = float(np.interp(t, [0.08, 0.4, 0.77], [vy - 4, vy - vr - 13, vy - vr - 13]))
            radius = float(np.interp(t, [0.08, 0.5, 0.77], [13, 11, 9]))
            canvas.ellipse(CT.BLOOD, ax_x, ax_y, radius, radius)

    def _abdomen(self, canvas: Canvas, t: float, body: _Section) -> None:
        cy, ix, iy, vy, vr = body.cy, body.ix, body.iy, body.vy, body.vr
        if 0.33 < t < 0.58:
            # Liver: its dome comes up into the right lung base; the left lobe crosses
            # the midline near the top; portal and hepatic veins enhance.
            size = float(np.interp(t, [0.33, 0.37, 0.45, 0.52, 0.58], [0.1, 0.8, 1, 0.7, 0.1]))
            lx, ly = -ix * 0.42, cy - 4
            canvas.ellipse(CT.LIVER, lx, ly, ix * 0.52 * size, iy * 0.78 * size, power=2.3,
                           inside=(CT.FAT, CT.LUNG, CT.LUNG_VESSEL))
            if t < 0.47:
                canvas.ellipse(CT.LIVER, 12, cy - iy * 0.5, 48 * size, 26 * size, angle=-10,
                               inside=(CT.FAT,))
            for dx, dy, r in ((0.15, 0.1, 6), (-0.2, -0.25, 4), (0.1, -0.4, 3.5),
                              (-0.35, 0.3, 3.5), (0.3, 0.35, 4)):
                canvas.ellipse(CT.PORTAL, lx + dx * ix, ly + dy * iy, r, r, inside=(CT.LIVER,))
        if 0.46 < t < 0.54:  # gallbladder
            size = profile(t, 0.46, 0.54, 0.5)
            canvas.ellipse(CT.FLUID, -ix * 0.28, cy - iy * 0.42, 14 * size, 18 * size, angle=20)
        if 0.38 < t < 0.77:  # inferior vena cava, right of the aorta
            canvas.ellipse(CT.IVC, -22, vy - vr - 9, 13, 10, inside=(CT.FAT, CT.LIVER))
        if 0.36 < t < 0.50:
            size = profile(t, 0.36, 0.50)
            canvas.ellipse(CT.SPLEEN, ix * 0.62, cy + iy * 0.35, 22 * size, 52 * size,
                           angle=35, inside=(CT.FAT, CT.LUNG, CT.LUNG_VESSEL, CT.MUSCLE))
            # Stomach: wall, fluid and, the patient lying supine, gas risen to the front.
            sx, sy = ix * 0.30, cy - iy * 0.32
            canvas.ellipse(CT.MUSCLE, sx, sy, 52 * size, 37 * size, angle=-20, inside=(CT.FAT,))
            canvas.ellipse(CT.FLUID, sx, sy, 48 * size, 33 * size, angle=-20, inside=(CT.MUSCLE,))
            canvas.ellipse(CT.GAS, sx, sy, 48 * size, 33 * size, angle=-20,
                           inside=(CT.FLUID,), y_max=sy - 8 * size)
        if 0.45 < t < 0.54:
            size = profile(t, 0.45, 0.54, 0.4)
            canvas.ellipse(CT.PANCREAS, 18, vy - vr - 32, 62 * size, 11 * size, angle=-15,
                           inside=(CT.FAT,))
        for side, start in ((-1, 0.48), (1, 0.46)):
            size = profile(t, start, start + 0.16, 0.5)
            if size:
                kx, ky = side * 64, vy - 4
                tilt = side * 25
                canvas.ellipse(CT.KIDNEY_CORTEX, kx, ky, 26 * size, 38 * size, angle=tilt,
                               inside=(CT.FAT, CT.MUSCLE))
                canvas.ellipse(CT.KIDNEY_MEDULLA, kx, ky, 17 * size, 27 * size, angle=tilt,
                               inside=(CT.KIDNEY_CORTEX,))
                canvas.ellipse(CT.FAT, kx - side * 10, ky - 4, 7 * size, 12 * size,
                               angle=tilt, inside=(CT.KIDNEY_MEDULLA, CT.KIDNEY_CORTEX))
        if 0.55 < t < 0.92:
            grow = (t - 0.55) / 0.37
            for side in (-1, 1):
                canvas.ellipse(CT.MUSCLE, side * (vr + 12 + 30 * grow), vy - 4 + 25 * grow,
                               10 + 16 * grow, 13 + 8 * grow, inside=(CT.FAT,))
        for loop in self.loops:
            size = profile(t, loop.start, loop.start + loop.length, 0.4)
            if size:
                depth = t * CT_COVERAGE_MM
                x = loop.x * ix + 12 * math.sin(depth / 37 + loop.phase)
                y = cy + loop.y * iy + 10 * math.cos(depth / 29 + loop.phase)
                radius = loop.radius * size
                canvas.ellipse(CT.MUSCLE, x, y, radius + 2, radius + 2, inside=(CT.FAT,))
                canvas.ellipse(CT.BOWEL, x, y, radius, radius, inside=(CT.MUSCLE,))
                if loop.gassy:
                    canvas.ellipse(CT.GAS, x, y, radius, radius, inside=(CT.BOWEL,),
                                   y_max=y - radius * 0.2)
        colon = []  # ascending, descending and transverse colon: stool with some gas
        if 0.55 < t < 0.80:
            colon.append((-ix * 0.66, cy + 2, 20, 20))
        if 0.47 < t < 0.80:
            colon.append((ix * 0.68, cy + 8, 15, 15))
        if 0.51 < t < 0.58:
            colon.append((0, cy - iy * 0.6, ix * 0.55, 17 * profile(t, 0.51, 0.58, 0.5)))
        for x, y, rx, ry in colon:
            canvas.ellipse(CT.MUSCLE, x, y, rx + 2, ry + 2, inside=(CT.FAT, CT.MUSCLE))
            canvas.ellipse(CT.STOOL, x, y, rx, ry, inside=(CT.MUSCLE,))
            canvas.ellipse(CT.GAS, x, y, rx, ry, inside=(CT.STOOL,), y_max=y - ry * 0.3)

    def _pelvis(self, canvas: Canvas, t: float, body: _Section) -> None:
        cy, ix, iy, vy = body.cy, body.ix, body.iy, body.vy
        if 0.72 < t:  # gluteal muscles
            for side in (-1, 1):
                canvas.ellipse(CT.MUSCLE, side * ix * 0.62, body.back - body.fat - 40,
                               58, 36, angle=side * 20, inside=(CT.FAT,))
        if 0.70 < t < 0.90:  # iliac wings, thin plates of bone sloping inwards
            size = profile(t, 0.70, 0.90, 0.5)
            for side in (-1, 1):
                wx = side * (ix * 0.62 - 70 * (t - 0.70))
                wy = vy + 6 + 40 * (t - 0.70)
                canvas.ellipse(CT.CORTICAL, wx, wy, 58 * size, 8, angle=side * 58)
                canvas.ellipse(CT.CANCELLOUS, wx, wy, 54 * size, 4.5, angle=side * 58)
        if 0.77 < t < 0.95:  # iliac arteries, parting below the aortic bifurcation
            spread = 10 + 180 * (t - 0.77)
            for side in (-1, 1):
                canvas.ellipse(CT.BLOOD, side * min(spread, 55), vy - 30 - 60 * (t - 0.77), 7, 7,
                               inside=(CT.FAT, CT.MUSCLE))
        if 0.80 < t < 0.98:  # rectum, in front of the sacrum
            canvas.ellipse(CT.MUSCLE, 0, vy + 4, 19, 17, inside=(CT.FAT,))
            canvas.ellipse(CT.STOOL, 0, vy + 4, 16, 14, inside=(CT.MUSCLE,))
        if self.female and 0.84 < t < 0.93:
            size = profile(t, 0.84, 0.93)
            canvas.ellipse(CT.UTERUS, 0, cy - 2, 32 * size, 22 * size, inside=(CT.FAT,))
        if 0.86 < t:  # bladder
            size = profile(t, 0.86, 1.08)
            canvas.ellipse(CT.MUSCLE, 0, cy - iy * 0.45, 46 * size, 34 * size)
            canvas.ellipse(CT.FLUID, 0, cy - iy * 0.45, 43 * size, 31 * size)
        if 0.91 < t:  # hips: acetabulum, joint cartilage, femoral head
            for side in (-1, 1):
                hx, hy = side * (ix * 0.62), cy + 6
                canvas.ellipse(CT.CORTICAL, hx, hy, 31, 31)
                canvas.ellipse(CT.CARTILAGE, hx, hy, 27, 27)
                canvas.ellipse(CT.CORTICAL, hx, hy, 24, 24)
                canvas.ellipse(CT.CANCELLOUS, hx, hy, 21, 21)

    def _skeleton(self, canvas: Canvas, t: float, depth_mm: float, body: _Section) -> None:
        cy, ix, vy, vr = body.cy, body.ix, body.vy, body.vr
        wall = body.fat + 8
        if t < 0.47:
            # Ribs slope down towards the front, so one slice cuts several of them at
            # different points around the chest wall.
            for side in (-1, 1):
                for k in range(10):
                    if (depth_mm + 7.5 * k) % 25 > 12 or (t > 0.36 and k < 3):
                        continue
                    angle = math.radians(25 + 16 * k)
                    rx = side * math.sin(angle) * (body.ax - wall)
                    ry = cy + math.cos(angle) * (body.ay - wall)
                    tangent = math.degrees(math.atan2(-math.sin(angle) * body.ay,
                                                      math.cos(angle) * body.ax)) * side
                    canvas.ellipse(CT.CORTICAL, rx, ry, 9, 4.5, angle=tangent)
                    canvas.ellipse(CT.CANCELLOUS, rx, ry, 6.5, 2.2, angle=tangent)
        if 0.03 < t < 0.33:  # sternum
            sy = body.front + body.fat + 8
            canvas.ellipse(CT.CORTICAL, 0, sy, 15, 6.5)
            canvas.ellipse(CT.CANCELLOUS, 0, sy, 12, 4)
        if t < 0.04:  # clavicles
            for side in (-1, 1):
                canvas.ellipse(CT.CORTICAL, side * 55, body.front + body.fat + 12, 42, 7,
                               angle=side * 12)
        if 0.02 < t < 0.2:  # scapulae, behind the ribs
            size = profile(t, 0.0, 0.22)
            for side in (-1, 1):
                canvas.ellipse(CT.CORTICAL, side * ix * 0.72, body.back - wall - 16,
                               48 * size, 4.5, angle=-side * 28)
        if t > 0.98:  # below the coccyx
            return
        sacrum_top = float(self.levels[-1])
        if depth_mm >= sacrum_top:
            below = depth_mm - sacrum_top
            sy = vy + 0.35 * below
            width = max(48 - 0.35 * below, 16)
            canvas.ellipse(CT.CORTICAL, 0, sy, width, 20, power=2.4)
            canvas.ellipse(CT.CANCELLOUS, 0, sy, width - 4, 16, power=2.4)
            canvas.ellipse(CT.CSF, 0, sy + 6, 8, 5)
            return
        # A vertebra: the arch round the spinal canal, the spinous process behind it,
        # transverse processes in the lumbar spine; the body is disc between levels.
        next_top = self.levels[int(np.searchsorted(self.levels, depth_mm, side="right"))]
        in_disc = next_top - depth_mm < (5 if t < 0.5 else 9)
        canal_y = vy + vr + 9
        canvas.ellipse(CT.CORTICAL, 0, canal_y, 17, 15)
        canvas.ellipse(CT.CORTICAL, 0, canal_y + 22, 5, 17)
        if t > 0.45:
            for side in (-1, 1):
                canvas.ellipse(CT.CORTICAL, side * (vr + 12), canal_y - 3, 16, 5)
        canvas.ellipse(CT.CSF, 0, canal_y, 10, 8)
        if in_disc:
            canvas.ellipse(CT.DISC, 0, vy, vr * 1.15, vr)
        else:
            canvas.ellipse(CT.CORTICAL, 0, vy, vr * 1.15, vr)
            canvas.ellipse(CT.CANCELLOUS, 0, vy, vr * 1.15 - 2.2, vr - 2.2)


# --- MR: brain -------------------------------------------------------------------------


class MR(enum.IntEnum):
    AIR = 0
    SCALP = enum.auto()
    MUSCLE = enum.auto()
    CORTICAL = enum.auto()
    MARROW = enum.auto()
    CSF = enum.auto()
    GREY = enum.auto()
    WHITE = enum.auto()
    DEEP_GREY = enum.auto()
    VITREOUS = enum.auto()
    ORBIT_FAT = enum.auto()
    LENS = enum.auto()


# Relative signal of each tissue: fat bright on T1, fluid bright on T2 and nulled on FLAIR,
# white matter brighter than grey on T1 and darker on T2.
MR_SIGNAL = {
    "T1": {MR.AIR: 0, MR.SCALP: 0.95, MR.MUSCLE: 0.40, MR.CORTICAL: 0.02, MR.MARROW: 0.85,
           MR.CSF: 0.12, MR.GREY: 0.50, MR.WHITE: 0.72, MR.DEEP_GREY: 0.56, MR.VITREOUS: 0.10,
           MR.ORBIT_FAT: 0.95, MR.LENS: 0.60},
    "T2": {MR.AIR: 0, MR.SCALP: 0.65, MR.MUSCLE: 0.25, MR.CORTICAL: 0.02, MR.MARROW: 0.50,
           MR.CSF: 1.00, MR.GREY: 0.55, MR.WHITE: 0.38, MR.DEEP_GREY: 0.47, MR.VITREOUS: 0.95,
           MR.ORBIT_FAT: 0.60, MR.LENS: 0.30},
    "FLAIR": {MR.AIR: 0, MR.SCALP: 0.55, MR.MUSCLE: 0.30, MR.CORTICAL: 0.02, MR.MARROW: 0.45,
              MR.CSF: 0.05, MR.GREY: 0.62, MR.WHITE: 0.42, MR.DEEP_GREY: 0.55,
              MR.VITREOUS: 0.04, MR.ORBIT_FAT: 0.50, MR.LENS: 0.35},
}
MR_LUTS = {name: np.array([table[label] for label in MR], np.float32)
           for name, table in MR_SIGNAL.items()}


def _folds(t: float, depth: float, lobes: int, sharpness: int
           ) -> Callable[[np.ndarray], np.ndarray]:
    """An outline for ``Canvas.ellipse``: narrow, unevenly spaced clefts cut into a
    smooth surface. The grey surface and the grey/white boundary are cut at the same
    angles, so the cortex lines each sulcus; the pattern drifts with height ``t``, as it
    does from slice to slice."""
    def outline(theta: np.ndarray) -> np.ndarray:
        wave = np.cos(lobes * theta + 0.9 * np.sin(3 * theta + 4 * t) + 6 * t)
        return 1 - depth * np.clip(wave, 0, None) ** sharpness
    return outline


class MrBrainPhantom:
    """An axial head phantom, 256x256 at 0.94 mm. ``labels(t)`` draws the tissues at
    height ``t`` (0 = orbits and skull base, 1 = vertex); ``image`` turns them into a
    weighted magnitude image with Rician noise and coil shading."""

    size = 256
    spacing = 240 / 256

    def __init__(self):
        canvas = Canvas(self.size, self.size, self.spacing)
        x, y = canvas.xs[None, :], canvas.ys[:, None]
        # Receive coils are more sensitive near the back of the head, where it rests.
        self.coil = (1.0 + 0.10 * (y / 120) + 0.05 * np.cos(x / 60)).astype(np.float32)

    def labels(self, t: float) -> np.ndarray:
        canvas = Canvas(self.size, self.size, self.spacing)
        # The head narrows towards the vertex and, less, towards the skull base.
        scale = math.sqrt(max(0.0, 1 - ((t - 0.35) / 0.74) ** 2))
        ax, ay, cy = 74 * scale, 94 * scale, 4.0
        front = cy - ay
        canvas.ellipse(MR.SCALP, 0, cy, ax, ay)
        if t < 0.55:  # temporalis muscles
            for side in (-1, 1):
                canvas.ellipse(MR.MUSCLE, side * (ax - 8), cy - 10, 9, 34, inside=(MR.SCALP,))
        # Skull: outer table, marrow-filled diploë, inner table.
        canvas.ellipse(MR.CORTICAL, 0, cy, ax - 5, ay - 5)
        canvas.ellipse(MR.MARROW, 0, cy, ax - 7, ay - 7)
        canvas.ellipse(MR.CORTICAL, 0, cy, ax - 10, ay - 10)
        inner_x, inner_y = ax - 12, ay - 12
        canvas.ellipse(MR.CSF, 0, cy, inner_x, inner_y)

        def gyri(depth: float, lobes: int, sharpness: int):
            return _folds(t, depth, lobes, sharpness)

        if t < 0.35:
            # Skull base: bone round the middle cranial fossae, which hold the temporal
            # lobes, and the posterior fossa (below).
            canvas.ellipse(MR.CORTICAL, 0, cy, inner_x, inner_y)
            for side in (-1, 1):
                size = profile(t, 0.0, 0.45, 0.5)
                canvas.ellipse(MR.CSF, side * 40, cy - 8, 27 * size, 36 * size)
                canvas.ellipse(MR.GREY, side * 40, cy - 8, 25 * size, 34 * size,
                               outline=gyri(0.12, 9, 10))
                canvas.ellipse(MR.WHITE, side * 40, cy - 8, 19 * size, 27 * size,
                               outline=gyri(0.22, 9, 4))
        # The cerebrum fills the skull from just above the skull base, split by the
        # interhemispheric fissure in front and behind.
        brain = min(1.0, max(0.0, (t - 0.18) / 0.17))
        if brain:
            bx, by = inner_x * (0.6 + 0.4 * brain), inner_y * (0.6 + 0.4 * brain)
            by_cy = cy - 4 * (1 - brain)
            canvas.ellipse(MR.CSF, 0, by_cy, bx, by)
            canvas.ellipse(MR.GREY, 0, by_cy, bx - 1, by - 1, outline=gyri(0.13, 21, 12))
            canvas.ellipse(MR.WHITE, 0, by_cy, bx - 6, by - 6, outline=gyri(0.17, 21, 4))
            for end in (-1, 1):
                canvas.ellipse(MR.CSF, 0, by_cy + end * by * 0.62, 1.6, by * 0.4)
        if t < 0.42:
            # Cerebellum: finely folded cortex round a branching white core; the
            # brainstem and fourth ventricle in front of it.
            size = profile(t, -0.05, 0.42, 0.5)
            py = cy + inner_y * 0.55
            canvas.ellipse(MR.CSF, 0, py, 56 * size, 34 * size)
            canvas.ellipse(MR.GREY, 0, py, 53 * size, 31 * size, outline=gyri(0.07, 43, 10))
            canvas.ellipse(MR.WHITE, 0, py, 30 * size, 14 * size, outline=gyri(0.35, 9, 2))
            canvas.ellipse(MR.CSF, 0, py, 1.5, 31 * size)
            canvas.ellipse(MR.WHITE, 0, cy + 12, 14, 13)  # brainstem
            canvas.ellipse(MR.CSF, 0, cy + 29, 6 * size, 4 * size)  # fourth ventricle
        if t < 0.30:
            # Nasal cavity between the orbits; each eye with its lens, in orbital fat.
            size = profile(t, 0.0, 0.30, 0.5)
            canvas.ellipse(MR.CORTICAL, 0, front + 30, 14, 26)
            canvas.ellipse(MR.AIR, 0, front + 30, 10 * size, 22 * size)
            for side in (-1, 1):
                ox, oy = side * 33, front + 26
                canvas.ellipse(MR.ORBIT_FAT, ox, oy + 6, 19 * size, 24 * size)
                canvas.ellipse(MR.CORTICAL, ox, oy - 1, 13 * size, 13 * size)
                canvas.ellipse(MR.VITREOUS, ox, oy - 1, 11.5 * size, 11.5 * size)
                canvas.ellipse(MR.LENS, ox, oy - 10 * size, 4 * size, 1.8 * size,
                               inside=(MR.VITREOUS,))
        if 0.36 < t < 0.54:  # thalamus, lentiform nucleus, head of the caudate
            for side in (-1, 1):
                canvas.ellipse(MR.DEEP_GREY, side * 11, cy + 6, 9, 13, inside=(MR.WHITE,))
                canvas.ellipse(MR.DEEP_GREY, side * 25, cy - 10, 7, 17, angle=side * 15,
                               inside=(MR.WHITE,))
                canvas.ellipse(MR.DEEP_GREY, side * 13, cy - 24, 6, 7, inside=(MR.WHITE,))
        if 0.36 < t < 0.46:
            canvas.ellipse(MR.CSF, 0, cy + 4, 2.5, 11)  # third ventricle
        if 0.42 < t < 0.74:  # lateral ventricles: bodies, frontal horns, atria
            size = profile(t, 0.42, 0.74, 0.5)
            for side in (-1, 1):
                canvas.ellipse(MR.CSF, side * 8, cy - 6, 5 * size, 27 * size, angle=side * 8)
                canvas.ellipse(MR.CSF, side * 12, cy - 28, 7 * size, 7 * size)
                if t < 0.56:
                    canvas.ellipse(MR.CSF, side * 19, cy + 24, 8 * size, 10 * size)
        return canvas.labels

    def image(self, labels: np.ndarray, weighting: str, rng, *, scale: float = 1400,
              noise: float = 16) -> np.ndarray:
        signal = smooth(MR_LUTS[weighting][labels]) * self.coil * scale
        real = signal + rng.standard_normal(signal.shape, dtype=np.float32) * noise
        imaginary = rng.standard_normal(signal.shape, dtype=np.float32) * noise
        # A magnitude image: noise in air is Rician, never negative.
        magnitude = np.sqrt(real * real + imaginary * imaginary)
        return np.clip(np.rint(magnitude), 0, 4095).astype(np.uint16)


# --- CR: chest radiographs -------------------------------------------------------------


def _band(coordinate: np.ndarray, centre, half_width: float) -> np.ndarray:
    """Thickness profile of a round bar seen side-on: 1 at its axis, 0 at its edge."""
    return np.sqrt(np.clip(1 - ((coordinate - centre) / half_width) ** 2, 0, None))


def _ellipsoid(x, y, cx, cy, ax, ay) -> np.ndarray:
    """Thickness profile of an ellipsoid seen from the front: 1 at its centre."""
    return np.sqrt(np.clip(1 - ((x - cx) / ax) ** 2 - ((y - cy) / ay) ** 2, 0, None))


def _fade(value: np.ndarray, start: float, end: float) -> np.ndarray:
    """0 before ``start``, 1 after ``end``, linear between: soft ends for bones that leave
    the plate or pass behind something."""
    return np.clip((value - start) / (end - start), 0, 1)


@dataclass
class _Paths:
    """X-ray path lengths (mm) through each material, per detector pixel."""

    soft: np.ndarray
    lung: np.ndarray
    air: np.ndarray
    bone: np.ndarray


def _vessel_tree(rng, canvas: Canvas, hila: list[tuple[float, float]]) -> np.ndarray:
    """Lung markings: branching vessels grown out of each hilum as random walks, splatted
    on a coarse grid and blurred, thick and dense centrally and fading to the edge."""
    coarse = 4
    rows, columns = canvas.labels.shape[0] // coarse, canvas.labels.shape[1] // coarse
    step = float(canvas.xs[1] - canvas.xs[0]) * coarse
    grid = np.zeros((rows, columns), np.float32)
    for hx, hy in hila:
        branches = [(hx, hy, rng.uniform(0, 2 * math.pi), 1.0) for _ in range(28)]
        while branches:
            x, y, heading, weight = branches.pop()
            for _ in range(int(40 * weight) + 6):
                heading += rng.normal(0, 0.12)
                x += math.cos(heading) * 3.0
                y += math.sin(heading) * 3.0
                row = int(round(y / step + (rows - 1) / 2))
                column = int(round(x / step + (columns - 1) / 2))
                if not (0 <= row < rows and 0 <= column < columns):
                    break
                grid[row, column] += weight
                weight *= 0.985
            if weight > 0.35 and rng.random() < 0.75:
                for turn in (-0.45, 0.45):
                    branches.append((x, y, heading + turn, weight * 0.7))
    for _ in range(2):
        grid = smooth(grid)
    fine = np.repeat(np.repeat(grid, coarse, axis=0), coarse, axis=1)
    return smooth(smooth(fine))


def _pa_paths(canvas: Canvas, *, female: bool) -> _Paths:
    x, y, ys = canvas.xs[None, :], canvas.ys[:, None], canvas.ys
    half = np.interp(ys, [-217, -178, -140, -100, 100, 217],
                     [52, 58, 150, 156, 150, 146]).astype(np.float32)[:, None]
    depth = np.interp(ys, [-217, -160, -100, 217], [110, 170, 215, 230])[:, None]
    soft = depth * np.sqrt(np.clip(1 - (x / half) ** 2, 0, None))
    # Arms hang beside the chest, their inner edges just inside the plate.
    soft = soft + 95 * _band(np.abs(x), half + 52, 46) * _fade(y, -170, -140)
    bone = np.zeros_like(soft)
    for side in (-1, 1):
        bone += 38 * _ellipsoid(x, y, side * 168, -160, 30, 30)
        bone += 14 * _band(x, side * 168, 14) * _fade(y, -170, -150)
    # Lung fields down to the domes of the diaphragm; the right dome is higher.
    lung = np.zeros_like(soft)
    for dome, cx, ax in ((105, -72, 64), (122, 74, 60)):
        shape = _ellipsoid(x, y, cx, -15, ax, 160)
        dome_y = dome - 30 * np.cos(np.clip((x - cx) / ax, -1, 1) * math.pi / 2)
        lung += 150 * shape * (y < dome_y)
    heart = 115 * _ellipsoid(x, y, 22, 62, 88, 68)
    aortic_knob = 60 * _ellipsoid(x, y, 24, -82, 22, 22)
    lung = np.clip(lung - 1.1 * heart - aortic_knob, 0, None)
    if female:
        for side in (-1, 1):
            soft += 45 * _ellipsoid(x, y, side * 98, 100, 82, 58)
    # Trachea and main bronchi: the dark column down to the carina.
    air = 18 * _band(x, 2 + 0.02 * (y + 217), 9) * (y < -60)
    for side in (-1, 1):
        air += 12 * _band(y, -60 + np.abs(x) * 0.8, 6) * (x * side > 0) * (np.abs(x) < 32)
    air += 40 * _ellipsoid(x, y, 72, 150, 30, 17)  # gastric bubble under the left dome
    for k in range(10):
        y0 = -168 + 27 * k
        for side in (-1, 1):
            lateral = x * side
            within = _fade(lateral, 18, 30) * _fade(half - lateral, 4, 24)
            u = np.clip((lateral - 22) / 128, 0, 1)
            # Posterior ribs run out level from the spine and bend down at the side;
            # anterior ribs slope down towards the sternum and fade into cartilage.
            bone += 8 * _band(y, y0 - 18 * u + 70 * u * u, 6) * within
            bone += 4 * _band(y, y0 + 40 + 60 * (1 - u), 5.5) * _fade(u, 0.3, 0.5) * within
    for side in (-1, 1):
        u = (x * side - 18) / 125
        clavicle = -150 - 28 * u + 10 * np.sin(u * math.pi)
        bone += 12 * _band(y, clavicle, 7) * _fade(u, 0, 0.05) * _fade(1 - u, 0, 0.05)
        scapula = 122 + 0.25 * (y + 160)
        bone += 7 * _band(x * side, scapula, 6) * _fade(y, -170, -150) * _fade(-y, 30, 60)
    level = (y + 230) % 27
    vertebra = 0.45 + 0.55 * _band(level, 11, 12)
    bone += 18 * _band(x, 0, 19) * vertebra
    for side in (-1, 1):
        bone += 8 * _band(x, side * 14, 4) * _band(level, 10, 5)
    return _Paths(soft, lung, air, bone)


def _lateral_paths(canvas: Canvas) -> _Paths:
    """Left lateral: the patient's front to the viewer's left, spine on the right."""
    x, y, ys = canvas.xs[None, :], canvas.ys[:, None], canvas.ys
    front = np.interp(ys, [-217, -160, -100, 217], [-40, -85, -112, -120])[:, None]
    back = np.interp(ys, [-217, -160, -100, 217], [70, 105, 118, 120])[:, None]
    mid, half = (front + back) / 2, (back - front) / 2
    soft = 300 * np.sqrt(np.clip(1 - ((x - mid) / half) ** 2, 0, None))
    # Both lungs overlap; the posterior costophrenic recess reaches lowest.
    lung = 230 * _ellipsoid(x, y, 8, -15, 100, 160) * (y < 100 + 0.25 * (x + 100))
    heart = 170 * _ellipsoid(x, y, -48, 72, 62, 70)
    lung = np.clip(lung - heart, 0, None)
    air = 18 * _band(x, -10 + 0.08 * (y + 217), 8) * (y < -50)
    air += 40 * _ellipsoid(x, y, -10, 150, 28, 16)
    bone = 18 * _band(x, -108 + 0.03 * (y + 130), 5) * _fade(y, -150, -130) * _fade(-y, -70, -50)
    # Raised arms: both humeri cross the top of the plate in front of the neck.
    for side in (-1, 1):
        bone += 20 * _band(x - 0.35 * (y + 200), -95 + side * 12, 14) * _fade(-y, 90, 130)
    for k in range(10):
        y0 = -150 + 27 * k
        bone += 3 * _band(y, y0 + 0.45 * (x - 60), 5) * _fade(x, -70, -40) * _fade(-x, -110, -90)
    spine = 72 + 6 * np.cos((y + 80) / 300)
    level = (y + 230) % 27
    bone += 34 * _band(x, spine, 19) * (0.5 + 0.5 * _band(level, 11, 12))
    bone += 12 * _band(x, spine + 32, 8) * _band(level, 13, 7)  # spinous processes
    return _Paths(soft, lung, air, bone)


def chest_radiograph(view: str, *, seed: int, female: bool, rows: int = 1280,
                     columns: int = 1024, spacing: float = 0.34) -> np.ndarray:
    """A chest radiograph, PA or left lateral ("LL"), as 12-bit values that rise with
    attenuation (MONOCHROME2: lungs dark, bone white). Built as X-ray path lengths
    through soft tissue, lung and bone, as a projection is."""
    rng = np.random.default_rng([seed, 0xC2, 0 if view == "PA" else 1])
    canvas = Canvas(rows, columns, spacing)
    if view == "PA":
        paths = _pa_paths(canvas, female=female)
        markings = _vessel_tree(rng, canvas, [(-42, 5), (44, 0)])
    else:
        paths = _lateral_paths(canvas)
        markings = _vessel_tree(rng, canvas, [(-5, 10)])
    markings = np.clip(markings / max(float(np.percentile(markings, 99.5)), 1e-6), 0, 1) * 30
    soft = paths.soft + markings * _fade(paths.lung, 0, 30)
    attenuation = 0.021 * (soft - paths.lung - paths.air) + 0.055 * paths.bone
    attenuation = smooth(smooth(attenuation.astype(np.float32)))
    # The reader's processing compresses the range, as CR presentation does: lungs,
    # mediastinum and the spine behind the heart all stay readable in one window.
    value = 300 + 3500 * (1 - np.exp(-attenuation / 2.8))
    value += rng.standard_normal(value.shape, dtype=np.float32) * 20
    # The collimator blades shadow the edges of the plate: unexposed, fully white.
    edge = 24
    value[:edge], value[-edge:], value[:, :edge], value[:, -edge:] = 3900, 3900, 3900, 3900
    return np.clip(np.rint(value), 0, 4095).astype(np.uint16)


# --- Writing DICOM ---------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    number: int
    description: str
    minutes: int  # after the study time


def _time_plus(hhmmss: str, minutes: float) -> str:
    start = datetime.strptime(hhmmss, "%H%M%S") + timedelta(minutes=minutes)
    return start.strftime("%H%M%S")


def _age(birth: date, on: date) -> str:
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    return f"{years:03d}Y"


def _ds(value: float) -> str:
    """A Decimal String within DICOM's 16 characters for the values written here."""
    return f"{value:.10g}"


def base_dataset(study: DemoStudy, series: SeriesSpec, instance_number: int, *,
                 seed: int, anchor: date, sop_class_uid: str) -> Dataset:
    """The Patient, Study, Series, Equipment, General Image and SOP Common modules every
    demo instance carries (PS3.3 C.7, C.12.1)."""
    when = study_date(study, anchor).strftime("%Y%m%d")
    series_time = _time_plus(study.time, series.minutes)
    sop_instance_uid = demo_uid(seed, study.key, series.number, instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = meta
    if study.charset:
        ds.SpecificCharacterSet = study.charset
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate = when
    ds.InstanceCreationTime = series_time
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = when
    ds.StudyTime = study.time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series_time
    ds.AccessionNumber = study.accession
    ds.Modality = study.modality
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.referring
    ds.StationName = study.station
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = {"CT": "Phantom CT 64", "MR": "Phantom MR",
                                "CR": "Phantom CR"}[study.modality]
    ds.PatientName = study.patient.name
    ds.PatientID = study.patient.patient_id
    ds.IssuerOfPatientID = study.patient.issuer
    ds.PatientBirthDate = study.patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = study.patient.sex
    ds.PatientAge = _age(study.patient.birth_date, study_date(study, anchor))
    ds.DeviceSerialNumber = f"DEMO-{study.station}"
    ds.SoftwareVersions = "demo_studies 1"
    ds.StudyInstanceUID = demo_uid(seed, study.key)
    ds.SeriesInstanceUID = demo_uid(seed, study.key, series.number)
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImageComments = SYNTHETIC_NOTE
    return ds


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def iter_ct_study(out_dir: Path, study: DemoStudy, *, seed: int, anchor: date,
                  slices: int = DEFAULT_CT_SLICES) -> Iterator[Path]:
    """Write the axial CT series, head to feet, one file per slice."""
    phantom = CtPhantom(seed, female=study.patient.sex == "F")
    # Positions in hundredths of a millimetre keep every DS exact and the spacing even.
    step = round(CT_COVERAGE_MM * 100 / slices)
    # Series 1 of a real scan is the scout (topogram), which the demo leaves out.
    series = SeriesSpec(2, f"AX {step / 100:g} mm PORTAL VENOUS", 4)
    top = -6000
    frame_of_reference = demo_uid(seed, study.key, "frame")
    origin = -(CtPhantom.size - 1) / 2 * CtPhantom.spacing
    for index in range(slices):
        z = (top - index * step) / 100
        pixels = phantom.slice_hu(index * step / 100) + np.int16(1024)
        ds = base_dataset(study, series, index + 1, seed=seed, anchor=anchor,
                          sop_class_uid=CTImageStorage)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.BodyPartExamined = "CHESTABDPELVIS"
        ds.ProtocolName = "CAP with IV contrast"
        ds.PatientPosition = "HFS"
        ds.ContrastBolusAgent = "Iohexol 350 mgI/mL"
        ds.ContrastBolusRoute = "IV"
        ds.ContrastBolusVolume = "100"
        ds.KVP = "120"
        ds.XRayTubeCurrent = 220
        ds.ExposureTime = 500
        ds.ConvolutionKernel = "SOFT"
        ds.ReconstructionDiameter = "400"
        ds.DataCollectionDiameter = "500"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "140"
        ds.RotationDirection = "CW"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [_ds(origin), _ds(origin), f"{z:.2f}"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [_ds(CtPhantom.spacing), _ds(CtPhantom.spacing)]
        ds.SliceThickness = f"{step / 100:.2f}"
        ds.SliceLocation = f"{z:.2f}"
        ds.set_pixel_data(pixels, "MONOCHROME2", 16, generate_instance_uid=False)
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = ["40", "-600"]
        ds.WindowWidth = ["400", "1500"]
        ds.WindowCenterWidthExplanation = ["SOFT TISSUE", "LUNG"]
        yield _write(ds, out_dir / study.key / f"{series.number:02d}" / f"{index + 1:04d}.dcm")


@dataclass(frozen=True)
class MrSequence:
    """The MR Image module values of one pulse sequence (PS3.3 C.8.3.1), and the
    window that suits its images."""

    scanning_sequence: list[str]
    sequence_variant: list[str]
    repetition_ms: float
    echo_ms: float
    inversion_ms: float | None
    flip_angle: float
    echo_train_length: int
    window_centre: int
    window_width: int


MR_SEQUENCES = {
    "T1": MrSequence(["SE"], ["SK"], 550, 12, None, 90, 1, 620, 1200),
    "T2": MrSequence(["SE"], ["SK"], 4200, 98, None, 150, 15, 700, 1500),
    "FLAIR": MrSequence(["SE", "IR"], ["SK", "MP"], 9000, 120, 2500, 150, 21, 560, 1150),
}


def iter_mr_study(out_dir: Path, study: DemoStudy, sequences: list[tuple[str, SeriesSpec]],
                  *, seed: int, anchor: date, slices: int, field_tesla: float
                  ) -> Iterator[Path]:
    """Write axial brain series through the same slab, one per weighting."""
    phantom = MrBrainPhantom()
    thickness, gap = 5.0, 1.0
    frame_of_reference = demo_uid(seed, study.key, "frame")
    origin = -(MrBrainPhantom.size - 1) / 2 * MrBrainPhantom.spacing
    # From the orbits to just below the vertex.
    label_maps = [phantom.labels(0.08 + 0.86 * i / (slices - 1)) for i in range(slices)]
    for weighting, series in sequences:
        rng = np.random.default_rng([seed, 0x3E, series.number])
        sequence = MR_SEQUENCES[weighting]
        for index, labels in enumerate(label_maps):
            z = -45 + index * (thickness + gap)
            ds = base_dataset(study, series, index + 1, seed=seed, anchor=anchor,
                              sop_class_uid=MRImageStorage)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
            ds.BodyPartExamined = "HEAD"
            ds.ProtocolName = f"BRAIN {series.description}"
            ds.PatientPosition = "HFS"
            ds.ScanningSequence = sequence.scanning_sequence
            ds.SequenceVariant = sequence.sequence_variant
            ds.ScanOptions = ""
            ds.MRAcquisitionType = "2D"
            ds.RepetitionTime = _ds(sequence.repetition_ms)
            ds.EchoTime = _ds(sequence.echo_ms)
            if sequence.inversion_ms:
                ds.InversionTime = _ds(sequence.inversion_ms)
            ds.EchoTrainLength = sequence.echo_train_length
            ds.FlipAngle = _ds(sequence.flip_angle)
            ds.NumberOfAverages = "1"
            ds.EchoNumbers = 1
            ds.ImagedNucleus = "1H"
            ds.MagneticFieldStrength = _ds(field_tesla)
            ds.ImagingFrequency = _ds(round(42.577 * field_tesla, 3))
            ds.SliceThickness = _ds(thickness)
            ds.SpacingBetweenSlices = _ds(thickness + gap)
            ds.FrameOfReferenceUID = frame_of_reference
            ds.PositionReferenceIndicator = ""
            ds.ImagePositionPatient = [_ds(origin), _ds(origin), _ds(z)]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [_ds(MrBrainPhantom.spacing), _ds(MrBrainPhantom.spacing)]
            ds.SliceLocation = _ds(z)
            ds.set_pixel_data(phantom.image(labels, weighting, rng), "MONOCHROME2", 12,
                              generate_instance_uid=False)
            ds.WindowCenter = str(sequence.window_centre)
            ds.WindowWidth = str(sequence.window_width)
            yield _write(ds, out_dir / study.key / f"{series.number:02d}" / f"{index + 1:04d}.dcm")


def iter_cr_study(out_dir: Path, study: DemoStudy, *, seed: int, anchor: date,
                  photometric: str) -> Iterator[Path]:
    """Write a PA and a left lateral chest radiograph, each its own series as CR
    readers send them. MONOCHROME1 stores the inverse: high values display dark."""
    female = study.patient.sex == "F"
    for number, view, orientation in ((1, "PA", ["L", "F"]), (2, "LL", ["P", "F"])):
        series = SeriesSpec(number, f"CHEST {'PA' if view == 'PA' else 'LAT'}", 2 * number)
        pixels = chest_radiograph(view, seed=seed, female=female)
        centre, width = 2150, 3400
        if photometric == "MONOCHROME1":
            pixels = np.uint16(4095) - pixels
            centre = 4095 - centre
        ds = base_dataset(study, series, 1, seed=seed, anchor=anchor,
                          sop_class_uid=ComputedRadiographyImageStorage)
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = view
        ds.PatientOrientation = orientation
        ds.ProtocolName = f"CHEST {view}"
        ds.KVP = "120" if view == "PA" else "125"
        ds.ExposureTime = 8 if view == "PA" else 20
        ds.XRayTubeCurrent = 320
        ds.DistanceSourceToDetector = "1800"
        ds.ImagerPixelSpacing = ["0.34", "0.34"]
        ds.set_pixel_data(pixels, photometric, 12, generate_instance_uid=False)
        ds.WindowCenter = str(centre)
        ds.WindowWidth = str(width)
        yield _write(ds, out_dir / study.key / f"{series.number:02d}" / "0001.dcm")


def iter_demo_files(out_dir: Path, *, seed: int = DEFAULT_SEED,
                    ct_slices: int = DEFAULT_CT_SLICES, anchor: date | None = None
                    ) -> Iterator[Path]:
    """Write the demo studies under ``out_dir`` one file at a time, so a caller can ingest
    and delete each before the next is drawn. ``anchor`` is the day the study dates count
    back from (today by default)."""
    anchor = anchor or date.today()
    for study in DEMO_STUDIES:
        if study.modality == "CT":
            yield from iter_ct_study(out_dir, study, seed=seed, anchor=anchor, slices=ct_slices)
        elif study.modality == "MR" and study.patient is OKAFOR:
            yield from iter_mr_study(
                out_dir, study,
                [("T1", SeriesSpec(3, "AX T1 SE", 3)), ("T2", SeriesSpec(4, "AX T2 TSE", 8)),
                 ("FLAIR", SeriesSpec(5, "AX T2 FLAIR", 14))],
                seed=seed, anchor=anchor, slices=24, field_tesla=3.0)
        elif study.modality == "MR":
            yield from iter_mr_study(
                out_dir, study,
                [("T2", SeriesSpec(2, "AX T2 FSE", 5)), ("T1", SeriesSpec(3, "AX T1", 11))],
                seed=seed, anchor=anchor, slices=20, field_tesla=1.5)
        else:
            photometric = "MONOCHROME1" if study.patient is TREMBLAY else "MONOCHROME2"
            yield from iter_cr_study(out_dir, study, seed=seed, anchor=anchor,
                                     photometric=photometric)


def generate_demo_files(out_dir: Path, *, seed: int = DEFAULT_SEED,
                        ct_slices: int = DEFAULT_CT_SLICES, anchor: date | None = None
                        ) -> list[Path]:
    return list(iter_demo_files(out_dir, seed=seed, ct_slices=ct_slices, anchor=anchor))


# --- Loading ---------------------------------------------------------------------------


@dataclass
class LoadReport:
    """What a load did, in counts only: these summaries go to logs and terminals, so
    they never carry a patient's name."""

    patients: int = 0
    studies: int = 0
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    skipped_not_dicom: int = 0
    problems: list[str] = field(default_factory=list)  # "<relative path>: <reason>"


def demo_anchor_date(*, facility, seed: int, today: date) -> date:
    """The day the demo's study dates count back from. If this seed's demo is already in
    the archive, its own dates decide, so a re-run on a later day writes identical files
    (all duplicates) instead of same-UID files with new dates (all conflicts)."""
    from dicomgw.models import Study

    newest = DEMO_STUDIES[0]
    stored = (Study.objects.filter(facility=facility,
                                   study_instance_uid=demo_uid(seed, newest.key))
              .values_list("study_date", flat=True).first())
    return stored + timedelta(days=newest.days_ago) if stored else today


def demo_studies_load(*, facility, seed: int = DEFAULT_SEED,
                      ct_slices: int = DEFAULT_CT_SLICES, today: date) -> LoadReport:
    """Generate the demo studies and ingest each file as it is written."""
    # The archive is imported here, not at the top, so the generator above can be used
    # (by a benchmark, say) without a configured Django project.
    from dicomgw.models import IngestSource
    from dicomgw.services import ingest_file

    report = LoadReport(patients=len({study.patient for study in DEMO_STUDIES}),
                        studies=len(DEMO_STUDIES))
    started = time.monotonic()
    anchor = demo_anchor_date(facility=facility, seed=seed, today=today)
    spool = Path(settings.SPOOL_DIR)
    spool.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="demo-studies-", dir=spool) as work:
        work_dir = Path(work)
        for path in iter_demo_files(work_dir, seed=seed, ct_slices=ct_slices, anchor=anchor):
            report.files += 1
            report.bytes += path.stat().st_size
            outcome = ingest_file(facility=facility, path=path, source=IngestSource.DEMO)
            report.outcomes[str(outcome.status)] += 1
            if not outcome.ok:
                report.problems.append(f"{path.relative_to(work_dir)}: {outcome.reason}")
            path.unlink(missing_ok=True)
    report.seconds = time.monotonic() - started
    return report


def testdata_load(*, facility, directory: Path) -> dict[str, LoadReport]:
    """Ingest every DICOM file under ``directory``, grouped by its top-level folder.
    Files without the DICOM preamble (the JPEGs, README and AUTORUN of a patient CD) are
    counted and skipped rather than offered to ingest."""
    from dicomgw.models import IngestSource
    from dicomgw.services import ingest_file

    reports: dict[str, LoadReport] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory)
        folder = relative.parts[0] if len(relative.parts) > 1 else "(top level)"
        report = reports.setdefault(folder, LoadReport())
        started = time.monotonic()
        if not is_dicom(path):
            report.skipped_not_dicom += 1
            continue
        report.files += 1
        report.bytes += path.stat().st_size
        outcome = ingest_file(facility=facility, path=path, source=IngestSource.DEMO)
        report.outcomes[str(outcome.status)] += 1
        if not outcome.ok:
            report.problems.append(f"{relative}: {outcome.reason}")
        report.seconds += time.monotonic() - started
    return reports
