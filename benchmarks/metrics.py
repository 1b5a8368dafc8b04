"""Benchmark metrics, following the official evaluators of each benchmark.

Pure Python (standard library only). Every function documents which official
definition it follows and where it deliberately departs from a quirk of that code.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Callable, Iterable, Mapping

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "parse_pope_answer",
    "pope_metrics",
    "MME_PERCEPTION",
    "MME_COGNITION",
    "parse_mme_answer",
    "mme_scores",
    "chair_metrics",
    "extract_objects",
    "levenshtein",
    "anls",
    "relaxed_accuracy",
    "parse_choice",
    "choice_accuracy",
    "exact_match",
    "METRICS",
]

# ---------------------------------------------------------------------------
# VQA (VQAv2 / TextVQA): tables from the official vqaEval.py
# ---------------------------------------------------------------------------

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't",
    "itd": "it'd", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "oclock": "o'clock", "shant": "shan't", "shouldve": "should've",
    "shouldnt": "shouldn't", "somebodys": "somebody's", "someones": "someone's",
    "thats": "that's", "thered": "there'd", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
_MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # verbatim, including its lookahead typo
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]


def _process_punctuation(text: str) -> str:
    # vqaEval.processPunctuation: a mark next to a space (or any text containing a
    # digit,digit group) is deleted, otherwise it becomes a space; then every period
    # not followed by a digit is deleted.
    out = text
    has_digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if p + " " in text or " " + p in text or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    # vqaEval.processDigitArticle: lower-case, number words -> digits, drop articles,
    # restore contractions, single spaces.
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(s: str) -> str:
    """Return ``s`` normalized as the official VQA evaluator (vqaEval.py, also used by
    TextVQA) does: newlines/tabs to spaces, strip, punctuation processing, lower-case,
    number words to digits, articles removed, contractions restored, whitespace collapsed."""
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Return the VQA accuracy of ``prediction`` in [0, 1] (official vqaEval.py).

    For each ground-truth answer i, acc_i = min(1, #{j != i : gt_j == pred} / 3); the
    result is the mean of acc_i over all i, for any number of answers (0.0 for none).
    Prediction and answers are always passed through :func:`normalize_vqa_answer`; the
    official code skips that step (comparing lower-cased raw strings) when all answers
    are identical, which would score "Yes." against ten "yes" as 0 instead of 1."""
    if not gt_answers:
        return 0.0
    pred = normalize_vqa_answer(prediction)
    matches = [normalize_vqa_answer(a) == pred for a in gt_answers]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(matches)


# ---------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------

