"""The benchmark harness end to end on a random-weight model with the world's tokenizer and processor."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from mmtoken.benchmarks import runner
from mmtoken.testing import save_random_world_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_random_world_model(str(tmp_path_factory.mktemp("model") / "m"))


def test_expand_methods():
    assert runner.expand_methods(["fastv:k=2,keep=0.5,0.25", "random"]) == ["none", "fastv:k=2,keep=0.5", "fastv:k=2,keep=0.25", "random"]
    assert runner.expand_methods(["tome:keep=0.5,0.25+fastv:k=1,2"]) == [
        "none", "tome:keep=0.5+fastv:k=1", "tome:keep=0.5+fastv:k=2", "tome:keep=0.25+fastv:k=1", "tome:keep=0.25+fastv:k=2"]


def _cfg(model_dir, out, **kw):
    base = dict(models=[model_dir], tasks=["synth-vqa"], methods=["fastv:keep=0.25"], out=str(out), limit=10,
                batch_size=4, speed=False, progress=False)
    base.update(kw)
    return runner.RunConfig(**base)


def test_extra_grids_run_their_own_tasks_methods_and_limit(model_dir, tmp_path):
    extra = [(model_dir, ["synth-pope"], ["random:keep=0.5"], 3)]
    summary = runner.run(_cfg(model_dir, tmp_path, methods=["none"], limit=4, extra=extra))
    got = [(r["task"], r["method"], r["n"]) for r in summary["rows"]]
    assert got == [("synth-vqa", "none", 4), ("synth-pope", "none", 3), ("synth-pope", "random:keep=0.5", 3)]
    assert "agreement" in summary["rows"][-1]["metrics"]  # compared with its own grid's uncompressed rows
    with pytest.raises(Exception, match="unknown"):
        runner.run(_cfg(model_dir, tmp_path / "bad", methods=["none"], extra=[(model_dir, ["synth-pope"], ["nosuchplugin"], 3)]))
    assert not (tmp_path / "bad" / "summary.json").exists()  # refused before any work


def test_summary_schema_and_files(model_dir, tmp_path):
    summary = runner.run(_cfg(model_dir, tmp_path, tasks=["synth-vqa", "synth-pope"], speed=True, speed_repeats=1))
    assert [r["method"] for r in summary["rows"]] == ["none", "fastv:keep=0.25"] * 2
    on_disk = json.load(open(tmp_path / "summary.json"))
    assert set(on_disk) == {"rows", "env"} and "torch" in on_disk["env"] and "command" in on_disk["env"]
    for row in on_disk["rows"]:
        for key in ["model", "task", "method", "params", "n", "metrics", "visual_tokens", "prefill_s", "oracle_prefill_s",
                    "decode_s_per_token", "peak_mem_bytes", "prefill_flops"]:
            assert key in row, key
        assert row["n"] == 10 and "score" in row["metrics"]
        if row["method"] == "none":
            assert row["oracle_prefill_s"] is None and row["visual_tokens"] == 144
        else:
            assert row["oracle_prefill_s"] > 0 and row["oracle"] == "oracle-llm:layer=2,tokens=36"
            assert 0 <= row["metrics"]["agreement"] <= 1 and row["metrics"]["kl"] >= 0
    pope = [r for r in on_disk["rows"] if r["task"] == "synth-pope"][0]["metrics"]
    assert {"accuracy", "precision", "recall", "f1", "yes_ratio"} <= set(pope)
    assert (tmp_path / "summary.csv").exists() and (tmp_path / "summary.md").exists()
    lines = open(tmp_path / "samples" / runner.slug(model_dir) / "synth-vqa" / "fastv_keep=0.25.jsonl").read().splitlines()
    assert len(lines) == 10


def _samples(out, model_dir, method="fastv_keep=0.25"):
    path = os.path.join(out, "samples", runner.slug(model_dir), "synth-vqa", f"{method}.jsonl")
    return [json.loads(l) for l in open(path)]


def test_resume_after_a_crash_loses_and_duplicates_nothing(model_dir, tmp_path):
    ref_dir = tmp_path / "ref"
    runner.run(_cfg(model_dir, ref_dir))
    ref = _samples(ref_dir, model_dir)
    crash = tmp_path / "crash"
    shutil.copytree(ref_dir, crash)
    path = os.path.join(crash, "samples", runner.slug(model_dir), "synth-vqa", "fastv_keep=0.25.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    with open(path, "w") as f:  # 4 complete lines and half of the fifth, as a crash leaves them
        f.writelines(lines[:4])
        f.write(lines[4][: len(lines[4]) // 2])
    runner.run(_cfg(model_dir, crash))
    got = _samples(crash, model_dir)
    assert [r["item_id"] for r in got] == [r["item_id"] for r in ref]
    assert [r["prediction"] for r in got] == [r["prediction"] for r in ref]


def test_killed_process_resumes(model_dir, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mmtoken", "bench", "--model", model_dir, "--task", "synth-vqa", "--method", "random:keep=0.5",
           "--limit", "40", "--batch-size", "2", "--out", str(out), "--no-speed", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = os.path.join(out, "samples", runner.slug(model_dir), "synth-vqa", "none.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and (not os.path.exists(path) or len(open(path).read().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(open(path).read().splitlines())
    assert done_before < 40
    subprocess.run(cmd, env=ENV, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    rows = _samples(out, model_dir, "none")
    ids = [r["item_id"] for r in rows]
    assert len(ids) == 40 and len(set(ids)) == 40
    summary = json.load(open(out / "summary.json"))
    assert [r["n"] for r in summary["rows"]] == [40, 40]


def test_two_processes_equal_one(model_dir, tmp_path):
    pytest.importorskip("accelerate")
    args = ["bench", "--model", model_dir, "--task", "synth-vqa", "--method", "fastv:keep=0.25", "--limit", "12",
            "--batch-size", "4", "--no-speed", "--threads", "1"]
    subprocess.run([sys.executable, "-m", "mmtoken", *args, "--out", str(tmp_path / "one")], env=ENV, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "--num_machines", "1",
                        "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "mmtoken", *args, "--out", str(tmp_path / "two")],
                       env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    one = json.load(open(tmp_path / "one" / "summary.json"))["rows"]
    two = json.load(open(tmp_path / "two" / "summary.json"))["rows"]
    for a, b in zip(one, two):  # the same answers; kl may differ in the last digits with the batch composition
        assert a["metrics"] == pytest.approx(b["metrics"], abs=1e-6)
    assert [x["n"] for x in two] == [12, 12]


def test_generated_tokens_count_each_row_up_to_its_first_eos():
    from types import SimpleNamespace

    from mmtoken.benchmarks.speed import generated_tokens

    ids = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 0, 0], [7, 7, 7, 7, 7]])
    assert generated_tokens(ids, SimpleNamespace(eos_token_id=2)) == 3 + 2 + 5
    assert generated_tokens(ids, SimpleNamespace(eos_token_id=[6, 2])) == 2 + 2 + 5
    assert generated_tokens(ids, SimpleNamespace(eos_token_id=None)) == 15


def test_exit_layer_histogram():
    rows = [{"visual_per_layer": [9, 9, 0, 0]}, {"visual_per_layer": [9, 0, 0, 0]}, {"visual_per_layer": [9, 9, 9, 9]},
            {"visual_per_layer": [9, 0, 0, 0]}, {"visual_per_layer": None}]
    assert runner.exit_layer_histogram(rows) == {"1": 2, "2": 1, "none": 1}
    assert runner.exit_layer_histogram([{"visual_per_layer": [9, 4, 4]}]) is None


def test_resuming_with_another_model_is_refused(tmp_path):
    import mmtoken
    from mmtoken.testing import save_random_world_model

    model = str(tmp_path / "m")
    save_random_world_model(model, seed=0)
    out = tmp_path / "out"
    runner.run(_cfg(model, out))
    runner.run(_cfg(model, out))  # the same model resumes
    save_random_world_model(model, seed=1)  # same name, other weights
    with pytest.raises(mmtoken.MmtokenError, match="holds samples of a different"):
        runner.run(_cfg(model, out))


def test_decode_time_is_stamped_inside_one_generate_call():
    import time

    from mmtoken.benchmarks.speed import decode_time_per_token

    calls = []

    def fake_generate(logits_processor, max_new_tokens, min_new_tokens, steps=None):
        calls.append(max_new_tokens)
        for i in range(steps or max_new_tokens):  # like generate: a forward, then the processors
            time.sleep(0.2 if i == 0 else 0.05)  # the prefill, then one decode step
            logits_processor(None, torch.zeros(1, 3))

    per_token = decode_time_per_token(fake_generate, "cpu", 4, repeats=2)
    assert calls == [5, 5, 5]  # one warm-up, two timed
    # 4 decode steps of 0.05 s after the stamp, / 4: not / 5 (0.04), not with the prefill (0.1), not 5 steps (0.0625)
    assert 0.05 <= per_token < 0.06
    with pytest.raises(RuntimeError, match="logits processors 0 times"):
        decode_time_per_token(lambda **kw: None, "cpu", 4, repeats=1)
    with pytest.raises(RuntimeError, match="2 times for 5 tokens"):  # stopped early: the span would be short
        decode_time_per_token(lambda **kw: fake_generate(**kw, steps=2), "cpu", 4, repeats=1)
    with pytest.raises(ValueError, match="repeats >= 1"):
        decode_time_per_token(fake_generate, "cpu", 4, repeats=0)
