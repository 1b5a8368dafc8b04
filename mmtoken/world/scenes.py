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
    canvas: int = CANVAS  # side of the scene's coordinate frame; rendering scales it to any size
    style: str = "scene"  # "scene" (grey, cluttered) or "doc" (a page: text lines, a table; extra holds the layout)

    def to_dict(self) -> dict:
        d = asdict(self)
        three_by_three = self.canvas == CANVAS and self.style == "scene"  # only there does a cell have a name
        d["objects"] = [asdict(o) | {"cell_name": CELLS[o.cell] if three_by_three else None} for o in self.objects]
        return d

    def categories(self) -> set[tuple[str, str]]:
        return {o.category for o in self.objects}

    def absent_partners(self) -> set[tuple[str, str]]:
        """The ``PAIRS`` partners of present objects that are themselves absent (where a learnt
        co-occurrence prior would report an object that is not there)."""
        cats = self.categories()
        return {PARTNER[c] for c in cats if c in PARTNER and PARTNER[c] not in cats}


def _categories(rng: np.random.Generator, n: int, n_max: int, pair_bias: float) -> list[tuple[str, str]]:
    """``n`` distinct (colour, shape) categories; a placed category brings its ``PAIRS`` partner with
    probability ``pair_bias`` (up to ``n_max``)."""
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
    return cats


def _in_cell(rng: np.random.Generator, cat: tuple[str, str], cell: int, cols: int, size: str) -> Obj:
    """An object of ``cat`` jittered inside its 32-unit layout cell (``cols`` cells a row)."""
    r = 7.0 if size == "small" else 12.0
    row, col = divmod(int(cell), cols)
    jitter = 14.0 - r
    cx = col * 32 + 16 + float(rng.uniform(-jitter, jitter))
    cy = row * 32 + 16 + float(rng.uniform(-jitter, jitter))
    return Obj(shape=cat[1], colour=cat[0], size=size, cell=int(cell), cx=cx, cy=cy, r=r)


def _grey_background(rng: np.random.Generator) -> dict:
    """A grey background of random shade and tint with its clutter level and seed (``Scene`` fields)."""
    grey = int(rng.integers(95, 165))
    tint = rng.integers(-12, 13, size=3)
    background = tuple(int(np.clip(grey + t, 0, 255)) for t in tint)
    return {"background": background, "clutter": float(rng.uniform(0, 1)), "clutter_seed": int(rng.integers(2**31))}


def sample_scene(seed: int, n_min: int = 1, n_max: int = 5, pair_bias: float = 0.7) -> Scene:
    """A random scene; the same seed always gives the same scene."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(n_min, n_max + 1))
    cells = list(rng.permutation(9))
    objects = [_in_cell(rng, cat, cell, 3, SIZES[int(rng.integers(2))]) for cat, cell in zip(_categories(rng, n, n_max, pair_bias), cells)]
    return Scene(seed=seed, objects=objects, **_grey_background(rng))


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


def render_batch(scenes: list[Scene], size: int | None = None):
    """The scenes rendered as a float tensor ``[B, 3, size, size]`` in [0, 1] (``size``: the first scene's
    canvas by default)."""
    import torch

    size = size or scenes[0].canvas
    arr = np.stack([np.asarray(render(s, size), dtype=np.float32) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).div(255.0)


def render_seeds(seeds, size: int):
    """``render_batch`` of ``sample_scene(seed)`` for each seed: a module-level function, so that worker
    processes can run it (training scripts render in parallel)."""
    return render_batch([sample_scene(int(s)) for s in seeds], size)


def render(scene: Scene, size: int | None = None) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels (default: its canvas, 1 px per unit)."""
    size = size or scene.canvas
    scale = size / scene.canvas
    img = Image.new("RGB", (size, size), scene.background)
    draw = ImageDraw.Draw(img)
    if scene.style == "doc":
        _draw_page(draw, scene, scale)
        for o in scene.objects:
            _draw_shape(draw, o, scale)
        return img
    rng = np.random.default_rng(scene.clutter_seed)
    n_lines = int(scene.clutter * 14)
    for _ in range(n_lines):  # low-contrast, grey clutter: never mistakable for an object colour
        shade = int(np.clip(scene.background[0] + rng.integers(-40, 41), 0, 255))
        pts = rng.uniform(0, size, size=4)
        draw.line([tuple(pts[:2]), tuple(pts[2:])], fill=(shade, shade, shade), width=max(1, int(scale)))
    for o in scene.objects:
        _draw_shape(draw, o, scale)
    return img


