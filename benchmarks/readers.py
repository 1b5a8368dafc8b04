"""Real benchmarks, read from local files in their official layouts.

``load_task(name, data)`` returns a :class:`~mmtoken.benchmarks.tasks.BenchTask` for one of the benchmarks
below, read from the directory ``data`` (the ``--data DIR`` of the command line). Nothing is ever
downloaded: fetch each benchmark from its official source and point ``--data`` at the folder that holds
the files listed in the reader's docstring.

=====================================================  ==========================================
task                                                   files under ``--data DIR``
=====================================================  ==========================================
``vqav2``                                              ``v2_OpenEnded_mscoco_val2014_questions.json``,
                                                       ``v2_mscoco_val2014_annotations.json``, ``val2014/``
``gqa``                                                ``testdev_balanced_questions.json``, ``images/``
``textvqa``                                            ``TextVQA_0.5.1_val.json``, ``train_images/``
``pope``, ``pope-random``, ``pope-popular``,           ``coco_pope_{random,popular,adversarial}.json``,
``pope-adversarial``                                   ``val2014/``
``mme``                                                ``MME_Benchmark_release_version`` contents
``chair``                                              ``annotations/instances_val2014.json``, ``val2014/``
``docvqa``                                             ``val_v1.0.json``, ``documents/``
``chartqa``, ``chartqa-human``, ``chartqa-augmented``  ``val_human.json``, ``val_augmented.json``, ``png/``
``scienceqa``                                          ``problems.json``, ``test/``
``mmbench``                                            ``mmbench_dev_en.tsv`` (or the ``.tsv`` itself)
=====================================================  ==========================================

Reading is safe by default: JSON is parsed with :mod:`json`, TSV with :mod:`csv`, images are decoded by
PIL (its decompression-bomb limit is kept), and every path taken from a data file must stay inside
``DIR``. Every reader validates what it reads and fails with one :class:`DatasetError` (a ``ValueError``)
naming the file and the missing or invalid field.

``task.load(limit)`` parses the annotation files once (cached on the task) and decodes only the images
of the items it returns, i.e. the first ``limit`` ones; ``load(None)`` decodes every image of the
benchmark into memory, so pass a limit for the large sets. Items come in a fixed order: file order, with
the splits of multi-split tasks (``pope``, ``chartqa``) and MME's categories interleaved so that a
limited run still covers all of them.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
from collections.abc import Hashable
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from mmtoken.errors import MmtokenError

from . import metrics
from .tasks import TASKS, BenchTask, Item

__all__ = ["DatasetError", "REAL_TASKS", "CHAIR_SYNONYMS", "load_task"]

SHORT_ANSWER = "Answer the question using a single word or phrase."
LETTER_ANSWER = "Answer with the option's letter from the given choices directly."
CHAIR_QUESTION = "Please describe this image in detail."

_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")


class DatasetError(MmtokenError, ValueError):
    """A benchmark's local files are missing, or do not follow the benchmark's official layout."""


# ---------------------------------------------------------------------------------------------------
# reading and validation helpers


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "str": ("a string", lambda v: isinstance(v, str)),
    "text": ("a non-empty string", lambda v: isinstance(v, str) and bool(v.strip())),
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "id": ("an integer or a non-empty string",
           lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and bool(v.strip()))),
    "scalar": ("a string or a number",
               lambda v: isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool))),
    "list": ("a list", lambda v: isinstance(v, list)),
    "texts": ("a non-empty list of strings",
              lambda v: isinstance(v, list) and bool(v) and all(isinstance(a, str) for a in v)),
    "dict": ("a JSON object", lambda v: isinstance(v, dict)),
}


def _field(record: Any, key: str, label: str, where: str, kind: str = "str") -> Any:
    """``record[key]``, checked to be of ``kind``; otherwise one DatasetError naming file, record, field."""
    if not isinstance(record, dict):
        raise DatasetError(f"{label}: {where} is not a JSON object (got {type(record).__name__})")
    if key not in record:
        raise DatasetError(f"{label}: {where} has no field {key!r}")
    value = record[key]
    desc, ok = _KINDS[kind]
    if not ok(value):
        raise DatasetError(f"{label}: {where} has an invalid field {key!r} (expected {desc}, got {_short(value)})")
    return value


def _optional(record: dict, key: str, label: str, where: str, kind: str = "str", default: Any = None) -> Any:
    if record.get(key) is None:
        return default
    return _field(record, key, label, where, kind)


@dataclass
class _Rec:
    """One sample before its image is decoded; ``image`` is a key for the task's image opener."""

    id: str
    image: Hashable
    question: str
    answers: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


