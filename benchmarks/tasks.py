"""Benchmark tasks for the harness: a list of items (image + question + reference answers) and how to
score and aggregate predictions.

A task is one small definition: ``items()`` reads or generates the samples, ``score()`` scores one
prediction, ``aggregate()`` turns per-sample rows into the task's metrics (headline under ``"score"``).
Built-in synthetic tasks come from :mod:`mmtoken.world`; real benchmarks are read from local files in
their official layouts by :mod:`mmtoken.benchmarks.readers`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from PIL import Image

from . import metrics


@dataclass
class Item:
    """One benchmark sample. ``instruction`` is appended to the question (e.g. an answer-format hint)."""

    id: str
    image: Image.Image | None
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    instruction: str = ""


@dataclass
class BenchTask:
    """A benchmark task. ``per_sample(item, prediction) -> dict`` gives per-sample scores; ``aggregate(rows)``
    (rows: dicts with ``item_id``, ``prediction``, ``answers``, ``meta``, ``scores``) gives the metrics."""

    name: str
    load: Callable[[int | None], list[Item]]
    per_sample: Callable[[Item, str], dict[str, float]]
    aggregate: Callable[[list[dict]], dict[str, float]]
    max_new_tokens: int = 8
    description: str = ""

    def items(self, limit: int | None = None) -> list[Item]:
        items = self.load(limit)
        return items[:limit] if limit is not None else items


def mean_of(key: str) -> Callable[[list[dict]], dict[str, float]]:
    """Aggregate: the mean of one per-sample score, reported as ``score`` and under its own name."""

    def agg(rows: list[dict]) -> dict[str, float]:
        value = sum(r["scores"][key] for r in rows) / max(1, len(rows))
        return {"score": value, key: value}

    return agg


def _first_word(prediction: str) -> str:
    words = prediction.strip().split()
    return words[0].strip(".,") if words else ""


# ---------------------------------------------------------------------------------------------------
# synthetic tasks


def _synthetic_items(task_name: str) -> Callable[[int | None], list[Item]]:
    def load(limit: int | None) -> list[Item]:
        from mmtoken.world import get_task, render

        task = get_task(task_name)
        n = task.test_size if limit is None else min(limit, task.test_size)
        return [
            Item(id=s.id, image=render(s.scene), question=s.question, answers=s.answers,
                 meta={"family": s.family, "scene_seed": s.scene.seed})
            for s in task.samples("test", n)
        ]

    return load


def _first_word_accuracy(item: Item, prediction: str) -> dict[str, float]:
    return {"accuracy": metrics.exact_match(_first_word(prediction), item.answers)}


def _synth_vqa_aggregate(rows: list[dict]) -> dict[str, float]:
    out = mean_of("accuracy")(rows)
    families: dict[str, list[float]] = {}
    for r in rows:
        families.setdefault(r["meta"].get("family", "?"), []).append(r["scores"]["accuracy"])
    out.update({f"accuracy_{k}": sum(v) / len(v) for k, v in sorted(families.items())})
    return out


def _pope_aggregate(rows: list[dict]) -> dict[str, float]:
    m = metrics.pope_metrics([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
    return {"score": m["f1"], **m}


def _caption_aggregate(rows: list[dict]) -> dict[str, float]:
    from mmtoken.world.tasks import caption_objects

    mentioned = [{" ".join(o) for o in caption_objects(r["prediction"])} for r in rows]
    present = [set(r["meta"]["objects"]) for r in rows]
    m = metrics.chair_metrics(mentioned, present)
    return {"score": m["chair_i"], **m}


def _caption_items(limit: int | None) -> list[Item]:
    items = _synthetic_items("synth-caption")(limit)
    from mmtoken.world import sample_scene

    for it in items:
        it.meta["objects"] = sorted(o.name for o in sample_scene(it.meta["scene_seed"]).objects)
    return items


def format_scores(item: Item, prediction: str) -> dict[str, float]:
    """``compliance``: the answer has the requested form; ``accuracy``: its content is right."""
    import json as _json

    fmt = item.meta["family"]
    target = item.answers[0]
    pred = prediction.strip()
    if fmt == "upper":  # no lower-case letter: digits (counts) have no case and comply as they are
        ok = pred == pred.upper() and len(pred.split()) == 1
        content = pred.lower()
        truth = target.lower()
    elif fmt == "json":
        try:
            value = _json.loads(pred)
            ok = isinstance(value, dict) and set(value) == {"answer"} and isinstance(value["answer"], str)
            content = value["answer"] if ok else ""
        except ValueError:
            ok, content = False, ""
        truth = _json.loads(target)["answer"]
    else:
        ok = len(pred.split()) == 1
        content, truth = pred, target
    return {"compliance": float(ok), "accuracy": float(ok and content == truth)}


def _format_aggregate(rows: list[dict]) -> dict[str, float]:
    out = {"score": 0.0}
    for key in ("compliance", "accuracy"):
        out[key] = sum(r["scores"][key] for r in rows) / max(1, len(rows))
    out["score"] = out["compliance"]
    for fmt in ("upper", "json", "word"):
        sub = [r for r in rows if r["meta"].get("family") == fmt]
        if sub:
            out[f"compliance_{fmt}"] = sum(r["scores"]["compliance"] for r in sub) / len(sub)
    return out


TASKS: dict[str, BenchTask] = {
    "synth-vqa": BenchTask(
        "synth-vqa", _synthetic_items("synth-vqa"),
        _first_word_accuracy,
        _synth_vqa_aggregate, max_new_tokens=3,
        description="synthetic VQA: colour, shape, count, position, relation, attribute-at-location, size",
    ),
    "synth-pope": BenchTask(
        "synth-pope", _synthetic_items("synth-pope"),
        lambda item, pred: {"accuracy": float(metrics.parse_pope_answer(pred) == item.answers[0])},
        _pope_aggregate, max_new_tokens=3,
        description="synthetic POPE: object existence, random / popular / adversarial negatives",
    ),
    "synth-caption": BenchTask(
        "synth-caption", _caption_items, lambda item, pred: {}, _caption_aggregate, max_new_tokens=24,
        description="synthetic captions; exact CHAIR_s / CHAIR_i (score = CHAIR_i, lower is better)",
    ),
    "synth-format": BenchTask(
        "synth-format", _synthetic_items("synth-format"), format_scores, _format_aggregate, max_new_tokens=8,
        description="synthetic instruction following: upper case / JSON / one word (score = compliance)",
    ),
    "synth-hires": BenchTask(
        "synth-hires", _synthetic_items("synth-hires"),
        _first_word_accuracy,
        _synth_vqa_aggregate, max_new_tokens=3,
        description="synthetic high-resolution VQA (192 px, small objects) for AnyRes models: colour, shape, count, "
                    "existence",
    ),
    "synth-doc": BenchTask(
        "synth-doc", _synthetic_items("synth-doc"),
        _first_word_accuracy,
        _synth_vqa_aggregate, max_new_tokens=3,
        description="synthetic document pages (192 px: margins, text lines, a table of icons): colour, shape, count, "
                    "existence of the icons",
    ),
}


def get_bench_task(name: str, data: str | None = None) -> BenchTask:
    """A built-in task by name, or a real benchmark read from ``data`` (see ``readers``)."""
    if name in TASKS:
        return TASKS[name]
    from . import readers

    return readers.load_task(name, data)
