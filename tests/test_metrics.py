"""Benchmark metrics on cases whose value is computed by hand."""

import pytest

from mmtoken.benchmarks.metrics import (
    METRICS,
    anls,
    chair_metrics,
    choice_accuracy,
    exact_match,
    extract_objects,
    levenshtein,
    mme_scores,
    normalize_vqa_answer,
    parse_choice,
    parse_mme_answer,
    parse_pope_answer,
    pope_metrics,
    relaxed_accuracy,
    vqa_accuracy,
)

approx = pytest.approx


# --------------------------------------------------------------------------- VQA

@pytest.mark.parametrize("raw, expected", [
    ("yes.", "yes"),                 # period not followed by a digit is deleted
    ("2.5", "2.5"),                  # period followed by a digit is kept
    ("1,000", "1000"),               # digit,digit present: every mark deleted
    ("red-white", "red white"),      # mark with no space beside it -> space
    ("red - white", "red white"),    # mark beside a space -> deleted, spaces collapse
    ("hello, world", "hello world"),
    ("The Dog!", "dog"),             # "!" -> " ", lower-case, article dropped
    ("Two", "2"),
    ("an apple\tand a pear\n", "apple and pear"),
    ("dont know", "don't know"),
    ("Whats that", "what's that"),
    ("isnt it", "isn't it"),
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_vqa_digit_word_against_mixed_answers():
    # "Two" -> "2"; gt: 3 x "2", 7 x "two dogs" (-> "2 dogs", no match).
    # Leaving out a "2": 2 others match -> 2/3; leaving out a "two dogs": 3 match -> 1.
    # (3 * 2/3 + 7 * 1) / 10 = (2 + 7) / 10 = 0.9
    assert vqa_accuracy("Two", ["2"] * 3 + ["two dogs"] * 7) == approx(0.9)


def test_vqa_punctuation_counts_as_match():
    # "yes." -> "yes"; all 10 answers match, each left-out subset has 9 >= 3 -> 1.0
    assert vqa_accuracy("yes.", ["yes"] * 10) == approx(1.0)
    # "Yes." against ten "no": no match anywhere -> 0.0
    assert vqa_accuracy("Yes.", ["no"] * 10) == 0.0


def test_vqa_single_match_leave_one_out():
    # 1 x "red", 9 x "blue", pred "red".
    # Leaving out the "red": 0 others match -> 0; leaving out a "blue": 1 match -> 1/3.
    # (0 + 9 * 1/3) / 10 = 3 / 10 = 0.3
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == approx(0.3)


def test_vqa_two_matches_leave_one_out():
    # 2 x "red", 8 x "blue": leaving out a "red" -> 1/3, leaving out a "blue" -> 2/3.
    # (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6 / 10 = 0.6
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == approx(0.6)


def test_vqa_not_ten_answers():
    # ["cat", "cat", "dog"], pred "cat": out "cat" -> 1/3, out "cat" -> 1/3, out "dog" -> 2/3
    # (1/3 + 1/3 + 2/3) / 3 = 4/9
    assert vqa_accuracy("cat", ["cat", "cat", "dog"]) == approx(4 / 9)
    assert vqa_accuracy("cat", []) == 0.0


# --------------------------------------------------------------------------- POPE

def test_parse_pope_answer():
    assert parse_pope_answer("Yes, there is a dog.") == "yes"
    assert parse_pope_answer("There is a dog. No doubt.") == "yes"  # only first sentence
    assert parse_pope_answer("No, there isn't.") == "no"           # "No," -> "No"
    assert parse_pope_answer("There is not a cat") == "no"
    assert parse_pope_answer("Certainly") == "yes"


def test_pope_confusion_matrix():
    preds = [
        "Yes, there is a dog.", "There is a dog in the picture. No doubt.", "Yes",  # TP
        "No, there isn't.",                                                         # FN
        "yes", "There is a cat.",                                                   # FP
        "No.", "no", "There is not a cat.", "No, there is no cat.",                 # TN
    ]
    labels = ["yes"] * 4 + ["no"] * 6
    m = pope_metrics(preds, labels)
    # TP=3 FN=1 FP=2 TN=4
    assert m["accuracy"] == approx(0.7)           # (3 + 4) / 10
    assert m["precision"] == approx(0.6)          # 3 / (3 + 2)
    assert m["recall"] == approx(0.75)            # 3 / (3 + 1)
    assert m["f1"] == approx(2 / 3)               # 2*0.6*0.75 / 1.35 = 0.9 / 1.35
    assert m["yes_ratio"] == approx(0.5)          # (3 + 2) / 10


def test_pope_zero_divisions():
    # all "no": TP=FP=FN=0, TN=3 -> accuracy 3/3, the rest guarded to 0
    m = pope_metrics(["No"] * 3, ["no"] * 3)
    assert m == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                 "yes_ratio": 0.0}
    # all "yes" on positives: TP=2 -> everything 1
    m = pope_metrics(["Yes", "yes"], ["yes", "yes"])
    assert m == {"accuracy": 1.0, "precision": 1.0, "recall": 1.0, "f1": 1.0,
                 "yes_ratio": 1.0}
    assert pope_metrics([], [])["accuracy"] == 0.0


# --------------------------------------------------------------------------- MME

def test_parse_mme_answer():
    assert parse_mme_answer("Yes.") == "yes"
    assert parse_mme_answer("no") == "no"
    assert parse_mme_answer("Not sure") == "no"          # "no" in "not "
    assert parse_mme_answer("The answer is yes") == "other"
    assert parse_mme_answer("I don't know") == "other"


def _rec(cat, image, answer, prediction):
    return {"category": cat, "image": image, "answer": answer, "prediction": prediction}


def test_mme_scores_with_half_right_image():
    records = [
        _rec("existence", "e1", "Yes", "Yes"), _rec("existence", "e1", "No", "No"),
        _rec("existence", "e2", "Yes", "yes, there is"), _rec("existence", "e2", "No", "Yes"),
        _rec("count", "c1", "Yes", "Not sure"), _rec("count", "c1", "No", "I don't know"),
        _rec("code_reasoning", "k1", "Yes", "Yes"), _rec("code_reasoning", "k1", "No", "No."),
    ]
    out = mme_scores(records)
    cats = out["categories"]
    # existence: 3 of 4 questions right -> 75; e1 fully right, e2 half -> 1/2 -> 50
    assert cats["existence"] == {"acc": approx(75.0), "acc_plus": approx(50.0),
                                 "score": approx(125.0)}
    # count: "Not sure" -> no (gt yes), "I don't know" -> other: 0/2, 0/1 -> 0
    assert cats["count"]["score"] == 0.0
    # code_reasoning: 2/2 and 1/1 -> 100 + 100
    assert cats["code_reasoning"]["score"] == approx(200.0)
    assert out["perception"] == approx(125.0)    # 125 + 0
    assert out["cognition"] == approx(200.0)
    assert out["total"] == approx(325.0)


def test_mme_unknown_category_not_summed():
    out = mme_scores([_rec("other_task", "x", "Yes", "yes"), _rec("other_task", "x", "No", "no")])
    assert out["categories"]["other_task"]["score"] == approx(200.0)
    assert out["total"] == 0.0


# --------------------------------------------------------------------------- CHAIR

def test_chair_three_captions():
    mentioned = [{"dog", "frisbee"}, {"cat"}, {"car", "person", "tree"}]
    present = [{"dog", "person"}, {"cat", "couch"}, {"car"}]
    m = chair_metrics(mentioned, present)
    # hallucinated: {frisbee}, {}, {person, tree} -> 2 of 3 captions
    assert m["chair_s"] == approx(2 / 3)
    # (1 + 0 + 2) / (2 + 1 + 3) = 3 / 6
    assert m["chair_i"] == approx(0.5)
    # present objects mentioned: dog, cat, car = 3 of (2 + 2 + 1) = 5
    assert m["recall"] == approx(0.6)


def test_chair_edge_cases():
    assert chair_metrics([], []) == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0}
    # nothing mentioned: chair_i guarded, recall 0 / 1
    assert chair_metrics([set()], [{"dog"}]) == {"chair_s": 0.0, "chair_i": 0.0, "recall": 0.0}
    # everything hallucinated: 1/1 captions, 2/2 mentions, 0/1 recall
    assert chair_metrics([{"cat", "car"}], [{"dog"}]) == {"chair_s": 1.0, "chair_i": 1.0,
                                                          "recall": 0.0}