def patch_cells(grid: int, canvas: float = CANVAS) -> np.ndarray:
    """``[grid, grid]``: the layout cell (0-8, row-major) of each patch of a ``grid`` x ``grid`` patching,
    by the patch centre (the 3 x 3 layout of 32-px cells of the 96 canvas)."""
    centres = (np.arange(grid) + 0.5) * (canvas / grid)
    cy, cx = np.meshgrid(centres, centres, indexing="ij")
    return (np.minimum(cy // 32, 2) * 3 + np.minimum(cx // 32, 2)).astype(np.int64)


def patch_labels(scene: Scene, grid: int) -> dict[str, np.ndarray]:
    """Per patch of a ``grid`` x ``grid`` patching, the colour / shape / size index (0 = background, else
    1 + index) of the object covering the patch centre, and the patch's layout cell — dense targets for
    pretraining a vision tower."""
    step = scene.canvas / grid
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
    return {"colour": colour, "shape": shape, "size": size, "cell": patch_cells(grid, scene.canvas)}


# ---------------------------------------------------------------------------------------------------
# large images for AnyRes models: synth-hires scenes and synth-doc pages

HIRES_CANVAS = 192


def sample_hires_scene(seed: int, n_min: int = 2, n_max: int = 8, pair_bias: float = 0.7) -> Scene:
    """A 192 x 192 scene of **small** objects (14 px across) in the cells of a 6 x 6 layout (32 px cells).

    Seen by an AnyRes model with 96-px views, each of the four crops shows a quarter of the scene at full
    resolution (objects look as in the 96-px world), while the thumbnail halves them to 7 px, less than
    one 8-px patch: colour survives, shape and count mostly do not. ``Obj.cell`` indexes the 6 x 6 layout."""
    rng = np.random.default_rng([seed, 192])
    n = int(rng.integers(n_min, n_max + 1))
    cells = list(rng.permutation(36))
    objects = [_in_cell(rng, cat, cell, 6, "small") for cat, cell in zip(_categories(rng, n, n_max, pair_bias), cells)]
    return Scene(seed=seed, objects=objects, canvas=HIRES_CANVAS, **_grey_background(rng))


def _text_line(rng: np.random.Generator, x0: float, x1: float, y: float, height: float = 3.0) -> list[list[float]]:
    """A line of 'text': word-like dark bars with gaps, from x0 to at most x1."""
    words, x = [], x0
    while x < x1 - 6:
        w = float(rng.uniform(6, 22))
        words.append([x, y, min(x + w, x1), y + height])
        x += w + 3
    return words


def sample_doc_scene(seed: int, n_min: int = 1, n_max: int = 6, pair_bias: float = 0.7) -> Scene:
    """A 192 x 192 document page: wide blank margins, a title, paragraphs of text lines (word-like bars)
    and a ruled table whose cells hold small icons (the world's objects, 14 px across) or short text.

    Questions are about the icons; most of the page is blank margin or repetitive text, which is what
    per-crop, redundancy-aware compression exploits. ``Obj.cell`` is the icon's table cell (row-major);
    ``extra`` holds the layout: ``title`` and ``words`` (bars), ``table`` (x0, y0, column width, row height,
    rows, columns)."""
    rng = np.random.default_rng([seed, 4242])
    mx, top = float(rng.integers(20, 37)), float(rng.integers(14, 29))
    x0, x1 = mx, HIRES_CANVAS - mx
    words = []
    title = [x0, top, x0 + float(rng.uniform(0.35, 0.8)) * (x1 - x0), top + 6]
    y = top + 14
    for i in range(int(rng.integers(1, 4))):
        end = x1 if i < 2 else x0 + float(rng.uniform(0.3, 0.9)) * (x1 - x0)
        words += _text_line(rng, x0, end, y)
        y += 9
    rows, cols = int(rng.integers(2, 4)), int(rng.integers(3, 5))
    cw, rh = (x1 - x0) / cols, 30.0
    ty = y + 6
    table = [x0, ty, cw, rh, rows, cols]
    y = ty + rows * rh + 10
    while y < HIRES_CANVAS - top - 3 and rng.random() < 0.85:
        words += _text_line(rng, x0, x1 if rng.random() < 0.7 else x0 + float(rng.uniform(0.3, 0.9)) * (x1 - x0), y)
        y += 9
    n = int(rng.integers(n_min, min(n_max, rows * cols) + 1))
    cells = [int(c) for c in rng.permutation(rows * cols)]
    objects = []
    cats = _categories(rng, n, min(n_max, rows * cols), pair_bias)
    for cat, cell in zip(cats, cells):
        r = 7.0
        row, col = divmod(cell, cols)
        jx, jy = max(0.0, cw / 2 - r - 3), max(0.0, rh / 2 - r - 3)
        cx = x0 + (col + 0.5) * cw + float(rng.uniform(-jx, jx))
        cy = ty + (row + 0.5) * rh + float(rng.uniform(-jy, jy))
        objects.append(Obj(shape=cat[1], colour=cat[0], size="small", cell=cell, cx=cx, cy=cy, r=r))
    for cell in cells[len(cats):]:  # some empty cells hold a short text entry
        if rng.random() < 0.5:
            row, col = divmod(cell, cols)
            cy = ty + (row + 0.5) * rh - 1.5
            words += _text_line(rng, x0 + col * cw + 4, x0 + (col + 1) * cw - 4, cy)[:2]
    paper = int(rng.integers(236, 252))
    return Scene(seed=seed, objects=objects, background=(paper, paper, paper - int(rng.integers(0, 6))), clutter=0.0,
                 clutter_seed=0, extra={"title": title, "words": words, "table": table},
                 canvas=HIRES_CANVAS, style="doc")


def _draw_page(draw: ImageDraw.ImageDraw, scene: Scene, scale: float) -> None:
    ink = (70, 70, 78)
    x0, y0, x1, y1 = scene.extra["title"]
    draw.rectangle((x0 * scale, y0 * scale, x1 * scale, y1 * scale), fill=(40, 40, 48))
    for x0, y0, x1, y1 in scene.extra["words"]:
        draw.rectangle((x0 * scale, y0 * scale, x1 * scale, y1 * scale), fill=ink)
    tx, ty, cw, rh, rows, cols = scene.extra["table"]
    width = max(1, round(scale))
    for r in range(rows + 1):
        y = (ty + r * rh) * scale
        draw.line([(tx * scale, y), ((tx + cols * cw) * scale, y)], fill=ink, width=width)
    for c in range(cols + 1):
        x = (tx + c * cw) * scale
        draw.line([(x, ty * scale), (x, (ty + rows * rh) * scale)], fill=ink, width=width)
