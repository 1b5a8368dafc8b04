"""Readers of the real benchmarks: tiny fixtures in each official layout, scores computed by hand."""

import base64
import csv
import io
import json
import shutil

import pytest
from PIL import Image

from mmtoken.benchmarks import readers
from mmtoken.benchmarks.readers import DatasetError, load_task
from mmtoken.benchmarks.tasks import get_bench_task
from mmtoken.errors import MmtokenError

approx = pytest.approx
SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."


# --------------------------------------------------------------------------- fixture helpers

def image(path, colour=(200, 30, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")


def edit_json(path, change):
    obj = json.loads(path.read_text(encoding="utf-8"))
    change(obj)
    write_json(path, obj)


def rows_for(task, items, predictions):
    assert len(items) == len(predictions)
    return [{"item_id": it.id, "prediction": p, "answers": it.answers, "meta": it.meta,
             "scores": task.per_sample(it, p)} for it, p in zip(items, predictions)]


def make_vqav2(root):
    write_json(root / "v2_OpenEnded_mscoco_val2014_questions.json", {"questions": [
        {"question_id": 101, "image_id": 1, "question": "Is it red?"},
        {"question_id": 102, "image_id": 1, "question": "How many cats?"},
        {"question_id": 103, "image_id": 2, "question": "What colour is the car?"},
    ]})
    answers = {101: ["yes"] * 10, 102: ["2"] * 2 + ["3"] * 8, 103: ["red"] * 3 + ["blue"] * 7}
    types = {101: "yes/no", 102: "number", 103: "other"}
    write_json(root / "v2_mscoco_val2014_annotations.json", {"annotations": [
        {"question_id": q, "image_id": 1 if q < 103 else 2, "answer_type": types[q],
         "multiple_choice_answer": a[-1], "answers": [{"answer": x, "answer_id": i + 1} for i, x in enumerate(a)]}
        for q, a in answers.items()
    ]})
    image(root / "val2014" / "COCO_val2014_000000000001.jpg")
    image(root / "val2014" / "COCO_val2014_000000000002.jpg", (0, 0, 255))
    return root


def make_gqa(root):
    write_json(root / "testdev_balanced_questions.json", {
        "201": {"imageId": "n1", "question": "What animal is it?", "answer": "dog", "types": {}},
        "202": {"imageId": "n2", "question": "How many cars are there?", "answer": "2"},
        "203": {"imageId": "n1", "question": "Which side is the dog on?", "answer": "left"},
    })
    image(root / "images" / "n1.jpg")
    image(root / "images" / "n2.jpg")
    return root


def make_textvqa(root):
    write_json(root / "TextVQA_0.5.1_val.json", {"dataset_name": "textvqa", "data": [
        {"question_id": 34602, "image_id": "abc1", "question": "What brand is it?", "answers": ["coca cola"] * 10},
        {"question_id": 34603, "image_id": "abc2", "question": "What does the sign say?",
         "answers": ["stop"] + ["go"] * 9},
    ]})
    image(root / "train_images" / "abc1.jpg")
    image(root / "train_images" / "abc2.jpg")
    return root


def make_pope(root, splits=("random", "popular", "adversarial")):
    for s in splits:
        lines = [
            {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": f"Is there a dog in the image? ({s})",
             "label": "yes"},
            {"question_id": 2, "image": "COCO_val2014_000000000002.jpg", "text": f"Is there a cat in the image? ({s})",
             "label": "no"},
        ]
        (root / f"coco_pope_{s}.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n", encoding="utf-8")
    image(root / "val2014" / "COCO_val2014_000000000001.jpg")
    image(root / "val2014" / "COCO_val2014_000000000002.jpg")
    return root


def make_mme(root):
    base = root / "MME_Benchmark_release_version"
    # side-by-side layout
    image(base / "existence" / "e1.png")
    (base / "existence" / "e1.txt").write_text("Is there a dog? Please answer yes or no.\tYes\n"
                                               "Is there a cat? Please answer yes or no.\tNo\n", encoding="utf-8")
    image(base / "existence" / "e2.jpg")
    (base / "existence" / "e2.txt").write_text("Is there a car? Please answer yes or no.\tYes\n"
                                               "Is there a bus? Please answer yes or no.\tNo\n\n", encoding="utf-8")
    (base / "existence" / ".DS_Store").write_bytes(b"\0junk")
    (base / "existence" / "._e1.txt").write_bytes(b"\0\x05junk")
    # images/ + questions_answers_YN/ layout
    image(base / "artwork" / "images" / "a1.jpg")
    (base / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (base / "artwork" / "questions_answers_YN" / "a1.txt").write_text(
        "Is this by Monet? Please answer yes or no.\tYes\r\nIs this by Dali? Please answer yes or no.\tNo\r\n",
        encoding="utf-8")
    image(base / "code_reasoning" / "c1.png")
    (base / "code_reasoning" / "c1.txt").write_text("Does it print 3? Please answer yes or no.\tYes\n"
                                                    "Does it print 4? Please answer yes or no.\tNo\n", encoding="utf-8")
    return root


def make_chair(root, captions=True):
    write_json(root / "annotations" / "instances_val2014.json", {
        "images": [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in (3, 1, 2)],
        "categories": [{"id": 1, "name": "person"}, {"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
                       {"id": 58, "name": "hot dog"}, {"id": 67, "name": "dining table"}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1}, {"id": 11, "image_id": 1, "category_id": 18},
                        {"id": 12, "image_id": 1, "category_id": 18}, {"id": 13, "image_id": 2, "category_id": 67},
                        {"id": 14, "image_id": 2, "category_id": 58}, {"id": 15, "image_id": 3, "category_id": 17}],
    })
    if captions:
        write_json(root / "annotations" / "captions_val2014.json", {"annotations": [
            {"id": 1, "image_id": 3, "caption": "A cat sitting next to a man."},
            {"id": 2, "image_id": 1, "caption": "Two dogs playing."},
        ]})
    for i in (1, 2, 3):
        image(root / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    return root


def make_docvqa(root):
    write_json(root / "val_v1.0.json", {"dataset_name": "docvqa", "dataset_split": "val", "data": [
        {"questionId": 49153, "question": "What is the total?", "image": "documents/pxjl0001.png",
         "docId": 1, "answers": ["$1,000", "1000"]},
        {"questionId": 49154, "question": "Who signed it?", "image": "documents/pxjl0002.png",
         "docId": 2, "answers": ["John Smith"]},
    ]})
    image(root / "documents" / "pxjl0001.png")
    image(root / "documents" / "pxjl0002.png")
    return root


def make_chartqa(root):
    write_json(root / "val_human.json", [{"imgname": "h1.png", "query": "What is the peak?", "label": "12"},
                                         {"imgname": "h2.png", "query": "Is it rising?", "label": "Yes"}])
    write_json(root / "val_augmented.json", [{"imgname": "a1.png", "query": "What share is blue?", "label": "0.5"}])
    for name in ("h1", "h2", "a1"):
        image(root / "png" / f"{name}.png")
    return root


def make_scienceqa(root):
    write_json(root / "problems.json", {
        "1": {"question": "Which animal barks?", "choices": ["cat", "dog", "cow"], "answer": 1,
              "hint": "Look at the picture.", "image": "image.png", "split": "test", "subject": "natural science"},
        "2": {"question": "No image here?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": None,
              "split": "test"},
        "3": {"question": "Train split?", "choices": ["a", "b"], "answer": 0, "hint": "", "image": "image.png",
              "split": "train"},
        "4": {"question": "Is the sky blue?", "choices": ["yes", "no"], "answer": 0, "hint": "",
              "image": "image.png", "split": "test"},
    })
    image(root / "test" / "1" / "image.png")
    image(root / "test" / "4" / "image.png")
    return root


def png_base64(colour):
    buf = io.BytesIO()
    Image.new("RGB", (5, 4), colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


MMBENCH_HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source"]


def make_mmbench(root, name="mmbench_dev_en.tsv", rows=None):
    rows = rows if rows is not None else [
        ["0", 'Which shape is "round"?', "", "square", "triangle", "circle", "", "C", "shape", png_base64((255, 0, 0)), "x"],
        ["1", "What is the weather?", "Look at the sky.", "sunny", "rainy", "snowy", "foggy", "A", "scene", "0", "x"],
    ]
    root.mkdir(parents=True, exist_ok=True)
    with open(root / name, "w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(MMBENCH_HEADER)
        writer.writerows(rows)
    return root


MAKERS = {"vqav2": make_vqav2, "gqa": make_gqa, "textvqa": make_textvqa, "pope": make_pope, "mme": make_mme,
          "chair": make_chair, "docvqa": make_docvqa, "chartqa": make_chartqa, "scienceqa": make_scienceqa,
          "mmbench": make_mmbench}


# --------------------------------------------------------------------------- benchmarks

def test_every_benchmark_has_a_fixture_here():
    names = {n.split("-")[0] for n in readers.REAL_TASKS}
    assert names == set(MAKERS)


def test_vqav2(tmp_path):
    task = get_bench_task("vqav2", str(make_vqav2(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["101", "102", "103"]
    assert [it.question for it in items] == ["Is it red?", "How many cats?", "What colour is the car?"]
    assert items[1].answers == ["2"] * 2 + ["3"] * 8 and len(items[0].answers) == 10
    assert all(it.instruction == SHORT for it in items)
    assert items[0].meta["image_id"] == 1 and items[2].meta["answer_type"] == "other"
    assert items[0].image.size == (8, 6) and items[0].image.mode == "RGB"
    assert items[0].image is items[1].image  # one image, decoded once
    assert items[2].image.getpixel((0, 0))[2] > 200  # the blue image of image_id 2 (JPEG: about 255)
    assert task.max_new_tokens == 16 and task.name == "vqav2" and task.description

    rows = rows_for(task, items, ["Yes.", "two", "green"])
    # 102: 2 of 10 answers match "2" -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert [r["scores"]["accuracy"] for r in rows] == approx([1.0, 0.6, 0.0])
    agg = task.aggregate(rows)
    assert agg["score"] == agg["accuracy"] == approx(1.6 / 3)
    assert agg["accuracy_yes_no"] == 1.0 and agg["accuracy_number"] == approx(0.6) and agg["accuracy_other"] == 0.0


def test_limit_decodes_only_the_first_items(tmp_path):
    make_vqav2(tmp_path)
    (tmp_path / "val2014" / "COCO_val2014_000000000002.jpg").unlink()
    task = load_task("vqav2", str(tmp_path))
    assert [it.id for it in task.items(2)] == ["101", "102"]  # image 2 is never opened
    with pytest.raises(DatasetError, match="COCO_val2014_000000000002.jpg.*not found"):
        task.items()


def test_gqa(tmp_path):
    task = load_task("gqa", str(make_gqa(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["201", "202", "203"]
    assert [it.answers for it in items] == [["dog"], ["2"], ["left"]]
    assert items[1].question == "How many cars are there?" and items[0].meta == {"image_id": "n1"}
    assert all(it.instruction == SHORT for it in items)
    rows = rows_for(task, items, ["The dog.", "two", "right"])
    assert [r["scores"]["accuracy"] for r in rows] == [1.0, 1.0, 0.0]
    assert task.aggregate(rows) == approx({"score": 2 / 3, "accuracy": 2 / 3})


def test_textvqa(tmp_path):
    task = load_task("textvqa", str(make_textvqa(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["34602", "34603"]
    assert items[1].question == "What does the sign say?" and items[1].answers == ["stop"] + ["go"] * 9
    assert all(it.instruction == SHORT for it in items)
    rows = rows_for(task, items, ["Coca Cola", "stop"])
    # "stop" matches 1 of 10: that answer scores 0/3, the other nine 1/3 -> 0.3
    assert [r["scores"]["accuracy"] for r in rows] == approx([1.0, 0.3])
    assert task.aggregate(rows) == approx({"score": 0.65, "accuracy": 0.65})


POPE_PREDICTIONS = {  # (label yes, label no) per split
    "random": ("Yes, there is a dog.", "No."),        # TP, TN
    "popular": ("No", "Yes"),                         # FN, FP
    "adversarial": ("yes", "There is a cat."),        # TP, FP
}


def test_pope_all_splits(tmp_path):
    task = load_task("pope", str(make_pope(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["random-1", "popular-1", "adversarial-1",
                                       "random-2", "popular-2", "adversarial-2"]
    assert items[0].question == "Is there a dog in the image? (random)"
    assert all(it.instruction == "" for it in items)
    assert [it.answers for it in items] == [["yes"]] * 3 + [["no"]] * 3
    assert items[4].meta == {"split": "popular", "image": "COCO_val2014_000000000002.jpg"}
    assert [it.id for it in task.items(3)] == ["random-1", "popular-1", "adversarial-1"]

    preds = [POPE_PREDICTIONS[it.meta["split"]][0 if it.answers == ["yes"] else 1] for it in items]
    rows = rows_for(task, items, preds)
    assert [r["scores"]["accuracy"] for r in rows] == [1, 0, 1, 1, 0, 0]
    agg = task.aggregate(rows)
    # overall TP=2 FP=2 TN=1 FN=1
    assert agg["accuracy"] == approx(0.5) and agg["precision"] == approx(0.5)
    assert agg["recall"] == approx(2 / 3) and agg["yes_ratio"] == approx(4 / 6)
    assert agg["score"] == agg["f1"] == approx(4 / 7)
    assert agg["f1_random"] == 1.0 and agg["accuracy_random"] == 1.0
    assert agg["f1_popular"] == 0.0 and agg["yes_ratio_popular"] == 0.5
    assert agg["precision_adversarial"] == 0.5 and agg["recall_adversarial"] == 1.0
    assert agg["f1_adversarial"] == approx(2 / 3)


def test_pope_one_split_needs_only_its_file(tmp_path):
    task = load_task("pope-popular", str(make_pope(tmp_path, splits=("popular",))))
    items = task.items()
    assert [it.id for it in items] == ["popular-1", "popular-2"]
    agg = task.aggregate(rows_for(task, items, ["No", "Yes"]))
    assert agg["score"] == 0.0 and agg["accuracy"] == 0.0 and agg["yes_ratio"] == 0.5
    with pytest.raises(DatasetError, match="coco_pope_random.json"):
        load_task("pope", str(tmp_path))


def test_mme(tmp_path):
    make_mme(tmp_path)
    for data in (tmp_path, tmp_path / "MME_Benchmark_release_version"):  # the folder, or the one holding it
        task = load_task("mme", str(data))
        items = task.items()
        assert [it.id for it in items] == [
            "existence/e1/1", "existence/e1/2", "artwork/a1/1", "artwork/a1/2",
            "code_reasoning/c1/1", "code_reasoning/c1/2", "existence/e2/1", "existence/e2/2"]
    assert items[2].question == "Is this by Monet? Please answer yes or no."
    assert [it.answers[0] for it in items] == ["Yes", "No"] * 4
    assert items[2].meta == {"category": "artwork", "image": "artwork/a1.jpg"}
    assert items[7].meta == {"category": "existence", "image": "existence/e2.jpg"}
    assert all(it.instruction == "" for it in items)
    assert items[0].image is items[1].image

    preds = ["Yes", "No",               # existence e1: both right
             "No", "no",                # artwork a1: one right
             "Yes", "Not sure",         # code_reasoning c1: "not " starts with "no" -> both right
             "yes, there is", "Yes"]    # existence e2: one right
    rows = rows_for(task, items, preds)
    assert [r["scores"]["accuracy"] for r in rows] == [1, 1, 0, 1, 1, 1, 1, 0]
    agg = task.aggregate(rows)
    # existence: acc 75 + acc+ 50; artwork: 50 + 0; code_reasoning: 100 + 100
    assert agg["score_existence"] == approx(125) and agg["score_artwork"] == approx(50)
    assert agg["score_code_reasoning"] == approx(200)
    assert agg["perception"] == approx(175) and agg["cognition"] == approx(200)
    assert agg["score"] == agg["total"] == approx(375)
    assert agg["accuracy"] == approx(0.75)


def test_chair(tmp_path):
    task = load_task("chair", str(make_chair(tmp_path)))
    assert task.max_new_tokens == 128
    items = task.items()
    assert [it.id for it in items] == ["1", "2", "3"]  # sorted image ids
    assert all(it.question == "Please describe this image in detail." and it.answers == [] for it in items)
    assert [it.meta["objects"] for it in items] == [["dog", "person"], ["dining table", "hot dog"],
                                                    ["cat", "person"]]  # "man" in a caption of image 3
    assert items[0].meta["image_id"] == 1
    assert [it.id for it in task.items(2)] == ["1", "2"]

    preds = ["A man and two dogs on a sofa.", "A hot dog on a table next to a cat.", "A cat."]
    rows = rows_for(task, items, preds)
    assert rows[1]["scores"] == approx({"chair_s": 1.0, "chair_i": 1 / 3, "recall": 1.0,
                                        "mentioned": 3.0, "hallucinated": 1.0})
    assert rows[0]["scores"]["chair_i"] == 0.0 and rows[0]["scores"]["mentioned"] == 2.0
    agg = task.aggregate(rows)
    # mentioned 2 + 3 + 1 = 6 objects, 1 absent (cat in image 2); present 6, found 5
    assert agg == approx({"score": 1 / 6, "chair_i": 1 / 6, "chair_s": 1 / 3, "recall": 5 / 6})


def test_chair_without_captions_and_vocabulary(tmp_path):
    task = load_task("chair", str(make_chair(tmp_path, captions=False)))
    # aggregate works on saved rows before any load (it reads the vocabulary itself)
    rows = [{"item_id": "3", "prediction": "Two women and a kitten.", "answers": [], "meta": {"objects": ["cat"]},
             "scores": {}}]
    assert task.aggregate(rows) == approx({"score": 1.0, "chair_i": 1.0, "chair_s": 1.0, "recall": 0.0})
    assert task.items()[2].meta["objects"] == ["cat"]
    vocab = readers.chair_vocabulary(["person", "dining table", "couch"])
    assert vocab["people"] == "person" and vocab["table"] == "dining table" and vocab["sofa"] == "couch"
    assert "bike" not in vocab  # synonyms only for the categories present


def test_docvqa(tmp_path):
    task = load_task("docvqa", str(make_docvqa(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["49153", "49154"]
    assert items[0].answers == ["$1,000", "1000"] and items[1].question == "Who signed it?"
    assert items[0].meta == {"image": "documents/pxjl0001.png"} and items[0].instruction == SHORT
    rows = rows_for(task, items, ["$1,000", "john smyth"])
    # "john smyth" vs "john smith": 1 edit in 10 characters -> 0.9
    assert [r["scores"]["anls"] for r in rows] == approx([1.0, 0.9])
    assert task.aggregate(rows) == approx({"score": 0.95, "anls": 0.95})


def test_chartqa(tmp_path):
    task = load_task("chartqa", str(make_chartqa(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["human-0", "augmented-0", "human-1"]
    assert [it.answers for it in items] == [["12"], ["0.5"], ["Yes"]]
    assert items[1].question == "What share is blue?" and items[1].meta == {"split": "augmented", "image": "a1.png"}
    assert all(it.instruction == SHORT for it in items)
    rows = rows_for(task, items, ["12.5", "50%", "No"])  # 12.5 is within 5% of 12; 50% reads as 0.5
    assert [r["scores"]["relaxed_accuracy"] for r in rows] == [1.0, 1.0, 0.0]
    assert task.aggregate(rows) == approx({"score": 2 / 3, "relaxed_accuracy": 2 / 3,
                                           "relaxed_accuracy_human": 0.5, "relaxed_accuracy_augmented": 1.0})
    human = load_task("chartqa-human", str(tmp_path))
    assert [it.id for it in human.items()] == ["human-0", "human-1"]


def test_chartqa_test_folder(tmp_path):
    make_chartqa(tmp_path)
    for split in ("human", "augmented"):
        (tmp_path / f"val_{split}.json").rename(tmp_path / f"test_{split}.json")
    assert len(load_task("chartqa", str(tmp_path)).items()) == 3


def test_scienceqa(tmp_path):
    task = load_task("scienceqa", str(make_scienceqa(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["1", "4"]  # test split, with an image
    assert items[0].question == "Context: Look at the picture.\nWhich animal barks?\nA. cat\nB. dog\nC. cow"
    assert items[1].question == "Is the sky blue?\nA. yes\nB. no"
    assert [it.answers for it in items] == [["B"], ["A"]]
    assert items[0].meta == {"n_options": 3, "subject": "natural science"}
    assert all(it.instruction == LETTER for it in items)
    rows = rows_for(task, items, ["B", "The answer is B."])
    assert [r["scores"]["accuracy"] for r in rows] == [1.0, 0.0]
    assert task.aggregate(rows) == approx({"score": 0.5, "accuracy": 0.5})


def test_scienceqa_images_folder(tmp_path):
    make_scienceqa(tmp_path)
    (tmp_path / "images").mkdir()
    shutil.move(str(tmp_path / "test"), str(tmp_path / "images" / "test"))
    assert [it.id for it in load_task("scienceqa", str(tmp_path)).items()] == ["1", "4"]


def test_mmbench(tmp_path):
    task = load_task("mmbench", str(make_mmbench(tmp_path)))
    items = task.items()
    assert [it.id for it in items] == ["0", "1"]
    assert items[0].question == 'Which shape is "round"?\nA. square\nB. triangle\nC. circle'
    assert items[1].question == "Look at the sky.\nWhat is the weather?\nA. sunny\nB. rainy\nC. snowy\nD. foggy"
    assert [it.answers for it in items] == [["C"], ["A"]]
    assert items[0].meta == {"n_options": 3, "index": "0", "category": "shape"}
    assert all(it.instruction == LETTER for it in items)
    assert items[0].image.size == (5, 4) and items[1].image is items[0].image  # row 1 reuses row 0's image
    rows = rows_for(task, items, ["C", "(B)"])
    assert [r["scores"]["accuracy"] for r in rows] == [1.0, 0.0]
    assert task.aggregate(rows) == approx({"score": 0.5, "accuracy": 0.5})


def test_mmbench_tsv_path_or_single_tsv(tmp_path):
    make_mmbench(tmp_path, name="MMBench_DEV_EN_legacy.tsv")
    assert len(load_task("mmbench", str(tmp_path)).items()) == 2
    assert len(load_task("mmbench", str(tmp_path / "MMBench_DEV_EN_legacy.tsv")).items()) == 2
    make_mmbench(tmp_path, name="other.tsv")
    with pytest.raises(DatasetError, match="several .tsv files"):
        load_task("mmbench", str(tmp_path))


# --------------------------------------------------------------------------- validation

def test_error_class():
    assert issubclass(DatasetError, MmtokenError) and issubclass(DatasetError, ValueError)


def test_unknown_task_lists_synthetic_and_real():
    with pytest.raises(DatasetError) as e:
        get_bench_task("vqa3", "/nowhere")
    msg = str(e.value)
    assert "'vqa3'" in msg and "synth-vqa" in msg and "synth-pope" in msg
    assert all(name in msg for name in readers.REAL_TASKS)


@pytest.mark.parametrize("name", list(readers.REAL_TASKS))
def test_data_is_required(name):
    with pytest.raises(DatasetError, match="--data DIR is required"):
        load_task(name, None)


def test_data_folder_not_found(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_task("gqa", str(tmp_path / "nope"))
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(DatasetError, match="must be a folder"):
        load_task("gqa", str(tmp_path / "file.json"))


@pytest.mark.parametrize("name, missing", [
    ("vqav2", "v2_mscoco_val2014_annotations.json"),
    ("vqav2", "val2014"),
    ("gqa", "testdev_balanced_questions.json"),
    ("textvqa", "TextVQA_0.5.1_val.json"),
    ("pope", "coco_pope_adversarial.json"),
    ("chair", "annotations/instances_val2014.json"),
    ("docvqa", "val_v1.0.json"),
    ("chartqa", "val_augmented.json"),
    ("scienceqa", "problems.json"),
    ("mmbench", "mmbench_dev_en.tsv"),
])
def test_missing_file_names_path_and_layout(tmp_path, name, missing):
    MAKERS[name](tmp_path)
    target = tmp_path / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DatasetError) as e:
        load_task(name, str(tmp_path))
    msg = str(e.value)
    assert str(target) in msg and "not found" in msg
    assert f"task {name!r} expects this layout" in msg


def test_mme_without_categories(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="no MME category folder"):
        load_task("mme", str(tmp_path))


def _drop(key, index=0, container=None):
    def change(obj):
        records = obj[container] if container else obj
        record = records[index] if isinstance(records, list) else records[list(records)[index]]
        del record[key]
    return change


@pytest.mark.parametrize("name, file, change, expected", [
    ("vqav2", "v2_mscoco_val2014_annotations.json", _drop("answers", 1, "annotations"),
     "v2_mscoco_val2014_annotations.json: annotation 1 has no field 'answers'"),
    ("vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", _drop("image_id", 2, "questions"),
     "v2_OpenEnded_mscoco_val2014_questions.json: question 2 has no field 'image_id'"),
    ("vqav2", "v2_mscoco_val2014_annotations.json",
     lambda o: o["annotations"][0]["answers"][3].pop("answer"),
     "v2_mscoco_val2014_annotations.json: annotation 0, answers[3] has no field 'answer'"),
    ("vqav2", "v2_mscoco_val2014_annotations.json", lambda o: o.pop("annotations"),
     "v2_mscoco_val2014_annotations.json: the top-level object has no field 'annotations'"),
    ("vqav2", "v2_mscoco_val2014_annotations.json", lambda o: o["annotations"].pop(),
     "question 2 (question_id 103) has no annotation in v2_mscoco_val2014_annotations.json"),
    ("gqa", "testdev_balanced_questions.json", _drop("imageId", 1),
     "testdev_balanced_questions.json: question '202' has no field 'imageId'"),
    ("textvqa", "TextVQA_0.5.1_val.json", lambda o: o["data"][1].update(answers="stop"),
     "TextVQA_0.5.1_val.json: entry 1 has an invalid field 'answers' (expected a non-empty list of strings"),
    ("chair", "annotations/instances_val2014.json", _drop("category_id", 4, "annotations"),
     "annotations/instances_val2014.json: annotation 4 has no field 'category_id'"),
    ("chair", "annotations/instances_val2014.json", lambda o: o["annotations"][0].update(category_id=99),
     "annotations/instances_val2014.json: annotation 0 has an unknown category_id 99"),
    ("docvqa", "val_v1.0.json", _drop("answers", 0, "data"), "val_v1.0.json: entry 0 has no field 'answers'"),
    ("docvqa", "val_v1.0.json", lambda o: o["data"][1].update(image="../../etc/passwd"),
     "val_v1.0.json: entry 1 has an unsafe path '../../etc/passwd'"),
    ("chartqa", "val_human.json", _drop("label", 1), "val_human.json: entry 1 has no field 'label'"),
    ("scienceqa", "problems.json", _drop("choices", 3), "problems.json: problem '4' has no field 'choices'"),
    ("scienceqa", "problems.json", lambda o: o["1"].update(answer=3),
     "problems.json: problem '1' has an invalid field 'answer' (3 is not an index into its 3 choices)"),
])
def test_invalid_json_field_names_file_and_field(tmp_path, name, file, change, expected):
    MAKERS[name](tmp_path)
    edit_json(tmp_path / file, change)
    task = load_task(name, str(tmp_path))
    with pytest.raises(DatasetError) as e:
        task.items(1)
    assert expected in str(e.value)


def test_invalid_json_syntax(tmp_path):
    make_gqa(tmp_path)
    (tmp_path / "testdev_balanced_questions.json").write_text('{"201": {', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"testdev_balanced_questions.json: not valid JSON .*line 1"):
        load_task("gqa", str(tmp_path)).items()


def test_pope_invalid_lines(tmp_path):
    make_pope(tmp_path)
    path = tmp_path / "coco_pope_popular.json"
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n" + lines[1].replace('"label": "no"', '"answer": "no"') + "\n")
    with pytest.raises(DatasetError, match=r"coco_pope_popular.json: line 2 has no field 'label'"):
        load_task("pope", str(tmp_path)).items()
    path.write_text(lines[0].replace('"label": "yes"', '"label": "maybe"') + "\n")
    with pytest.raises(DatasetError, match=r"coco_pope_popular.json: line 1 has an invalid field 'label'"):
        load_task("pope-popular", str(tmp_path)).items()
    path.write_text(lines[0] + "\n{oops\n")
    with pytest.raises(DatasetError, match=r"coco_pope_popular.json: line 2 is not valid JSON"):
        load_task("pope-popular", str(tmp_path)).items()


def test_mme_invalid_files(tmp_path):
    make_mme(tmp_path)
    base = tmp_path / "MME_Benchmark_release_version"
    txt = base / "code_reasoning" / "c1.txt"
    txt.write_text("Does it print 3?  Yes\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"code_reasoning/c1.txt: line 1 is not 'question<TAB>answer'"):
        load_task("mme", str(tmp_path)).items(1)
    txt.write_text("Does it print 3?\tMaybe\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"code_reasoning/c1.txt: line 1 has an invalid answer 'Maybe'"):
        load_task("mme", str(tmp_path)).items(1)
    txt.write_text("Does it print 3?\tYes\n", encoding="utf-8")
    (base / "code_reasoning" / "c1.png").unlink()
    with pytest.raises(DatasetError, match=r"code_reasoning/c1.txt: no image c1.jpg or c1.png"):
        load_task("mme", str(tmp_path)).items(1)
    shutil.rmtree(base / "artwork" / "images")
    with pytest.raises(DatasetError, match=r"artwork/images: folder not found"):
        load_task("mme", str(tmp_path)).items(1)


def test_mmbench_invalid_rows(tmp_path):
    def row(**kw):
        values = dict(zip(MMBENCH_HEADER, ["0", "Q?", "", "a", "b", "", "", "A", "c", png_base64((0, 0, 0)), "s"]))
        values.update(kw)
        return [values[h] for h in MMBENCH_HEADER]

    make_mmbench(tmp_path, rows=[row(answer="C")])
    with pytest.raises(DatasetError, match=r"mmbench_dev_en.tsv: line 2 \(index '0'\) has an invalid 'answer' 'C'"):
        load_task("mmbench", str(tmp_path)).items()
    make_mmbench(tmp_path, rows=[row(question="")])
    with pytest.raises(DatasetError, match=r"mmbench_dev_en.tsv: line 2 \(index '0'\) has an empty 'question'"):
        load_task("mmbench", str(tmp_path)).items()
    make_mmbench(tmp_path, rows=[row(image="7")])
    with pytest.raises(DatasetError, match=r"neither base64 data nor the index of another row"):
        load_task("mmbench", str(tmp_path)).items()
    make_mmbench(tmp_path, rows=[row(image="A" * 100)])
    with pytest.raises(DatasetError, match=r"mmbench_dev_en.tsv: the image of index '0' is not a base64-encoded"):
        load_task("mmbench", str(tmp_path)).items()
    (tmp_path / "mmbench_dev_en.tsv").write_text("index\tquestion\tA\tB\timage\n0\tQ?\ta\tb\txx\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"mmbench_dev_en.tsv: the header has no column 'answer'"):
        load_task("mmbench", str(tmp_path)).items()


def test_unreadable_image(tmp_path):
    make_docvqa(tmp_path)
    (tmp_path / "documents" / "pxjl0001.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"documents/pxjl0001.png: cannot read the image of item '49153'"):
        load_task("docvqa", str(tmp_path)).items(1)
