"""Scenes: up to five coloured shapes placed in the cells of a 3 x 3 layout on a cluttered background.

Every scene is a pure function of its seed (``numpy.random.default_rng(seed)``), and its scene graph —
each object's shape, colour, size, cell, centre and box — is exact. Images are rendered at any size; the
tiny LLaVA model reads them at 96 x 96 pixels with 8-pixel patches, a 12 x 12 grid of 144 visual tokens
(each layout cell covers 4 x 4 patches).

Training scenes carry co-occurrence biases, as natural images do (COCO's forks come with knives): when
an object of one category of a ``PAIRS`` entry is placed, its partner is added with probability
``pair_bias``. Held-out scenes are drawn with the same bias, so that a model which learnt it will
sometimes report a partner that is not there: the hallucination that CHAIR and POPE measure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
CELLS = ("top-left", "top", "top-right", "left", "center", "right", "bottom-left", "bottom", "bottom-right")
# (colour, shape) categories that co-occur in training scenes
PAIRS = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "cross")),
    (("purple", "square"), ("orange", "circle")),
)
PARTNER = {a: b for a, b in PAIRS} | {b: a for a, b in PAIRS}

CANVAS = 96  # scene coordinates; rendering scales them


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str
    cell: int  # index into CELLS
    cx: float  # centre, scene coordinates (0..CANVAS)
    cy: float
    r: float  # half extent

    @property
    def category(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (self.cx - self.r, self.cy - self.r, self.cx + self.r, self.cy + self.r)


@dataclass
class Scene:
    seed: int
    objects: list[Obj]
    background: tuple[int, int, int]
    clutter: float  # 0..1
    clutter_seed: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["objects"] = [asdict(o) | {"cell_name": CELLS[o.cell]} for o in self.objects]
        return d

    def categories(self) -> set[tuple[str, str]]:
        return {o.category for o in self.objects}


def sample_scene(seed: int, n_min: int = 1, n_max: int = 5, pair_bias: float = 0.7) -> Scene:
    """A random scene; the same seed always gives the same scene."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(n_min, n_max + 1))
    cells = list(rng.permutation(9))
    objects: list[Obj] = []
    cats: list[tuple[str, str]] = []
    colours = list(COLOURS)
    while len(cats) < n:
        cat = (colours[int(rng.integers(len(colours)))], SHAPES[int(rng.integers(len(SHAPES)))])
        if cat in cats:
            continue
        cats.append(cat)
        partner = PARTNER.get(cat)
        if partner and partner not in cats and len(cats) < n_max and rng.random() < pair_bias:
            cats.append(partner)
    for cat, cell in zip(cats, cells):
        size = SIZES[int(rng.integers(2))]
        r = 7.0 if size == "small" else 12.0
        row, col = divmod(int(cell), 3)
        jitter = 14.0 - r
        cx = col * 32 + 16 + float(rng.uniform(-jitter, jitter))
        cy = row * 32 + 16 + float(rng.uniform(-jitter, jitter))
        objects.append(Obj(shape=cat[1], colour=cat[0], size=size, cell=int(cell), cx=cx, cy=cy, r=r))
    grey = int(rng.integers(95, 165))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return Scene(seed=seed, objects=objects, background=background, clutter=float(rng.uniform(0, 1)),
                 clutter_seed=int(rng.integers(2**31)))


def _draw_shape(draw: ImageDraw.ImageDraw, o: Obj, scale: float) -> None:
    x0, y0, x1, y1 = (v * scale for v in o.box)
    fill = COLOURS[o.colour]
    if o.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif o.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif o.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif o.shape == "cross":
        w = (x1 - x0) / 3
        draw.rectangle((x0 + w, y0, x1 - w, y1), fill=fill)
        draw.rectangle((x0, y0 + w, x1, y1 - w), fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")


def render_batch(scenes: list[Scene], size: int = CANVAS):
    """The scenes rendered as a float tensor ``[B, 3, size, size]`` in [0, 1]."""
    import torch

    arr = np.stack([np.asarray(render(s, size), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(255.0)


def render(scene: Scene, size: int = CANVAS) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels."""
    scale = size / CANVAS
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    rng = np.random.default_rng(scene.clutter_seed)
    n_lines = int(scene.clutter * 14)
    for _ in range(n_lines):  # low-contrast, grey clutter: never mistakable for an object colour
        shade = int(np.clip(scene.background[0] + rng.integers(-40, 41), 0, 255))
        pts = rng.uniform(0, size, size=4)
        draw.line([tuple(pts[:2]), tuple(pts[2:])], fill=(shade, shade, shade), width=max(1, int(scale)))
    for o in scene.objects:
        _draw_shape(draw, o, scale)
    return img


def patch_labels(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """Per patch of a ``grid`` x ``grid`` patching, the colour / shape / size index (0 = background, else
    1 + index) of the object covering the patch centre, and the patch's layout cell — dense targets for
    pretraining a vision tower."""
    step = CANVAS / grid
    centres = (np.arange(grid) + 0.5) * step
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    colour = np.zeros((grid, grid), dtype=np.int64)
    shape = np.zeros((grid, grid), dtype=np.int64)
    size = np.zeros((grid, grid), dtype=np.int64)
    colours = list(COLOURS)
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        inside = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)
        colour[inside] = 1 + colours.index(o.colour)
        shape[inside] = 1 + SHAPES.index(o.shape)
        size[inside] = 1 + SIZES.index(o.size)
    cell = (np.minimum(cy // 32, 2) * 3 + np.minimum(cx // 32, 2)).astype(np.int64)
    return {"colour": colour, "shape": shape, "size": size, "cell": cell}
