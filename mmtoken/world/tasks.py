"""Benchmark tasks on the synthetic world, with exact answers and fixed held-out splits.

Each sample is a pure function of ``(task, split, index)``: training samples use scene seeds
``index``, held-out ones ``10_000_000 + index`` — disjoint streams, so no held-out scene is ever seen in
training. Answers are single words of the world's vocabulary.

* ``synth-vqa``: colour / shape / count / position / relation / attribute-at-location / size questions.
* ``synth-pope``: "is there a <colour> <shape> ?" with random, popular and adversarial negatives
  (adversarial: the partner of a co-occurring pair whose other half is present), balanced yes / no.
* ``synth-caption``: "describe the image ." -> the objects in reading order of their cells,
  ``"red circle and blue square ."``; the objects mentioned are exact, so CHAIR_s / CHAIR_i are exact.
* ``synth-format``: a synth-vqa question with a required answer format — upper case, JSON
  (``{ "answer" : "red" }``) or one word — scored for compliance and for content.
* ``synth-hires``: 192-px scenes of small objects for AnyRes models — colour / shape / count / existence
  questions whose answers need the crops (the thumbnail shrinks objects below one patch).
* ``synth-doc``: 192-px document pages (margins, text lines, a ruled table holding icons) — colour / shape
  / count / existence questions about the icons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .scenes import CELLS, COLOURS, PARTNER, SHAPES, Scene, sample_doc_scene, sample_hires_scene, sample_scene

HELD_OUT = 10_000_000
NUMBERS = ("0", "1", "2", "3", "4", "5")


@dataclass
class Sample:
    id: str
    task: str
    scene: Scene
    question: str
    answers: list[str]
    family: str
    meta: dict = field(default_factory=dict)


def plural(word: str) -> str:
    return word + ("es" if word.endswith("s") else "s")


def _unique(objs, key):
    counts: dict = {}
    for o in objs:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in objs if counts[key(o)] == 1]


def _attribute_question(fam: str, objs, pick) -> tuple[str, str, str]:
    """The colour of the object with a unique shape, or the shape of the object with a unique colour."""
    if fam == "colour":
        o = pick(_unique(objs, lambda o: o.shape))
        return fam, f"what colour is the {o.shape} ?", o.colour
    o = pick(_unique(objs, lambda o: o.colour))
    return fam, f"what shape is the {o.colour} object ?", o.shape


def _vqa_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    objs = scene.objects
    families = ["count_all", "count", "position", "at_cell", "size"]
    if _unique(objs, lambda o: o.shape):
        families.append("colour")
    if _unique(objs, lambda o: o.colour):
        families.append("shape")
    if len(objs) >= 2:
        families.append("relation")
    fam = families[int(rng.integers(len(families)))]
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    if fam in ("colour", "shape"):
        return _attribute_question(fam, objs, pick)
    if fam == "count_all":
        return fam, "how many objects are there ?", str(len(objs))
    if fam == "count":
        shape = pick(SHAPES)
        return fam, f"how many {plural(shape)} are there ?", str(sum(o.shape == shape for o in objs))
    if fam == "position":
        o = pick(objs)
        return fam, f"where is the {o.colour} {o.shape} ?", CELLS[o.cell]
    if fam == "size":
        o = pick(objs)
        return fam, f"is the {o.colour} {o.shape} small or large ?", o.size
    if fam == "at_cell":
        if rng.random() < 0.75:
            o = pick(objs)
            what = pick(["colour", "shape"])
            return fam, f"what {what} is the object at the {CELLS[o.cell]} ?", getattr(o, what)
        empty = [c for c in range(9) if c not in {o.cell for o in objs}]
        c = pick(empty) if empty else pick(objs).cell
        occupied = [o for o in objs if o.cell == c]
        return fam, f"is there an object at the {CELLS[c]} ?", "yes" if occupied else "no"
    # relation
    a, b = (objs[i] for i in rng.permutation(len(objs))[:2])
    if rng.random() < 0.5:
        return fam, f"is the {a.colour} {a.shape} left of the {b.colour} {b.shape} ?", "yes" if a.cx < b.cx else "no"
    return fam, f"is the {a.colour} {a.shape} above the {b.colour} {b.shape} ?", "yes" if a.cy < b.cy else "no"


def _large_image_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """A question about the small objects of a synth-hires scene or the icons of a synth-doc page: colour,
    shape, count or existence — what the thumbnail's 7-px objects do not resolve. (Where an object is can
    be read off the thumbnail, so it is not asked.)"""
    objs = scene.objects
    pick = lambda seq: seq[int(rng.integers(len(seq)))]  # noqa: E731
    families = ["count", "exist"]
    if _unique(objs, lambda o: o.shape):
        families.append("colour")
    if _unique(objs, lambda o: o.colour):
        families.append("shape")
    fam = pick(families)
    if fam in ("colour", "shape"):
        return _attribute_question(fam, objs, pick)
    if fam == "count":
        shape = pick(sorted({o.shape for o in objs})) if rng.random() < 0.7 else pick(SHAPES)
        return fam, f"how many {plural(shape)} are there ?", str(min(5, sum(o.shape == shape for o in objs)))
    present = scene.categories()
    if rng.random() < 0.5:
        cat = pick(sorted(present))
        return fam, f"is there a {cat[0]} {cat[1]} ?", "yes"
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    near = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
    cat = pick(near or absent)
    return fam, f"is there a {cat[0]} {cat[1]} ?", "no"


def _category_frequencies() -> list[tuple[str, str]]:
    """Categories by frequency in training scenes (the 'popular' negatives), computed on 4,000 scenes."""
    counts: dict = {}
    for s in range(4000):
        for c in sample_scene(s).categories():
            counts[c] = counts.get(c, 0) + 1
    return sorted(counts, key=lambda c: (-counts[c], c))


_POPULAR: list | None = None


def _pope_question(scene: Scene, rng: np.random.Generator, index: int) -> tuple[str, str, str]:
    global _POPULAR
    present = scene.categories()
    positive = index % 2 == 0
    kind = ("random", "popular", "adversarial")[(index // 2) % 3]
    if positive:
        cat = sorted(present)[int(rng.integers(len(present)))]
        return kind, f"is there a {cat[0]} {cat[1]} ?", "yes"
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
    if kind == "popular":
        if _POPULAR is None:
            _POPULAR = _category_frequencies()
        absent = [c for c in _POPULAR if c not in present][:3]
    elif kind == "adversarial":
        partners = [PARTNER[c] for c in present if c in PARTNER and PARTNER[c] not in present]
        same_shape_or_colour = [c for c in absent if any(c[0] == p[0] or c[1] == p[1] for p in present)]
        absent = partners or same_shape_or_colour or absent
    cat = absent[int(rng.integers(len(absent)))]
    return kind, f"is there a {cat[0]} {cat[1]} ?", "no"


def caption_text(names: list[str]) -> str:
    """``["red circle", "blue square", "green cross"]`` -> "red circle , blue square and green cross ."."""
    return (" , ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]) + " ."


def caption(scene: Scene) -> str:
    return caption_text([f"{o.colour} {o.shape}" for o in sorted(scene.objects, key=lambda o: o.cell)])


def caption_objects(text: str) -> set[tuple[str, str]]:
    """The (colour, shape) objects a caption mentions."""
    words = text.replace(",", " ").replace(".", " ").split()
    return {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}


def _caption_question(scene: Scene, rng: np.random.Generator, index: int) -> tuple[str, str, str]:
    return "caption", "describe the image .", caption(scene)


FORMATS = {
    "upper": "answer in upper case .",
    "json": "answer in json .",
    "word": "answer with one word .",
}


def formatted(answer: str, fmt: str) -> str:
    if fmt == "upper":
        return answer.upper()
    if fmt == "json":
        return '{ "answer" : "' + answer + '" }'
    return answer


def _format_question(scene: Scene, rng: np.random.Generator, index: int) -> tuple[str, str, str]:
    family, question, answer = _vqa_question(scene, rng)
    fmt = ("upper", "json", "word")[index % 3]
    return fmt, f"{question} {FORMATS[fmt]}", formatted(answer, fmt)


@dataclass
class Task:
    name: str
    metric: str  # headline metric name
    make: Callable[[Scene, np.random.Generator, int], tuple[str, str, str]]
    test_size: int = 1000
    scene_fn: Callable[[int], Scene] = sample_scene

    def sample(self, split: str, index: int) -> Sample:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        seed = index + (HELD_OUT if split == "test" else 0)
        scene = self.scene_fn(seed)
        rng = np.random.default_rng([seed, 7])
        family, question, answer = self.make(scene, rng, index)
        return Sample(id=f"{self.name}/{split}/{index}", task=self.name, scene=scene, question=question,
                      answers=[answer], family=family)

    def samples(self, split: str = "test", n: int | None = None, start: int = 0) -> list[Sample]:
        n = self.test_size if n is None else n
        return [self.sample(split, i) for i in range(start, start + n)]


TASKS: dict[str, Task] = {
    "synth-vqa": Task("synth-vqa", "accuracy", lambda s, r, i: _vqa_question(s, r)),
    "synth-pope": Task("synth-pope", "f1", _pope_question, test_size=900),
    "synth-caption": Task("synth-caption", "chair_i", _caption_question, test_size=500),
    "synth-format": Task("synth-format", "compliance", _format_question, test_size=600),
    "synth-hires": Task("synth-hires", "accuracy", lambda s, r, i: _large_image_question(s, r),
                        test_size=600, scene_fn=sample_hires_scene),
    "synth-doc": Task("synth-doc", "accuracy", lambda s, r, i: _large_image_question(s, r),
                      test_size=600, scene_fn=sample_doc_scene),
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]


def vocabulary() -> list[str]:
    """Every word the world's prompts and answers use."""
    words = set(COLOURS) | set(SHAPES) | {plural(s) for s in SHAPES} | set(CELLS) | set(NUMBERS)
    words |= {"small", "large", "yes", "no", "?", ":", "."}
    for t in TASKS.values():
        for i in range(400):
            s = t.sample("train", i)
            words |= set(s.question.split()) | set(s.answers)
    words |= {"question", "answer", "describe", "the", "image", "there", "is", "a", "and", "in", ",", "{", "}", '"answer"'}
    answers = set(COLOURS) | set(SHAPES) | set(CELLS) | set(NUMBERS) | {"small", "large", "yes", "no"}
    words |= {a.upper() for a in answers} | {f'"{a}"' for a in answers}
    for f in FORMATS.values():
        words |= set(f.split())
    return sorted(words)