class _Files:
    """The ``--data`` directory of one task: resolves paths, reads files and words the errors."""

    def __init__(self, task: str, root: Path, layout: str):
        self.task, self.root, self.layout = task, root, layout

    def _layout(self) -> str:
        return f"task {self.task!r} expects this layout under --data DIR ({self.root}):\n{self.layout}"

    def label(self, path: Path) -> str:
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return str(path)

    def require(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_file():
            raise DatasetError(f"{path}: file not found; {self._layout()}")
        return path

    def require_dir(self, rel: str) -> Path:
        path = self.root / rel
        if not path.is_dir():
            raise DatasetError(f"{path}: folder not found; {self._layout()}")
        return path

    def json(self, path: Path) -> Any:
        try:
            with open(path, encoding="utf-8") as fh:
                return json.load(fh)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{self.label(path)}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise DatasetError(f"{self.label(path)}: not UTF-8 text ({e.reason})") from None

    def inside(self, rel: str, label: str, where: str, base: str = "") -> Path:
        """``DIR/base/rel`` for a relative path ``rel`` read from a data file; refuses paths leaving DIR."""
        parts = Path(rel).parts
        if not rel or Path(rel).is_absolute() or ".." in parts or "\\" in rel:
            raise DatasetError(f"{label}: {where} has an unsafe path {rel!r} "
                               "(it must be relative to the data folder, without '..')")
        return self.root / base / rel

    def open_image(self, path: Path, item_id: str) -> Image.Image:
        if not path.is_file():
            raise DatasetError(f"{path}: image of item {item_id!r} not found; {self._layout()}")
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{self.label(path)}: cannot read the image of item {item_id!r} ({e})") from None


def _interleave(groups: list[list[Any]]) -> list[Any]:
    """Round-robin over ``groups``: g0[0], g1[0], ..., g0[1], g1[1], ... (shorter groups drop out)."""
    out: list[Any] = []
    for i in range(max((len(g) for g in groups), default=0)):
        out.extend(g[i] for g in groups if i < len(g))
    return out


def _loader(files: _Files, records: Callable[[], list[_Rec]], instruction: str,
            opener: Callable[[Hashable, str], Image.Image] | None = None) -> Callable[[int | None], list[Item]]:
    """``load(limit)``: records parsed once, images decoded for the first ``limit`` records only (an image
    shared by several records is decoded once)."""
    cache: list[list[_Rec]] = []
    open_image = opener or files.open_image

    def load(limit: int | None) -> list[Item]:
        if not cache:
            cache.append(records())
        chosen = cache[0] if limit is None else cache[0][:limit]
        images: dict[Hashable, Image.Image] = {}
        items = []
        for r in chosen:
            if r.image not in images:
                images[r.image] = open_image(r.image, r.id)
            items.append(Item(id=r.id, image=images[r.image], question=r.question, answers=list(r.answers),
                              meta=dict(r.meta), instruction=instruction))
        return items

    return load


def _mean(rows: list[dict], key: str) -> float:
    return sum(r["scores"][key] for r in rows) / max(1, len(rows))


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text.strip().lower()).strip("_") or "other"


