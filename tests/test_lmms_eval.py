"""The lmms-eval model: a local lmms-eval task run on a patched tiny-llava gives the harness's answers."""

import json

import pytest
import torch

lmms_eval = pytest.importorskip("lmms_eval", reason="lmms-eval is installed by the README's test command")

YAML = """task: synth_vqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: data.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

UTILS = '''import os
from PIL import Image

_DIR = os.path.dirname(os.path.abspath(__file__))


def doc_to_visual(doc):
    return [Image.open(os.path.join(_DIR, doc["image"])).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    words = results[0].strip().split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}
'''


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    """synth-vqa's first 12 held-out samples as an lmms-eval task read from local files."""
    from mmtoken.benchmarks.tasks import TASKS

    root = tmp_path_factory.mktemp("lmms_tasks")
    folder = root / "synth_vqa_local"
    (folder / "images").mkdir(parents=True)
    items = TASKS["synth-vqa"].items(12)
    with open(folder / "data.jsonl", "w") as f:
        for i, it in enumerate(items):
            it.image.save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"image": f"images/{i}.png", "question": it.question, "answer": it.answers[0]}) + "\n")
    (folder / "synth_vqa_local.yaml").write_text(YAML)
    (folder / "utils.py").write_text(UTILS)
    return str(root), items


def _evaluate(root, model_args, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.tasks import TaskManager

    from mmtoken.lmms_eval import manifest

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    MODEL_REGISTRY_V2.register_manifest(manifest(), overwrite=True)
    tm = TaskManager("WARNING", include_path=root, include_defaults=False)
    res = simple_evaluate(model="mmtoken", model_args=model_args, tasks=["synth_vqa_local"], task_manager=tm,
                          batch_size=4, log_samples=True, verbosity="WARNING")
    return res


@pytest.mark.parametrize("method", ["none", "random:keep=0.5;seed=3"])
def test_lmms_eval_answers_equal_the_harness(local_task, method, monkeypatch):
    import mmtoken
    from mmtoken.benchmarks.runner import answer_batch

    root, items = local_task
    res = _evaluate(root, f"pretrained=tiny-llava,method={method}", monkeypatch)
    got = {s["doc_id"]: s["filtered_resps"][0] for s in res["samples"]["synth_vqa_local"]}
    lm = mmtoken.load_model("tiny-llava")
    spec = method.replace(";", ",")
    handle = mmtoken.apply(lm.model, spec) if spec != "none" else None
    try:
        want, _, _ = answer_batch(lm, items, 3, "cpu")
    finally:
        if handle is not None:
            handle.remove()
    assert [got[i].split()[0] if got[i] else "" for i in range(len(items))] == [w.split()[0] if w else "" for w in want]
    accuracy = sum(w.split()[0] == it.answers[0] for w, it in zip(want, items) if w) / len(items)
    assert res["results"]["synth_vqa_local"]["exact_match,none"] == pytest.approx(accuracy)


def test_loglikelihood_scores_the_continuation(local_task):
    from lmms_eval.api.instance import Instance

    from mmtoken.lmms_eval import MmtokenLMMS

    root, items = local_task
    model = MmtokenLMMS(pretrained="tiny-llava")
    docs = [{"image": it.image} for it in items[:2]]
    model.task_dict = {"t": {"test": docs}}
    reqs, greedy_answers = [], []
    for i, it in enumerate(items[:2]):
        enc = model._inputs([it.question], [it.image])
        with torch.inference_mode():
            top = model.lm.model(**enc).logits[0, -1].argmax().item()
        greedy_answers.append(model.tokenizer.convert_ids_to_tokens(top))
        for cont in (greedy_answers[-1], "purple" if greedy_answers[-1] != "purple" else "red"):
            reqs.append(Instance("loglikelihood", (it.question, cont, lambda d: [d["image"]], i, "t", "test"), idx=len(reqs),
                                 metadata={"task": "t", "doc_id": i, "repeats": 1}))
    out = model.loglikelihood(reqs)
    for k in range(2):
        (lp_greedy, is_greedy), (lp_other, other_greedy) = out[2 * k], out[2 * k + 1]
        assert is_greedy and not other_greedy and lp_greedy > lp_other and lp_greedy <= 0


def test_unknown_model_args_are_refused():
    from mmtoken.errors import MmtokenError
    from mmtoken.lmms_eval import MmtokenLMMS

    with pytest.raises(MmtokenError, match="unknown model_args.*methd"):
        MmtokenLMMS(pretrained="tiny-llava", methd="fastv")


def test_installed_package_declares_the_entry_point():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="lmms_eval.models")}
    assert eps.get("mmtoken") == "mmtoken.lmms_eval:manifest"