def parse_pope_answer(text: str) -> str:
    """Return "yes" or "no" by the official POPE rule (evaluate.py): keep the text before
    the first ".", remove commas, split on spaces; "no" if the words contain "No", "no"
    or "not" (case-sensitive, as in the original), else "yes"."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(preds: list[str], labels: list[str]) -> dict[str, float]:
    """Return ``{"accuracy", "precision", "recall", "f1", "yes_ratio"}`` as fractions in
    [0, 1], following the official POPE evaluation: predictions parsed by
    :func:`parse_pope_answer`, a label is negative iff it is "no", positive class "yes".
    Zero denominators give 0.0."""
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    tp = fp = tn = fn = 0
    for pred, label in zip(preds, labels):
        p = parse_pope_answer(pred) == "yes"
        y = label.strip().lower() != "no"
        tp += p and y
        fp += p and not y
        tn += not p and not y
        fn += not p and y
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return {
        "accuracy": _div(tp + tn, len(preds)),
        "precision": precision,
        "recall": recall,
        "f1": _div(2 * precision * recall, precision + recall),
        "yes_ratio": _div(tp + fp, len(preds)),
    }


# ---------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity",
                  "scene", "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def parse_mme_answer(prediction: str) -> str:
    """Return "yes", "no" or "other" as the official MME eval (calculation.py
    ``parse_pred_ans``) does on the lower-cased, stripped prediction: exactly "yes"/"no",
    else "yes" if "yes" occurs in its first 4 characters, else "no" if "no" does, else
    "other". This accepts every answer that starts with "yes"/"no"."""
    p = prediction.lower().strip()
    if p in ("yes", "no"):
        return p
    head = p[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(records: Iterable[Mapping[str, str]]) -> dict:
    """Return MME scores (official calculation.py).

    ``records`` are dicts with ``category``, ``image``, ``answer`` ("Yes"/"No") and
    ``prediction``. Per category: ``acc`` = 100 * correct questions / questions,
    ``acc_plus`` = 100 * images whose questions are all correct / images, ``score`` =
    acc + acc_plus (0..200). Result: ``{"categories": {cat: {"acc", "acc_plus",
    "score"}}, "perception": sum of perception scores, "cognition": sum of cognition
    scores, "total": perception + cognition}``. Unknown categories are reported but
    not summed."""
    per_image: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        ok = parse_mme_answer(r["prediction"]) == r["answer"].strip().lower()
        per_image[r["category"]][r["image"]].append(ok)
    categories = {}
    for cat, images in per_image.items():
        flags = [ok for oks in images.values() for ok in oks]
        acc = 100.0 * sum(flags) / len(flags)
        acc_plus = 100.0 * sum(all(oks) for oks in images.values()) / len(images)
        categories[cat] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(v["score"] for c, v in categories.items() if c in MME_PERCEPTION)
    cognition = sum(v["score"] for c, v in categories.items() if c in MME_COGNITION)
    return {"categories": categories, "perception": perception, "cognition": cognition,
            "total": perception + cognition}


# ---------------------------------------------------------------------------
# CHAIR
# ---------------------------------------------------------------------------

def chair_metrics(mentioned: list[set[str]], present: list[set[str]]) -> dict[str, float]:
    """Return ``{"chair_s", "chair_i", "recall"}`` (CHAIR, Rohrbach et al. 2018, chair.py):
    chair_s = captions mentioning at least one absent object / captions; chair_i =
    mentioned absent objects / mentioned objects (summed over captions); recall =
    mentioned present objects / present objects. Zero denominators give 0.0."""
    if len(mentioned) != len(present):
        raise ValueError(f"{len(mentioned)} captions for {len(present)} object sets")
    halluc = [len(set(m) - set(p)) for m, p in zip(mentioned, present)]
    n_mentioned = sum(len(set(m)) for m in mentioned)
    n_present = sum(len(set(p)) for p in present)
    hit = sum(len(set(m) & set(p)) for m, p in zip(mentioned, present))
    return {
        "chair_s": _div(sum(h > 0 for h in halluc), len(mentioned)),
        "chair_i": _div(sum(halluc), n_mentioned),
        "recall": _div(hit, n_present),
    }


def _singulars(word: str) -> list[str]:
    out = [word]
    if word.endswith("es"):
        out.append(word[:-2])
    if word.endswith("s"):
        out.append(word[:-1])
    return out


def extract_objects(caption: str, vocabulary: Mapping[str, str]) -> set[str]:
    """Return the set of canonical object names mentioned in ``caption``.

    ``vocabulary`` maps synonyms (one or more words, lower case) to canonical names. The
    lower-cased caption is scanned left to right, longest phrase first (so "hot dog"
    wins over "dog"); the last word of a phrase also matches with a trailing "s"/"es"
    removed when that singular form is in the vocabulary."""
    words = re.findall(r"[a-z]+", caption.lower())
    vocab = {k.lower(): v for k, v in vocabulary.items()}
    longest = max((len(k.split()) for k in vocab), default=0)
    found: set[str] = set()
    i = 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            head, last = words[i:i + n - 1], words[i + n - 1]
            hit = next((" ".join(head + [w]) for w in _singulars(last)
                        if " ".join(head + [w]) in vocab), None)
            if hit is not None:
                found.add(vocab[hit])
                i += n
                break
        else:
            i += 1
    return found


# ---------------------------------------------------------------------------
# ANLS (DocVQA)
# ---------------------------------------------------------------------------

def levenshtein(a: str, b: str) -> int:
    """Return the edit distance (insertions, deletions, substitutions) between a and b."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def anls(prediction: str, gt_answers: list[str] | str, threshold: float = 0.5) -> float:
    """Return the ANLS score in [0, 1] of one prediction (DocVQA, Biten et al. 2019):
    max over answers of 1 - NL, NL = levenshtein / max(len) on lower-cased strings with
    whitespace stripped and collapsed (as the official DocVQA script); a value with
    NL >= threshold scores 0."""
    if isinstance(gt_answers, str):
        gt_answers = [gt_answers]
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for gt in gt_answers:
        gt = " ".join(gt.lower().split())
        length = max(len(gt), len(pred))
        nl = levenshtein(gt, pred) / length if length else 0.0
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