def _mean_by(rows: list[dict], key: str, meta_key: str) -> dict[str, float]:
    """``{f"{key}_{group}": mean}`` over the groups given by ``meta[meta_key]``, in order of appearance."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        group = r["meta"].get(meta_key)
        if group is not None:
            groups.setdefault(_slug(str(group)), []).append(r["scores"][key])
    return {f"{key}_{g}": sum(v) / len(v) for g, v in groups.items()}


# ---------------------------------------------------------------------------------------------------
# VQAv2

VQAV2_QUESTIONS = "v2_OpenEnded_mscoco_val2014_questions.json"
VQAV2_ANNOTATIONS = "v2_mscoco_val2014_annotations.json"
_VQAV2_LAYOUT = f"""\
  {VQAV2_QUESTIONS}   {{"questions": [{{"question_id", "image_id", "question"}}, ...]}}
  {VQAV2_ANNOTATIONS}           {{"annotations": [{{"question_id", "answers": [{{"answer"}}, ...], ...}}, ...]}}
  val2014/COCO_val2014_<image_id as 12 digits>.jpg"""


def _vqav2(name: str, f: _Files) -> BenchTask:
    """VQAv2 val (official VQA JSON)::

        DIR/v2_OpenEnded_mscoco_val2014_questions.json   {"questions": [{"question_id", "image_id", "question"}]}
        DIR/v2_mscoco_val2014_annotations.json           {"annotations": [{"question_id", "answers": [{"answer"}],
                                                           "multiple_choice_answer", "answer_type"}]}
        DIR/val2014/COCO_val2014_{image_id:012d}.jpg

    Answers: the 10 human answers; score = VQA accuracy (``metrics.vqa_accuracy``), also per answer type
    (``accuracy_yes_no``, ``accuracy_number``, ``accuracy_other``)."""
    qpath, apath = f.require(VQAV2_QUESTIONS), f.require(VQAV2_ANNOTATIONS)
    f.require_dir("val2014")

    def records() -> list[_Rec]:
        alabel, qlabel = f.label(apath), f.label(qpath)
        annotations = _field(f.json(apath), "annotations", alabel, "the top-level object", "list")
        by_qid: dict[Any, dict] = {}
        for i, ann in enumerate(annotations):
            where = f"annotation {i}"
            qid = _field(ann, "question_id", alabel, where, "id")
            answers = _field(ann, "answers", alabel, where, "list")
            if not answers:
                raise DatasetError(f"{alabel}: {where} has an empty 'answers' list")
            texts = [_field(a, "answer", alabel, f"{where}, answers[{j}]", "str") for j, a in enumerate(answers)]
            meta = {"answer_type": _optional(ann, "answer_type", alabel, where),
                    "question_type": _optional(ann, "question_type", alabel, where),
                    "multiple_choice_answer": _optional(ann, "multiple_choice_answer", alabel, where)}
            by_qid[qid] = {"answers": texts, "meta": {k: v for k, v in meta.items() if v is not None}}
        questions = _field(f.json(qpath), "questions", qlabel, "the top-level object", "list")
        out = []
        for i, q in enumerate(questions):
            where = f"question {i}"
            qid = _field(q, "question_id", qlabel, where, "id")
            image_id = _field(q, "image_id", qlabel, where, "int")
            text = _field(q, "question", qlabel, where, "text")
            if qid not in by_qid:
                raise DatasetError(f"{qlabel}: {where} (question_id {qid}) has no annotation in {alabel}")
            ann = by_qid[qid]
            out.append(_Rec(str(qid), f.root / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", text,
                            ann["answers"], {"image_id": image_id, **ann["meta"]}))
        return out

    def aggregate(rows: list[dict]) -> dict[str, float]:
        acc = _mean(rows, "accuracy")
        return {"score": acc, "accuracy": acc, **_mean_by(rows, "accuracy", "answer_type")}

    return BenchTask(name, _loader(f, records, SHORT_ANSWER),
                     lambda item, pred: {"accuracy": metrics.vqa_accuracy(pred, item.answers)},
                     aggregate, max_new_tokens=16,
                     description="VQAv2 val: open-ended VQA on COCO, VQA accuracy over 10 human answers")


# ---------------------------------------------------------------------------------------------------
# GQA

GQA_QUESTIONS = "testdev_balanced_questions.json"
_GQA_LAYOUT = f"""\
  {GQA_QUESTIONS}   {{"<question id>": {{"imageId", "question", "answer", ...}}, ...}}
  images/<imageId>.jpg"""


def _gqa(name: str, f: _Files) -> BenchTask:
    """GQA test-dev balanced::

        DIR/testdev_balanced_questions.json   {"<question id>": {"imageId", "question", "answer", ...}}
        DIR/images/{imageId}.jpg

    Score = exact match after VQA answer normalisation (``metrics.normalize_vqa_answer`` on prediction and
    answer), as accuracy."""
    qpath = f.require(GQA_QUESTIONS)
    f.require_dir("images")

    def records() -> list[_Rec]:
        label = f.label(qpath)
        data = f.json(qpath)
        if not isinstance(data, dict):
            raise DatasetError(f"{label}: the top-level value is not a JSON object of questions by id")
        out = []
        for qid, q in data.items():
            where = f"question {qid!r}"
            image_id = str(_field(q, "imageId", label, where, "id"))
            text = _field(q, "question", label, where, "text")
            answer = _field(q, "answer", label, where, "str")
            path = f.inside(f"{image_id}.jpg", label, where, base="images")
            out.append(_Rec(str(qid), path, text, [answer], {"image_id": image_id}))
        return out

    def per_sample(item: Item, pred: str) -> dict[str, float]:
        norm = metrics.normalize_vqa_answer
        return {"accuracy": float(norm(pred) == norm(item.answers[0]))}

    def aggregate(rows: list[dict]) -> dict[str, float]:
        acc = _mean(rows, "accuracy")
        return {"score": acc, "accuracy": acc}

    return BenchTask(name, _loader(f, records, SHORT_ANSWER), per_sample, aggregate, max_new_tokens=16,
                     description="GQA test-dev balanced: compositional VQA, exact match after VQA normalisation")


# ---------------------------------------------------------------------------------------------------
# TextVQA

TEXTVQA_FILE = "TextVQA_0.5.1_val.json"
_TEXTVQA_LAYOUT = f"""\
  {TEXTVQA_FILE}   {{"data": [{{"question_id", "image_id", "question", "answers": [10 strings]}}, ...]}}
  train_images/<image_id>.jpg"""


def _textvqa(name: str, f: _Files) -> BenchTask:
    """TextVQA 0.5.1 val (its images ship in the official ``train_images`` folder)::

        DIR/TextVQA_0.5.1_val.json   {"data": [{"question_id", "image_id", "question", "answers": [10 strings]}]}
        DIR/train_images/{image_id}.jpg

    Score = VQA accuracy (``metrics.vqa_accuracy``) over the 10 answers."""
    path = f.require(TEXTVQA_FILE)
    f.require_dir("train_images")

    def records() -> list[_Rec]:
        label = f.label(path)
        data = _field(f.json(path), "data", label, "the top-level object", "list")
        out = []
        for i, q in enumerate(data):
            where = f"entry {i}"
            qid = _field(q, "question_id", label, where, "id")
            image_id = str(_field(q, "image_id", label, where, "id"))
            text = _field(q, "question", label, where, "text")
            answers = _field(q, "answers", label, where, "texts")
            image = f.inside(f"{image_id}.jpg", label, where, base="train_images")
            out.append(_Rec(str(qid), image, text, answers, {"image_id": image_id}))
        return out

    def aggregate(rows: list[dict]) -> dict[str, float]:
        acc = _mean(rows, "accuracy")
        return {"score": acc, "accuracy": acc}

    return BenchTask(name, _loader(f, records, SHORT_ANSWER),
                     lambda item, pred: {"accuracy": metrics.vqa_accuracy(pred, item.answers)},
                     aggregate, max_new_tokens=16,
                     description="TextVQA val: VQA on text in images, VQA accuracy over 10 answers")


# ---------------------------------------------------------------------------------------------------
# POPE

POPE_SPLITS = ("random", "popular", "adversarial")
_POPE_LAYOUT = """\
  coco_pope_random.json        one JSON object per line: {"question_id", "image", "text", "label": "yes"|"no"}
  coco_pope_popular.json       (same)
  coco_pope_adversarial.json   (same)
  val2014/<image>              COCO val2014 images, e.g. val2014/COCO_val2014_000000310196.jpg"""


def _pope(name: str, f: _Files, splits: tuple[str, ...] = POPE_SPLITS) -> BenchTask:
    """POPE (COCO), official JSON-lines files, one object per line::

        DIR/coco_pope_random.json        {"question_id": 1, "image": "COCO_val2014_....jpg", "text": "Is there a
        DIR/coco_pope_popular.json        dog in the image?", "label": "yes"}
        DIR/coco_pope_adversarial.json
        DIR/val2014/{image}

    ``pope`` reads the three splits (interleaved, ``meta["split"]``), ``pope-<split>`` one of them; only
    the files of the chosen splits are needed. Item ids are ``"<split>-<question_id>"``. The prompt is the
    plain question, as in POPE itself (no instruction; LLaVA-1.5's own POPE run appends the short-answer
    hint). Answers are parsed by ``metrics.parse_pope_answer``; aggregate = ``metrics.pope_metrics``
    overall (``accuracy``, ``precision``, ``recall``, ``f1``, ``yes_ratio``) and per split
    (``f1_random``, ...); score = overall F1."""
    paths = {s: f.require(f"coco_pope_{s}.json") for s in splits}
    f.require_dir("val2014")

    def read_split(split: str) -> list[_Rec]:
        path = paths[split]
        label = f.label(path)
        out = []
        with open(path, encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                where = f"line {n}"
                try:
                    q = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DatasetError(f"{label}: {where} is not valid JSON ({e.msg})") from None
                qid = _field(q, "question_id", label, where, "id")
                image = _field(q, "image", label, where, "text")
                text = _field(q, "text", label, where, "text")
                answer = _field(q, "label", label, where, "str").strip().lower()
                if answer not in ("yes", "no"):
                    raise DatasetError(f"{label}: {where} has an invalid field 'label' (expected 'yes' or 'no', "
                                       f"got {_short(q['label'])})")
                path_img = f.inside(image, label, where, base="val2014")
                out.append(_Rec(f"{split}-{qid}", path_img, text, [answer], {"split": split, "image": image}))
        if not out:
            raise DatasetError(f"{label}: no questions in the file")
        return out

    def records() -> list[_Rec]:
        return _interleave([read_split(s) for s in splits])

    def per_sample(item: Item, pred: str) -> dict[str, float]:
        return {"accuracy": float(metrics.parse_pope_answer(pred) == item.answers[0])}

    def aggregate(rows: list[dict]) -> dict[str, float]:
        m = metrics.pope_metrics([r["prediction"] for r in rows], [r["answers"][0] for r in rows])
        out = {"score": m["f1"], **m}
        for split in POPE_SPLITS:
            sub = [r for r in rows if r["meta"].get("split") == split]
            if sub:
                ms = metrics.pope_metrics([r["prediction"] for r in sub], [r["answers"][0] for r in sub])
                out.update({f"{k}_{split}": v for k, v in ms.items()})
        return out

    which = "random, popular and adversarial splits" if len(splits) > 1 else f"{splits[0]} split"
    return BenchTask(name, _loader(f, records, ""), per_sample, aggregate, max_new_tokens=16,
                     description=f"POPE (COCO, {which}): object hallucination yes/no questions, F1")


# ---------------------------------------------------------------------------------------------------
# MME

MME_CATEGORIES = metrics.MME_PERCEPTION + metrics.MME_COGNITION
_MME_LAYOUT = """\
  the MME_Benchmark_release_version folder (or the folder that holds it), one folder per category:
  artwork/ celebrity/ landmark/ posters/ scene/:   images/<name>.jpg + questions_answers_YN/<name>.txt
  existence/ count/ position/ color/ OCR/ commonsense_reasoning/ numerical_calculation/
  text_translation/ code_reasoning/:                <name>.png|.jpg + <name>.txt side by side
  each .txt: one "question<TAB>Yes|No" line per question (two per image)"""


def _mme(name: str, f: _Files) -> BenchTask:
    """MME (official ``MME_Benchmark_release_version`` folder; ``DIR`` may also be the folder holding it)::

        DIR/<category>/images/<name>.jpg + DIR/<category>/questions_answers_YN/<name>.txt
            (artwork, celebrity, landmark, posters, scene)
        DIR/<category>/<name>.png|.jpg + DIR/<category>/<name>.txt
            (existence, count, position, color, OCR, commonsense_reasoning, numerical_calculation,
             text_translation, code_reasoning)

    Each ``.txt`` holds lines ``question<TAB>Yes|No`` (two questions per image). The categories present
    are read (at least one); their images are interleaved so that a limited run covers every category,
    the questions of one image staying together. The question already asks for yes/no, so there is no
    instruction. Aggregate = ``metrics.mme_scores``: score = ``total`` (perception + cognition, summed
    over the categories present), also ``perception``, ``cognition``, ``accuracy`` (per question) and
    ``score_<category>`` (acc + acc+, 0..200)."""
    root = f.root
    if not any((root / c).is_dir() for c in MME_CATEGORIES) and (root / "MME_Benchmark_release_version").is_dir():
        root = root / "MME_Benchmark_release_version"
    present = [c for c in MME_CATEGORIES if (root / c).is_dir()]
    if not present:
        raise DatasetError(f"{root}: no MME category folder found (expected some of: {', '.join(MME_CATEGORIES)}); "
                           f"{f._layout()}")

    def visible(folder: Path) -> list[Path]:
        return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))

    def read_category(cat: str) -> list[list[_Rec]]:
        cdir = root / cat
        qdir = cdir / "questions_answers_YN"
        if qdir.is_dir():
            idir = cdir / "images"
            if not idir.is_dir():
                raise DatasetError(f"{idir}: folder not found (category {cat!r} has questions_answers_YN/ "
                                   f"but no images/); {f._layout()}")
        else:
            qdir = idir = cdir
        texts = [p for p in visible(qdir) if p.suffix.lower() == ".txt"]
        if not texts:
            raise DatasetError(f"{qdir}: no question files (<name>.txt) for category {cat!r}; {f._layout()}")
        images = {p.stem: p for p in visible(idir) if p.suffix.lower() in _IMAGE_EXTS}
        groups = []
        for txt in texts:
            label = f.label(txt)
            image = images.get(txt.stem)
            if image is None:
                raise DatasetError(f"{label}: no image {txt.stem}.jpg or {txt.stem}.png for it in {idir}")
            try:
                lines = txt.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise DatasetError(f"{label}: not UTF-8 text ({e.reason})") from None
            group = []
            for n, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                parts = line.rsplit("\t", 1)
                if len(parts) != 2 or not parts[0].strip():
                    raise DatasetError(f"{label}: line {n} is not 'question<TAB>answer'")
                question, answer = parts[0].strip(), parts[1].strip()
                if answer.lower() not in ("yes", "no"):
                    raise DatasetError(f"{label}: line {n} has an invalid answer {_short(answer)} (expected Yes or No)")
                group.append(_Rec(f"{cat}/{txt.stem}/{len(group) + 1}", image, question, [answer],
                                  {"category": cat, "image": f"{cat}/{image.name}"}))
            if not group:
                raise DatasetError(f"{label}: no questions in the file")
            groups.append(group)
        return groups

    def records() -> list[_Rec]:
        per_image = _interleave([read_category(c) for c in present])
        return [r for group in per_image for r in group]

    def per_sample(item: Item, pred: str) -> dict[str, float]:
        return {"accuracy": float(metrics.parse_mme_answer(pred) == item.answers[0].strip().lower())}

    def aggregate(rows: list[dict]) -> dict[str, float]:
        s = metrics.mme_scores({"category": r["meta"]["category"], "image": r["meta"]["image"],
                                "answer": r["answers"][0], "prediction": r["prediction"]} for r in rows)
        out = {"score": s["total"], "total": s["total"], "perception": s["perception"],
               "cognition": s["cognition"], "accuracy": _mean(rows, "accuracy")}
        out.update({f"score_{_slug(c)}": v["score"] for c, v in s["categories"].items()})
        return out

    return BenchTask(name, _loader(f, records, ""), per_sample, aggregate, max_new_tokens=8,
                     description="MME: yes/no perception and cognition questions, acc + acc+ per category")


# ---------------------------------------------------------------------------------------------------
# CHAIR

CHAIR_INSTANCES = "annotations/instances_val2014.json"
CHAIR_CAPTIONS = "annotations/captions_val2014.json"
_CHAIR_LAYOUT = f"""\
  {CHAIR_INSTANCES}   COCO instances: {{"images": [{{"id", "file_name"}}], "annotations": [{{"image_id",
                                        "category_id"}}], "categories": [{{"id", "name"}}]}}
  {CHAIR_CAPTIONS}    optional: {{"annotations": [{{"image_id", "caption"}}]}}
  val2014/<file_name>"""

#: Extra words for a few COCO categories (a caption word -> that category); every category name also
#: stands for itself, and ``metrics.extract_objects`` matches plurals ending in "s"/"es" on its own.
CHAIR_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("man", "men", "woman", "women", "people", "boy", "girl", "child", "children", "kid",
               "guy", "lady", "ladies", "player"),
    "bicycle": ("bike",),
    "motorcycle": ("motorbike",),
    "airplane": ("plane", "aeroplane", "jet", "aircraft"),
    "couch": ("sofa",),
    "tv": ("television",),
    "cell phone": ("phone", "cellphone", "mobile phone", "smartphone"),
    "dining table": ("table",),
    "donut": ("doughnut",),
    "hair drier": ("hair dryer", "hairdryer"),
    "potted plant": ("houseplant", "plant"),
    "sports ball": ("ball", "soccer ball", "football"),
    "handbag": ("purse",),
}


def chair_vocabulary(category_names: list[str]) -> dict[str, str]:
    """Synonym -> COCO category: each category name for itself, plus :data:`CHAIR_SYNONYMS` of the
    categories present (a synonym never overrides a category name)."""
    vocab = {n.lower(): n for n in category_names}
    for name in category_names:
        for syn in CHAIR_SYNONYMS.get(name, ()):
            vocab.setdefault(syn, name)
    return vocab


def _chair(name: str, f: _Files) -> BenchTask:
    """CHAIR object hallucination in detailed captions, on COCO val2014::

        DIR/annotations/instances_val2014.json   COCO instances (images, annotations, categories)
        DIR/annotations/captions_val2014.json    optional COCO captions
        DIR/val2014/{file_name}

    One item per image, images in increasing id order (so ``limit=n`` takes the n smallest ids), question
    "Please describe this image in detail.", no reference answers, ``meta["objects"]`` = the sorted
    ground-truth categories: those of the image's instance annotations, plus, as in the original CHAIR
    code, those mentioned in its reference captions when ``captions_val2014.json`` is there. Objects are
    found in a caption by ``metrics.extract_objects`` over the COCO category names plus the small synonym
    table :data:`CHAIR_SYNONYMS` (the original CHAIR uses a much longer list, so values are close to but
    not identical with published ones). Aggregate = ``metrics.chair_metrics``: score = ``chair_i``
    (LOWER IS BETTER), also ``chair_s`` (lower is better) and ``recall`` (higher is better)."""
    ipath = f.require(CHAIR_INSTANCES)
    f.require_dir("val2014")
    state: dict[str, Any] = {}

    def parse() -> None:
        label = f.label(ipath)
        data = f.json(ipath)
        categories = _field(data, "categories", label, "the top-level object", "list")
        names: dict[int, str] = {}
        for i, c in enumerate(categories):
            names[_field(c, "id", label, f"category {i}", "int")] = _field(c, "name", label, f"category {i}", "text")
        vocab = chair_vocabulary(list(names.values()))
        images = _field(data, "images", label, "the top-level object", "list")
        files: dict[int, str] = {}
        for i, im in enumerate(images):
            files[_field(im, "id", label, f"image {i}", "int")] = _field(im, "file_name", label, f"image {i}", "text")
        objects: dict[int, set[str]] = {image_id: set() for image_id in files}
        annotations = _field(data, "annotations", label, "the top-level object", "list")
        for i, ann in enumerate(annotations):
            where = f"annotation {i}"
            image_id = _field(ann, "image_id", label, where, "int")
            cat = _field(ann, "category_id", label, where, "int")
            if cat not in names:
                raise DatasetError(f"{label}: {where} has an unknown category_id {cat}")
            if image_id not in objects:
                raise DatasetError(f"{label}: {where} has an image_id {image_id} not listed in 'images'")
            objects[image_id].add(names[cat])
        cpath = f.root / CHAIR_CAPTIONS
        if cpath.is_file():
            clabel = f.label(cpath)
            captions = _field(f.json(cpath), "annotations", clabel, "the top-level object", "list")
            for i, cap in enumerate(captions):
                image_id = _field(cap, "image_id", clabel, f"annotation {i}", "int")
                text = _field(cap, "caption", clabel, f"annotation {i}", "str")
                if image_id in objects:
                    objects[image_id] |= metrics.extract_objects(text, vocab)
        recs = []
        for image_id in sorted(files):
            path = f.inside(files[image_id], label, f"image with id {image_id}", base="val2014")
            recs.append(_Rec(str(image_id), path, CHAIR_QUESTION, [],
                             {"image_id": image_id, "objects": sorted(objects[image_id])}))
        state["vocab"], state["records"] = vocab, recs

    def records() -> list[_Rec]:
        if "records" not in state:
            parse()
        return state["records"]

    def vocab() -> dict[str, str]:
        if "vocab" not in state:
            parse()
        return state["vocab"]

    def per_sample(item: Item, pred: str) -> dict[str, float]:
        mentioned, present = metrics.extract_objects(pred, vocab()), set(item.meta["objects"])
        m = metrics.chair_metrics([mentioned], [present])
        return {**m, "mentioned": float(len(mentioned)), "hallucinated": float(len(mentioned - present))}

    def aggregate(rows: list[dict]) -> dict[str, float]:
        words = vocab()
        m = metrics.chair_metrics([metrics.extract_objects(r["prediction"], words) for r in rows],
                                  [set(r["meta"]["objects"]) for r in rows])
        return {"score": m["chair_i"], **m}

    return BenchTask(name, _loader(f, records, ""), per_sample, aggregate, max_new_tokens=128,
                     description="CHAIR: object hallucination in detailed COCO captions, CHAIR_i (lower is better)")


# ---------------------------------------------------------------------------------------------------
# DocVQA

DOCVQA_FILE = "val_v1.0.json"
_DOCVQA_LAYOUT = f"""\
  {DOCVQA_FILE}   {{"data": [{{"questionId", "question", "image": "documents/<name>.png", "answers": [...]}}, ...]}}
  documents/<name>.png   (the "image" paths, relative to DIR)"""


def _docvqa(name: str, f: _Files) -> BenchTask:
    """DocVQA val (single-page documents)::

        DIR/val_v1.0.json   {"data": [{"questionId", "question", "image": "documents/xxx.png", "answers": [...]}]}
        DIR/documents/xxx.png   (each "image" path, relative to DIR)

    Score = ANLS (``metrics.anls``, threshold 0.5) against all answers, as ``anls``."""
    path = f.require(DOCVQA_FILE)

    def records() -> list[_Rec]:
        label = f.label(path)
        data = _field(f.json(path), "data", label, "the top-level object", "list")
        out = []
        for i, q in enumerate(data):
            where = f"entry {i}"
            qid = _field(q, "questionId", label, where, "id")
            text = _field(q, "question", label, where, "text")
            image = _field(q, "image", label, where, "text")
            answers = _field(q, "answers", label, where, "texts")
            out.append(_Rec(str(qid), f.inside(image, label, where), text, answers, {"image": image}))
        return out

    def aggregate(rows: list[dict]) -> dict[str, float]:
        value = _mean(rows, "anls")
        return {"score": value, "anls": value}

    return BenchTask(name, _loader(f, records, SHORT_ANSWER),
                     lambda item, pred: {"anls": metrics.anls(pred, item.answers)},
                     aggregate, max_new_tokens=32,
                     description="DocVQA val: questions on document images, ANLS")


# ---------------------------------------------------------------------------------------------------
# ChartQA

CHARTQA_SPLITS = ("human", "augmented")
_CHARTQA_LAYOUT = """\
  val_human.json       [{"imgname", "query", "label"}, ...]
  val_augmented.json   (same)
  png/<imgname>
  (the ChartQA test/ folder works too: test_human.json / test_augmented.json are read when the val files
  are absent)"""


def _chartqa(name: str, f: _Files, splits: tuple[str, ...] = CHARTQA_SPLITS) -> BenchTask:
    """ChartQA (the official ``val/`` folder; ``test/`` works too)::

        DIR/val_human.json       [{"imgname", "query", "label"}]
        DIR/val_augmented.json   (same)
        DIR/png/{imgname}

    ``test_human.json`` / ``test_augmented.json`` are read instead when the val files are absent.
    ``chartqa`` reads both splits (interleaved, ``meta["split"]``), ``chartqa-human`` and
    ``chartqa-augmented`` one. Item ids are ``"<split>-<index in file>"``. Score = relaxed accuracy
    (``metrics.relaxed_accuracy``, 5% tolerance on numbers) over all questions, as ``relaxed_accuracy``,
    also per split (``relaxed_accuracy_human``, ``relaxed_accuracy_augmented``)."""

    def locate(split: str) -> Path:
        for prefix in ("val", "test"):
            if (f.root / f"{prefix}_{split}.json").is_file():
                return f.root / f"{prefix}_{split}.json"
        return f.require(f"val_{split}.json")

    paths = {s: locate(s) for s in splits}
    f.require_dir("png")

    def read_split(split: str) -> list[_Rec]:
        label = f.label(paths[split])
        data = f.json(paths[split])
        if not isinstance(data, list):
            raise DatasetError(f"{label}: the top-level value is not a JSON list of questions")
        out = []
        for i, q in enumerate(data):
            where = f"entry {i}"
            image = _field(q, "imgname", label, where, "text")
            text = _field(q, "query", label, where, "text")
            answer = str(_field(q, "label", label, where, "scalar"))
            out.append(_Rec(f"{split}-{i}", f.inside(image, label, where, base="png"), text, [answer],
                            {"split": split, "image": image}))
        return out

    def records() -> list[_Rec]:
        return _interleave([read_split(s) for s in splits])

    def aggregate(rows: list[dict]) -> dict[str, float]:
        acc = _mean(rows, "relaxed_accuracy")
        return {"score": acc, "relaxed_accuracy": acc, **_mean_by(rows, "relaxed_accuracy", "split")}

    which = " and ".join(splits)
    return BenchTask(name, _loader(f, records, SHORT_ANSWER),
                     lambda item, pred: {"relaxed_accuracy": metrics.relaxed_accuracy(pred, item.answers[0])},
                     aggregate, max_new_tokens=16,
                     description=f"ChartQA ({which}): questions on charts, relaxed accuracy")


# ---------------------------------------------------------------------------------------------------
# multiple choice: ScienceQA-IMG, MMBench

def _letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def _with_options(question: str, options: list[str]) -> str:
    return question + "".join(f"\n{letter}. {option}" for letter, option in zip(_letters(len(options)), options))


def _choice_per_sample(item: Item, pred: str) -> dict[str, float]:
    return {"accuracy": float(metrics.parse_choice(pred, item.meta["n_options"]) == item.answers[0])}


def _choice_aggregate(rows: list[dict]) -> dict[str, float]:
    acc = metrics.choice_accuracy([metrics.parse_choice(r["prediction"], r["meta"]["n_options"]) for r in rows],
                                  [r["answers"][0] for r in rows])
    return {"score": acc, "accuracy": acc}


SCIENCEQA_FILE = "problems.json"
_SCIENCEQA_LAYOUT = f"""\
  {SCIENCEQA_FILE}   {{"<id>": {{"question", "choices": [...], "answer": <index>, "image": "image.png"|null,
                               "split": "train"|"val"|"test", "hint"}}, ...}}
  test/<id>/image.png   (or images/test/<id>/image.png)"""


def _scienceqa(name: str, f: _Files) -> BenchTask:
    """ScienceQA-IMG: the test questions that have an image::

        DIR/problems.json   {"<id>": {"question", "choices": [...], "answer": <index>, "image": "image.png" or
                             null, "split": "test", "hint": "..."}}
        DIR/test/<id>/image.png   (or DIR/images/test/<id>/image.png)

    Prompt as in the common LLaVA/lmms-eval format: ``"Context: <hint>\\n"`` (when the hint is not empty),
    the question, then ``"A. ...\\nB. ..."``; instruction "Answer with the option's letter from the given
    choices directly." The answer is the option letter; score = choice accuracy (``metrics.parse_choice`` +
    ``metrics.choice_accuracy``)."""
    path = f.require(SCIENCEQA_FILE)
    image_base = "test" if (f.root / "test").is_dir() or not (f.root / "images" / "test").is_dir() else "images/test"
    f.require_dir(image_base)

    def records() -> list[_Rec]:
        label = f.label(path)
        data = f.json(path)
        if not isinstance(data, dict):
            raise DatasetError(f"{label}: the top-level value is not a JSON object of problems by id")
        out = []
        for pid, p in data.items():
            where = f"problem {pid!r}"
            if _field(p, "split", label, where, "str") != "test" or not p.get("image"):
                continue
            image = _field(p, "image", label, where, "text")
            question = _field(p, "question", label, where, "text")
            choices = _field(p, "choices", label, where, "texts")
            answer = _field(p, "answer", label, where, "int")
            if not 0 <= answer < len(choices):
                raise DatasetError(f"{label}: {where} has an invalid field 'answer' ({answer} is not an index "
                                   f"into its {len(choices)} choices)")
            hint = (_optional(p, "hint", label, where, "str", "") or "").strip()
            prompt = (f"Context: {hint}\n" if hint else "") + question
            meta = {"n_options": len(choices)}
            if isinstance(p.get("subject"), str):
                meta["subject"] = p["subject"]
            out.append(_Rec(str(pid), f.inside(f"{pid}/{image}", label, where, base=image_base),
                            _with_options(prompt, choices), [_letters(len(choices))[answer]], meta))
        return out

    return BenchTask(name, _loader(f, records, LETTER_ANSWER), _choice_per_sample, _choice_aggregate,
                     max_new_tokens=8, description="ScienceQA-IMG test: multiple-choice science questions with "
                     "an image, choice accuracy")


MMBENCH_FILE = "mmbench_dev_en.tsv"
_MMBENCH_LAYOUT = f"""\
  {MMBENCH_FILE}   (or the one *.tsv in DIR, or --data pointing at the .tsv itself): tab-separated, header row
                       with columns index, question, hint, A, B, C, D, (E), answer, image (base64), category"""

# values that pandas.read_csv (used by the official loaders) reads as missing, plus LLaVA's "none"
_NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
       "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null", "none"}


def _missing(value: str | None) -> bool:
    return value is None or value.strip() in _NA or value.strip().lower() in ("nan", "none")


def _mmbench(name: str, f: _Files, tsv: Path | None = None) -> BenchTask:
    """MMBench (official TSV with base64 images)::

        DIR/mmbench_dev_en.tsv   columns: index, question, hint, A, B, C, D, (E), answer, image, category

    ``--data`` may also name the ``.tsv`` itself, or a folder with exactly one ``.tsv``. The options are the
    consecutive columns A, B, ... up to the first empty one; the prompt is as in LLaVA's MMBench
    evaluation: ``"<hint>\\n"`` (when present), the question, then ``"A. ...\\nB. ..."``; instruction
    "Answer with the option's letter from the given choices directly." An ``image`` cell of at most 64
    characters names the ``index`` of the row whose image it reuses (the official TSV convention).
    Score = plain per-question choice accuracy: the official CircularEval (every question asked once per
    rotation of its options, right only if right every time) is NOT implemented, so values are higher than
    CircularEval ones."""
    if tsv is None:
        preferred = f.root / MMBENCH_FILE
        if preferred.is_file():
            tsv = preferred
        else:
            found = sorted(p for p in f.root.glob("*.tsv") if not p.name.startswith("."))
            if len(found) != 1:
                what = "no .tsv file" if not found else f"several .tsv files ({', '.join(p.name for p in found)})"
                raise DatasetError(f"{preferred}: file not found, and {what} in {f.root} to use instead; "
                                   f"{f._layout()}")
            tsv = found[0]
    label = f.label(tsv)
    images_b64: dict[str, str] = {}

    def records() -> list[_Rec]:
        old_limit = csv.field_size_limit()
        csv.field_size_limit(max(old_limit, 1 << 30))
        try:
            with open(tsv, encoding="utf-8", newline="") as fh:
                rows = list(csv.reader(fh, delimiter="\t"))
        except UnicodeDecodeError as e:
            raise DatasetError(f"{label}: not UTF-8 text ({e.reason})") from None
        except csv.Error as e:
            raise DatasetError(f"{label}: not a valid TSV file ({e})") from None
        finally:
            csv.field_size_limit(old_limit)
        if not rows:
            raise DatasetError(f"{label}: empty file (expected a header row and one row per question)")
        header = [h.strip() for h in rows[0]]
        for col in ("index", "question", "answer", "image", "A", "B"):
            if col not in header:
                raise DatasetError(f"{label}: the header has no column {col!r} (columns: {', '.join(header)})")
        cols = {h: i for i, h in enumerate(header)}
        parsed = []
        for n, values in enumerate(rows[1:], 2):
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                raise DatasetError(f"{label}: line {n} has {len(values)} columns, the header {len(header)}")
            row = {h: values[i] for h, i in cols.items()}
            index = row["index"].strip()
            where = f"line {n} (index {index!r})"
            for col in ("index", "question", "answer", "image"):
                if _missing(row[col]):
                    raise DatasetError(f"{label}: {where} has an empty {col!r}")
            images_b64[index] = row["image"]
            parsed.append((index, where, row))
        out = []
        for index, where, row in parsed:
            options = []
            for letter in "ABCDE":
                if _missing(row.get(letter)):
                    break
                options.append(row[letter])
            if len(options) < 2:
                raise DatasetError(f"{label}: {where} has fewer than two options (columns 'A', 'B')")
            answer = row["answer"].strip().upper()
            if answer not in _letters(len(options)):
                raise DatasetError(f"{label}: {where} has an invalid 'answer' {_short(row['answer'])} "
                                   f"(expected one of {', '.join(_letters(len(options)))})")
            image_ref = row["image"].strip()
            if len(image_ref) <= 64:
                if image_ref not in images_b64:
                    raise DatasetError(f"{label}: {where} has an 'image' that is neither base64 data nor "
                                       f"the index of another row ({_short(image_ref)})")
            else:
                image_ref = index
            hint = row.get("hint")
            question = row["question"] if _missing(hint) else f"{hint}\n{row['question']}"
            meta: dict[str, Any] = {"n_options": len(options), "index": index}
            if not _missing(row.get("category")):
                meta["category"] = row["category"]
            out.append(_Rec(index, image_ref, _with_options(question, options), [answer], meta))
        return out

    def open_image(key: Hashable, item_id: str) -> Image.Image:
        try:
            raw = base64.b64decode(images_b64[key], validate=False)
            with Image.open(BytesIO(raw)) as im:
                return im.convert("RGB")
        except (binascii.Error, OSError, ValueError, Image.DecompressionBombError) as e:
            raise DatasetError(f"{label}: the image of index {item_id!r} is not a base64-encoded image ({e})") from None

    return BenchTask(name, _loader(f, records, LETTER_ANSWER, open_image), _choice_per_sample, _choice_aggregate,
                     max_new_tokens=8, description="MMBench: multiple-choice perception and reasoning, "
                     "per-question choice accuracy (no CircularEval)")


# ---------------------------------------------------------------------------------------------------
# registry


@dataclass(frozen=True)
class _Reader:
    build: Callable[..., BenchTask]
    layout: str
    what: str


REAL_TASKS: dict[str, _Reader] = {
    "vqav2": _Reader(_vqav2, _VQAV2_LAYOUT, "VQAv2 val"),
    "gqa": _Reader(_gqa, _GQA_LAYOUT, "GQA test-dev balanced"),
    "textvqa": _Reader(_textvqa, _TEXTVQA_LAYOUT, "TextVQA val"),
    "pope": _Reader(_pope, _POPE_LAYOUT, "POPE (three splits)"),
    **{f"pope-{s}": _Reader(partial(_pope, splits=(s,)), _POPE_LAYOUT, f"POPE ({s})") for s in POPE_SPLITS},
    "mme": _Reader(_mme, _MME_LAYOUT, "MME"),
    "chair": _Reader(_chair, _CHAIR_LAYOUT, "CHAIR on COCO val2014"),
    "docvqa": _Reader(_docvqa, _DOCVQA_LAYOUT, "DocVQA val"),
    "chartqa": _Reader(_chartqa, _CHARTQA_LAYOUT, "ChartQA (human + augmented)"),
    **{f"chartqa-{s}": _Reader(partial(_chartqa, splits=(s,)), _CHARTQA_LAYOUT, f"ChartQA ({s})")
       for s in CHARTQA_SPLITS},
    "scienceqa": _Reader(_scienceqa, _SCIENCEQA_LAYOUT, "ScienceQA-IMG test"),
    "mmbench": _Reader(_mmbench, _MMBENCH_LAYOUT, "MMBench"),
}


def load_task(name: str, data: str | None) -> BenchTask:
    """The real benchmark ``name`` read from the local folder ``data`` (see the module docstring and each
    reader's docstring for the files expected). Raises :class:`DatasetError` for an unknown name, a
    missing ``data``, or files that do not follow the official layout."""
    reader = REAL_TASKS.get(name)
    if reader is None:
        raise DatasetError(f"unknown task {name!r}; built-in synthetic tasks: {', '.join(sorted(TASKS))}; "
                           f"real benchmarks (read from --data DIR): {', '.join(REAL_TASKS)}")
    if data is None:
        raise DatasetError(f"task {name!r} reads {reader.what} from local files: --data DIR is required, "
                           f"a folder with this layout:\n{reader.layout}")
    path = Path(data).expanduser()
    if reader.build is _mmbench and path.is_file():
        return _mmbench(name, _Files(name, path.parent, reader.layout), tsv=path)
    if not path.exists():
        raise DatasetError(f"{path}: --data folder not found; task {name!r} expects this layout in it:\n{reader.layout}")
    if not path.is_dir():
        raise DatasetError(f"{path}: --data must be a folder for task {name!r}, with this layout:\n{reader.layout}")
    return reader.build(name, _Files(name, path, reader.layout))