VOCAB = {"dog": "dog", "puppy": "dog", "hot dog": "hot dog", "bus": "bus",
         "man": "person", "person": "person", "glass": "wine glass", "cell phone": "cell phone"}


def test_extract_objects():
    # dogs -> dog; man -> person; "hot dogs" -> hot dog (bigram first); buses -> bus
    assert extract_objects("Two dogs and a man eating hot dogs near buses.", VOCAB) == {
        "dog", "person", "hot dog", "bus"}
    # the bigram consumes "dog", so no plain "dog"
    assert extract_objects("A man eating a hot dog.", VOCAB) == {"person", "hot dog"}
    # glasses -> glass (strip "es"); Puppy -> dog; "cell phones" -> cell phone
    assert extract_objects("Puppy, glasses and cell phones", VOCAB) == {
        "dog", "wine glass", "cell phone"}
    assert extract_objects("A sunny beach", VOCAB) == set()


# --------------------------------------------------------------------------- ANLS

def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3   # k->s, e->i, +g
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2        # -f, +n
    assert levenshtein("same", "same") == 0


def test_anls():
    # exact after lower-casing and stripping
    assert anls("  Hello World ", ["hello world"]) == 1.0
    # one deletion in 11 chars: NL = 1/11 < 0.5 -> 10/11
    assert anls("helo world", ["hello world"]) == approx(10 / 11)
    # 3 substitutions in 3 chars: NL = 1 -> 0
    assert anls("abc", ["xyz"]) == 0.0
    # max over answers: sitting 3/7 -> 4/7, kitchen (t->c, +h) 2/7 -> 5/7
    assert anls("kitten", ["sitting", "kitchen"]) == approx(5 / 7)
    # NL exactly at the threshold: "ab" vs "ac" = 1/2 -> 0
    assert anls("ab", ["ac"]) == 0.0
    assert anls("", [""]) == 1.0