# ---------------------------------------------------------------------------
# ChartQA relaxed accuracy
# ---------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    try:
        if text.endswith("%"):
            return float(text[:-1]) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, target: str, tolerance: float = 0.05) -> float:
    """Return 1.0 or 0.0: ChartQA relaxed correctness (``relaxed_correctness`` of the
    Pix2Struct/ChartQA evaluation). If both strings parse as floats ("x%" reads as x/100),
    correct iff |pred - target| / |target| <= tolerance (a zero target needs equality);
    otherwise exact match after lower-casing and stripping."""
    pred, tgt = prediction.strip(), target.strip()
    p, t = _to_float(pred), _to_float(tgt)
    if p is not None and t is not None:
        ok = p == t if t == 0 else abs(p - t) / abs(t) <= tolerance
    else:
        ok = pred.lower() == tgt.lower()
    return float(ok)


# ---------------------------------------------------------------------------
# Multiple choice (ScienceQA-IMG, MMBench)
# ---------------------------------------------------------------------------

def parse_choice(prediction: str, n_options: int) -> str | None:
    """Return the option letter chosen in ``prediction``: its first capital letter among
    the first ``n_options`` letters that stands alone (no letter on either side), so
    "B", "B.", "(B)" and "The answer is B" all give "B"; None if there is none. This
    is the letter-matching step of the ScienceQA and MMBench answer extraction."""
    letters = string.ascii_uppercase[:n_options]
    if not letters:
        return None
    m = re.search(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", prediction)
    return m.group(1) if m else None


def choice_accuracy(preds: list[str | None], answers: list[str]) -> float:
    """Return the fraction of parsed option letters equal to the answer letters
    (case-insensitive); a None prediction is wrong. 0.0 for empty input."""
    if len(preds) != len(answers):
        raise ValueError(f"{len(preds)} predictions for {len(answers)} answers")
    right = sum(p is not None and p.strip().upper() == a.strip().upper()
                for p, a in zip(preds, answers))
    return _div(right, len(answers))


# ---------------------------------------------------------------------------
# Exact match
# ---------------------------------------------------------------------------

def _normalize_exact(s: str) -> str:
    s = s.strip().lower()
    if s.endswith("."):
        s = s[:-1]
    return s.strip()


def exact_match(prediction: str, answers: list[str] | str) -> float:
    """Return 1.0 if the prediction equals any answer after lower-casing, stripping and
    removing one trailing period, else 0.0."""
    if isinstance(answers, str):
        answers = [answers]
    pred = _normalize_exact(prediction)
    return float(any(pred == _normalize_exact(a) for a in answers))


METRICS: dict[str, Callable] = {
    "vqa": vqa_accuracy,
    "textvqa": vqa_accuracy,
    "pope": pope_metrics,
    "mme": mme_scores,
    "chair": chair_metrics,
    "anls": anls,
    "relaxed": relaxed_accuracy,
    "choice": choice_accuracy,
    "exact": exact_match,
}