# --------------------------------------------------------------------------- ChartQA

def test_relaxed_accuracy_boundary():
    assert relaxed_accuracy("105", "100") == 1.0     # |105-100|/100 = 0.05 <= 0.05
    assert relaxed_accuracy("95", "100") == 1.0      # 5/100 = 0.05
    assert relaxed_accuracy("105.1", "100") == 0.0   # 5.1/100 = 0.051
    assert relaxed_accuracy("94.9", "100") == 0.0


def test_relaxed_accuracy_percent_zero_and_text():
    assert relaxed_accuracy("12%", "0.12") == 1.0    # 12/100 = 0.12
    assert relaxed_accuracy("12.5%", "12%") == 1.0   # |0.125-0.12|/0.12 = 0.0417
    assert relaxed_accuracy("13%", "12%") == 0.0     # 0.01/0.12 = 0.0833
    assert relaxed_accuracy("0.0", "0") == 1.0       # zero target: equality
    assert relaxed_accuracy("0.01", "0") == 0.0
    assert relaxed_accuracy(" Canada ", "canada") == 1.0
    assert relaxed_accuracy("Canada", "Canadian") == 0.0


# --------------------------------------------------------------------------- choices

@pytest.mark.parametrize("text, n, expected", [
    ("B", 4, "B"),
    ("B.", 4, "B"),
    ("(B)", 4, "B"),
    ("The answer is B", 4, "B"),
    ("The answer is (C) because", 4, "C"),
    ("I choose D.", 4, "D"),          # "I" is not an option letter
    ("E", 4, None),                   # out of range for 4 options
    ("E", 5, "E"),
    ("Because", 4, None),             # letters inside words do not count
    ("b", 4, None),                   # capital letters only
    ("", 4, None),
])
def test_parse_choice(text, n, expected):
    assert parse_choice(text, n) == expected


def test_choice_accuracy():
    # right: A, D -> 2 / 4
    assert choice_accuracy(["A", "B", None, "D"], ["A", "C", "C", "D"]) == 0.5
    assert choice_accuracy(["a"], ["A"]) == 1.0
    assert choice_accuracy([], []) == 0.0


# --------------------------------------------------------------------------- exact match

def test_exact_match():
    assert exact_match("Paris.", ["paris"]) == 1.0
    assert exact_match("  PARIS ", "paris") == 1.0
    assert exact_match("3.", ["4", "3"]) == 1.0
    assert exact_match("Lyon", ["paris", "london"]) == 0.0
    assert exact_match("3.5", ["3"]) == 0.0


def test_metrics_registry():
    assert METRICS["vqa"] is vqa_accuracy
    assert METRICS["anls"] is anls
    assert METRICS["relaxed"] is relaxed_accuracy
    assert METRICS["exact"] is exact_match
    assert METRICS["pope"] is pope_metrics and METRICS["mme"] is mme_scores
    assert METRICS["chair"] is chair_metrics and METRICS["choice"] is choice_accuracy
