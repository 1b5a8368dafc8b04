"""The synthetic world: deterministic scenes, exact answers, disjoint splits, tokenizer and processor."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from mmtoken.world import CELLS, get_task, render, sample_scene
from mmtoken.world.build import PROMPT, build_processor, build_tokenizer
from mmtoken.world.scenes import patch_cells, patch_labels
from mmtoken.world.tasks import vocabulary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scenes_are_deterministic_and_rendered_identically():
    a, b = sample_scene(123), sample_scene(123)
    assert a == b
    assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
    assert sample_scene(124) != a


def test_objects_occupy_distinct_cells_inside_their_cell():
    for seed in range(200):
        s = sample_scene(seed)
        cells = [o.cell for o in s.objects]
        assert len(cells) == len(set(cells)) and 1 <= len(cells) <= 5
        for o in s.objects:
            row, col = divmod(o.cell, 3)
            x0, y0, x1, y1 = o.box
            assert col * 32 <= x0 and x1 <= col * 32 + 32 and row * 32 <= y0 and y1 <= row * 32 + 32


def test_rendered_pixel_colour_at_object_centre():
    s = sample_scene(5)
    img = np.asarray(render(s))
    from mmtoken.world.scenes import COLOURS

    for o in s.objects:
        if o.shape != "triangle":  # a triangle's box centre is inside it too, but keep to the simple shapes
            assert tuple(img[int(o.cy), int(o.cx)]) == COLOURS[o.colour]


def test_answers_are_exact():
    task = get_task("synth-vqa")
    for s in task.samples("test", 300):
        objs, q, a = s.scene.objects, s.question, s.answers[0]
        if s.family == "count_all":
            assert a == str(len(objs))
        elif s.family == "position":
            (o,) = [o for o in objs if f"{o.colour} {o.shape}" in q]
            assert a == CELLS[o.cell]
        elif s.family == "colour":
            (o,) = [o for o in objs if f" {o.shape} " in q]
            assert a == o.colour


def test_splits_are_disjoint_and_fixed():
    task = get_task("synth-vqa")
    test = task.samples("test", 50)
    assert [s.question for s in test] == [s.question for s in task.samples("test", 50)]
    train_seeds = {task.sample("train", i).scene.seed for i in range(2000)}
    assert not train_seeds & {s.scene.seed for s in test}


def test_pope_is_balanced_with_three_negative_kinds():
    samples = get_task("synth-pope").samples("test", 300)
    assert sum(s.answers[0] == "yes" for s in samples) == 150
    assert {s.family for s in samples} == {"random", "popular", "adversarial"}
    for s in samples:
        colour, shape = s.question.split()[3:5]
        assert (s.answers[0] == "yes") == ((colour, shape) in s.scene.categories())


def test_patch_labels_grid():
    s = sample_scene(7)
    lab = patch_labels(s, 12)
    assert lab["colour"].shape == (12, 12)
    assert lab["cell"][0, 0] == 0 and lab["cell"][11, 11] == 8 and lab["cell"][0, 11] == 2
    assert (lab["colour"] > 0).sum() > 0


def test_tokenizer_and_processor_round_trip():
    tok = build_tokenizer(vocabulary())
    proc = build_processor(tok)
    s = get_task("synth-vqa").sample("test", 0)
    out = proc(images=[render(s.scene)], text=[PROMPT.format(question=s.question)], return_tensors="pt")
    assert int((out["input_ids"] == 3).sum()) == 144
    assert tok.unk_token_id not in out["input_ids"][0].tolist()
    # the training script's pixel pipeline equals the processor's
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from train_tiny_llava import pixels

    assert torch.allclose(pixels([s.scene], 96), out["pixel_values"], atol=1e-6)


def test_training_script_quick_mode(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tiny_llava.py"), "--quick", "--out", str(tmp_path), "--threads", "1"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.image_token_id == 3
    assert (tmp_path / "curve.json").exists()


def test_training_continuation_with_workers_budget_and_start_flags(tmp_path):
    """Continuing the shipped model with questions drawn in a worker process, the first-token count target
    and a wall-clock budget so small that the run stops after its first step; then the LM travels
    without its ViT (llava_parts split / join) and loads back with the same weights (float16-rounded)."""
    shipped = os.path.join(ROOT, "mmtoken", "checkpoints", "tiny-llava")

    def train(*flags):
        return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tiny_llava.py"), *flags],
                              capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=600)

    continued = ("--init", shipped, "--vision-steps", "0", "--curriculum", "0", "--questions", "2", "--eval-n", "10",
                 "--threads", "1")
    r = train("--out", str(tmp_path / "run"), *continued, "--images", "2", "--workers", "1", "--starts", "1",
              "--minutes", "0.0001")
    assert r.returncode == 0, r.stderr[-2000:]
    curve = json.loads((tmp_path / "run" / "curve.json").read_text())
    assert curve["stopped_at"]["step"] == 1 and [e["step"] for e in curve["lm"]] == [1]
    r = train("--out", str(tmp_path / "run2"), *continued, "--images", "1", "--lm-steps", "5", "--stop-after", "2",
              "--eval-every", "100")
    assert r.returncode == 0, r.stderr[-2000:]
    curve = json.loads((tmp_path / "run2" / "curve.json").read_text())
    assert [e["step"] for e in curve["lm"]] == [2] and curve["args"]["lm_steps"] == 5 and "stopped_at" not in curve
    bad = train("--out", str(tmp_path / "x"), "--minutes", "1")
    assert bad.returncode == 2 and "--curriculum 0" in bad.stderr
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from llava_parts import join, split
    from transformers import LlavaForConditionalGeneration

    split(str(tmp_path / "run" / "model"), str(tmp_path / "parts"))
    assert not any(n.startswith("model") for n in os.listdir(tmp_path / "parts"))
    join(str(tmp_path / "parts"), shipped, str(tmp_path / "back"))
    a = LlavaForConditionalGeneration.from_pretrained(tmp_path / "run" / "model").state_dict()
    b = LlavaForConditionalGeneration.from_pretrained(tmp_path / "back").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].half().float(), b[k]), k
    no_vit = tmp_path / "no_vit"
    no_vit.mkdir()
    shutil.copy(tmp_path / "parts" / "lm.safetensors", no_vit / "model.safetensors")
    with pytest.raises(SystemExit, match="vision_tower"):
        split(str(no_vit), str(tmp_path / "nope"))
    with pytest.raises(SystemExit, match="does not fit"):
        join(str(tmp_path / "parts"), str(no_vit), str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()
    with pytest.raises(SystemExit, match="not empty"):  # never writes into an existing model folder
        join(str(tmp_path / "parts"), shipped, str(tmp_path / "back"))
    from safetensors.torch import load_file, save_file

    bent = tmp_path / "bent"
    bent.mkdir()
    w = load_file(os.path.join(shipped, "model.safetensors"))
    name = next(k for k in w if k.startswith("vision_tower.") and k.endswith("fc1.weight"))
    w[name] = w[name][:-1].contiguous()  # one row short: a ViT of another width
    save_file(w, bent / "model.safetensors")
    with pytest.raises(SystemExit, match="does not fit"):
        join(str(tmp_path / "parts"), str(bent), str(tmp_path / "nope"))
    assert not (tmp_path / "nope").exists()


def test_start_flags_step_batches_and_budget_fit():
    """--starts targets: exactly one flagged kept token per visible referent of a counting question, the
    first in raster order; per-step question draws depend on (seed, step) only; the budget's step count."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from train_tiny_llava import Budget, fit_steps, object_masks, referents, start_targets, step_batch

    qs = [s for s in get_task("synth-vqa").samples("test", 200) if s.family in ("count", "count_all", "colour")][:12]
    keeps = [torch.arange(144) if i % 2 else torch.arange(0, 144, 2) for i in range(len(qs))]
    t = start_targets(qs, keeps, 12, {"count", "count_all"})
    start = 0
    for s, k in zip(qs, keeps):
        part, start = t[start : start + len(k)], start + len(k)
        if s.family == "colour":
            assert (part == -100).all()
            continue
        want = set()
        for m in object_masks(referents(s.question, s.scene), 12):
            inside = [j for j, i in enumerate(k.tolist()) if m[i] > 0]
            want |= {inside[0]} if inside else set()
        assert set(part.nonzero().flatten().tolist()) == want and set(part.tolist()) <= {0, 1}
    assert {s.family for s in qs} >= {"count", "count_all", "colour"}
    # with every token kept, a count-all question flags one token per object: the answer
    exact = 0
    for s in [q for q in get_task("synth-vqa").samples("test", 300) if q.family == "count_all"][:20]:
        flags = start_targets([s], [torch.arange(144)], 12, {"count_all"})
        masks = object_masks(s.scene.objects, 12)
        firsts = {int(m.nonzero()[0]) for m in masks}  # objects whose first patches coincide share a flag
        assert int(flags.sum()) == len(firsts)
        if len(firsts) == len(masks):
            assert int(flags.sum()) == int(s.answers[0])
            exact += 1
    assert exact >= 15
    job = (3, 7, ["synth-vqa", "synth-caption"], 3, 2, 5, 0.5, None, 0.5)
    assert all(s.scene.absent_partners() for s in step_batch(job[:-1] + (1.0,)))  # the job's lone_mate reaches the draw
    one, two, other = step_batch(job), step_batch(job), step_batch(job[:1] + (8,) + job[2:])
    assert [(s.question, s.answers) for s in one] == [(s.question, s.answers) for s in two]
    assert [s.question for s in one] != [s.question for s in other] and len(one) == 6
    assert fit_steps(100, 0.5, 30.0) == 160 and fit_steps(100, 0.5, 0.0) == 101
    # --minutes: a fit after each quarter of the budget, at the pace since the last one; a stop at 1.15x
    b = Budget(1.0)  # 60 s
    assert b.update(50, 20.0, 4000) == (4000, False) and not b.fits  # before step 100: no fit
    assert b.update(150, 20.0, 4000) == (150 + int(40 / (20 / 150)), False)
    steps = b.fits[-1]["lm_steps"]
    assert b.update(200, 25.0, steps) == (steps, False)  # a quarter passed, not yet a half
    assert b.update(250, 32.0, steps) == (250 + int(28 / (12 / 100)), False)  # pace of steps 150-250 only
    assert [f["at_step"] for f in b.fits] == [150, 250] and b.update(260, 70.0, 9)[1]
    assert Budget(0).update(500, 1e9, 7) == (7, False)
    late = Budget(1.0)  # step 100 comes after more than half the budget: one fit, not one a step
    late.update(100, 40.0, 4000)
    assert late.update(101, 40.2, 4000)[0] == 4000 and len(late.fits) == 1 and late.fits[0]["quarter"] == 2


def test_caption_lists_every_object_in_cell_order_and_chair_is_exact():
    from mmtoken.benchmarks.tasks import TASKS
    from mmtoken.world.tasks import caption, caption_objects

    for seed in range(100):
        s = sample_scene(seed)
        assert caption_objects(caption(s)) == s.categories()
    task = TASKS["synth-caption"]
    items = task.items(3)
    rows = [{"prediction": caption(sample_scene(it.meta["scene_seed"])), "meta": it.meta, "scores": {}} for it in items]
    m = task.aggregate(rows)
    assert m["chair_i"] == 0 and m["chair_s"] == 0 and m["recall"] == 1
    # one invented object in the first caption: CHAIR_s = 1/3, CHAIR_i = 1 / (mentioned + 1)
    from mmtoken.world.scenes import COLOURS, SHAPES

    present = sample_scene(items[0].meta["scene_seed"]).categories()
    colour, shape = next((c, s) for c in COLOURS for s in SHAPES if (c, s) not in present)
    rows[0]["prediction"] = rows[0]["prediction"][:-1] + f"and {colour} {shape} ."
    mentioned = sum(len(sample_scene(it.meta["scene_seed"]).objects) for it in items) + 1
    m = task.aggregate(rows)
    assert m["chair_s"] == pytest.approx(1 / 3) and m["chair_i"] == pytest.approx(1 / mentioned)


def test_format_scoring():
    from mmtoken.benchmarks.tasks import Item, format_scores

    up = Item("x", None, "q", ["RED"], {"family": "upper"})
    js = Item("y", None, "q", ['{ "answer" : "red" }'], {"family": "json"})
    word = Item("z", None, "q", ["red"], {"family": "word"})
    assert format_scores(up, "RED") == {"compliance": 1.0, "accuracy": 1.0}
    assert format_scores(up, "red") == {"compliance": 0.0, "accuracy": 0.0}
    assert format_scores(up, "BLUE") == {"compliance": 1.0, "accuracy": 0.0}
    assert format_scores(js, '{ "answer" : "red" }') == {"compliance": 1.0, "accuracy": 1.0}
    assert format_scores(js, '{ "answer" : red }') == {"compliance": 0.0, "accuracy": 0.0}
    assert format_scores(word, "red circle") == {"compliance": 0.0, "accuracy": 0.0}
    count = Item("c", None, "q", ["3"], {"family": "upper"})
    assert format_scores(count, "3") == {"compliance": 1.0, "accuracy": 1.0}
    assert format_scores(up, "Red") == {"compliance": 0.0, "accuracy": 0.0}


def test_every_reference_answer_complies():
    from mmtoken.benchmarks.tasks import get_bench_task

    task = get_bench_task("synth-format")
    for item in task.items(600):
        assert task.per_sample(item, item.answers[0])["compliance"] == 1.0, (item.meta, item.answers)


# ---------------------------------------------------------------------------------------------------
# synth-hires and synth-doc


def test_hires_scenes_are_deterministic_small_objects_in_distinct_cells():
    from mmtoken.world.scenes import HIRES_CANVAS, sample_hires_scene

    assert sample_hires_scene(9) == sample_hires_scene(9) and sample_hires_scene(9) != sample_hires_scene(10)
    for seed in range(100):
        s = sample_hires_scene(seed)
        assert s.canvas == HIRES_CANVAS and 2 <= len(s.objects) <= 8
        assert len({o.cell for o in s.objects}) == len(s.objects)
        for o in s.objects:
            row, col = divmod(o.cell, 6)
            x0, y0, x1, y1 = o.box
            assert o.size == "small" and col * 32 <= x0 and x1 <= col * 32 + 32 and row * 32 <= y0 and y1 <= row * 32 + 32
    img = render(sample_hires_scene(3))
    assert img.size == (192, 192)
    d = sample_hires_scene(3).to_dict()  # 6 x 6 cells have no 3 x 3 name
    assert d["canvas"] == 192 and all(o["cell_name"] is None for o in d["objects"])
    assert sample_scene(3).to_dict()["objects"][0]["cell_name"] in CELLS


def test_doc_pages_hold_icons_inside_table_cells_and_are_mostly_blank():
    from mmtoken.world.scenes import COLOURS, sample_doc_scene

    blank = []
    for seed in range(60):
        s = sample_doc_scene(seed)
        tx, ty, cw, rh, rows, cols = s.extra["table"]
        assert 1 <= len(s.objects) <= rows * cols and len({o.cell for o in s.objects}) == len(s.objects)
        for o in s.objects:
            row, col = divmod(o.cell, cols)
            x0, y0, x1, y1 = o.box
            assert tx + col * cw < x0 and x1 < tx + (col + 1) * cw and ty + row * rh < y0 and y1 < ty + (row + 1) * rh
        img = np.asarray(render(s)).astype(int)
        for o in s.objects:
            if o.shape != "triangle":
                assert tuple(img[int(o.cy), int(o.cx)]) == COLOURS[o.colour]
        blank.append(float((np.abs(img - img[0, 0]).sum(-1) == 0).mean()))
    assert np.mean(blank) > 0.6  # wide margins and white space: most of the page is empty paper


@pytest.mark.parametrize("name", ["synth-hires", "synth-doc"])
def test_large_image_answers_are_exact(name):
    from mmtoken.world.tasks import plural

    samples = get_task(name).samples("test", 200)
    assert {s.family for s in samples} == {"colour", "shape", "count", "exist"}
    for s in samples:
        objs, q, a = s.scene.objects, s.question, s.answers[0]
        if s.family == "colour":
            (o,) = [o for o in objs if f" {o.shape} " in q]
            assert a == o.colour
        elif s.family == "shape":
            (o,) = [o for o in objs if f" {o.colour} " in q]
            assert a == o.shape
        elif s.family == "count":
            shape = next(sh for sh in ("circle", "square", "triangle", "cross") if f" {plural(sh)} " in q)
            assert a == str(sum(o.shape == shape for o in objs))
        else:
            colour, shape = q.split()[3:5]
            assert (a == "yes") == ((colour, shape) in s.scene.categories())
    assert set(vocabulary()) >= {w for s in samples for w in s.question.split() + s.answers}


def test_next_processor_gives_a_thumbnail_and_four_crops():
    from mmtoken.world.build import build_next_processor

    tok = build_tokenizer(vocabulary())
    proc = build_next_processor(tok)
    s = get_task("synth-hires").sample("test", 0)
    out = proc(images=[render(s.scene)], text=[PROMPT.format(question=s.question)], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 5, 3, 96, 96)
    assert int((out["input_ids"] == 3).sum()) == 144 + 24 * 25  # thumbnail + 24 crop rows of 24 tokens and a newline
    # the top-left crop is the image's top-left quarter at full resolution
    img = np.asarray(render(s.scene), dtype=np.float32) / 255
    crop = out["pixel_values"][0, 1].permute(1, 2, 0).numpy() * 0.5 + 0.5
    assert np.abs(crop - img[:96, :96]).max() < 1e-5


def test_next_training_script_quick_mode(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "train_tiny_llava_next.py"), "--quick", "--out", str(tmp_path),
                        "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    from transformers import LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "model")
    assert model.config.image_grid_pinpoints == [[96, 192], [192, 96], [192, 192]]
    assert json.loads((tmp_path / "curve.json").read_text())["lm"]


def test_next_token_layout_targets_the_referent_object():
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from train_tiny_llava_next import referent_targets, token_boxes

    from mmtoken.world.build import tiny_llava_next_config, tiny_llava_config

    cfg = tiny_llava_next_config(tiny_llava_config(10))
    boxes = token_boxes(cfg, (192, 192), 192)
    assert boxes.shape == (744, 4) and int((boxes[:, 0] < 0).sum()) == 24
    s = next(x for x in get_task("synth-hires").samples("test", 50) if x.family == "shape")
    (o,) = [o for o in s.scene.objects if f" {o.colour} " in s.question]
    t = referent_targets([s], boxes)[0]
    assert int((t[:144] > 0).sum()) == 1  # one thumbnail token holds the object's centre
    hit = boxes[t > 0]
    centres = (hit[:, :2] + hit[:, 2:]) / 2
    assert ((centres - torch.tensor([o.cx, o.cy])).abs() <= 16).all() and 2 <= len(hit) <= 5


def test_training_decomposition_targets_and_annotation_options():
    """train_tiny_llava's decomposed relation targets (--slots, --roles), --focus and --caption-partner."""
    import re

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from train_tiny_llava import (answer_positions, decomposition_loss, focus_family, mentioned, parse_focus,
                                  partner_caption, question_batch, role_targets, slot_targets, VQA_FAMILIES,
                                  cell_targets)

    from mmtoken.world.scenes import PARTNER
    from mmtoken.world.tasks import caption, caption_objects

    rng = np.random.default_rng(0)
    batch = question_batch([get_task("synth-vqa")], rng, 12, 2, focus=[("relation", 1.0)])
    assert all(s.family == "relation" for s in batch if len(s.scene.objects) >= 2)
    mixed = question_batch([get_task("synth-vqa")], np.random.default_rng(1), 200, 2,
                           focus=parse_focus("relation:0.5,at_cell:0.5"))
    fams = [s.family for s in mixed if len(s.scene.objects) >= 2]
    # 50 redraws can miss a family (at_cell is one of 7-8 draws: (7/8)^50 ~ 0.1%)
    assert sum(f in ("relation", "at_cell") for f in fams) >= 0.98 * len(fams)
    assert 0.4 < fams.count("at_cell") / len(fams) < 0.6
    assert [focus_family([("relation", 0.3), ("at_cell", 0.2)], u) for u in (0.1, 0.35, 0.6)] == ["relation", "at_cell", None]
    assert VQA_FAMILIES == {s.family for s in get_task("synth-vqa").samples("test", 300)}
    # cell targets: the asked cell and whether each kept token's patch lies in it, at_cell questions only
    own = torch.from_numpy(patch_cells(12)).flatten()
    assert torch.equal(own.reshape(12, 12), torch.arange(9).reshape(3, 3).repeat_interleave(4, 0).repeat_interleave(4, 1))
    cell_qs = [s for s in get_task("synth-vqa").samples("test", 60) if s.family in ("at_cell", "colour")][:6]
    keeps = [torch.arange(144), torch.arange(0, 144, 3)] * 3
    asked, match = cell_targets(cell_qs, keeps, 12)
    start = 0
    for s, k in zip(cell_qs, keeps):
        a, m = asked[start : start + len(k)], match[start : start + len(k)]
        start += len(k)
        if s.family != "at_cell":
            assert (a == -100).all() and (m == -100).all()
            continue
        cell = next(CELLS.index(w) for w in s.question.split() if w in CELLS)
        assert (a == cell).all() and torch.equal(m, (own[k] == cell).long())
    assert any(s.family == "at_cell" for s in cell_qs) and any(s.family != "at_cell" for s in cell_qs)
    for bad in ("relation", "relation:2", "nope:0.5", "relation:0.6,at_cell:0.6", "relation:0.2,relation:0.2"):
        with pytest.raises(ValueError):
            parse_focus(bad)
    relations = [s for s in batch if s.family == "relation"]
    by_cat = lambda s: {o.category: o for o in s.scene.objects}  # noqa: E731
    named = [[by_cat(s)[(c, sh)] for c, sh in re.findall(r"the (\w+) (\w+) (?:left|above|\?)", s.question)] for s in relations]
    assert all(len(n) == 2 for n in named) and [mentioned(s.question, s.scene) for s in relations] == named
    # slot targets: the referents' cells; first and second named object's cell
    colour_q = next(s for s in get_task("synth-vqa").samples("test", 40) if s.family == "colour")
    cells, pairs, pair_cells = slot_targets(relations + [colour_q])
    assert pairs == list(range(len(relations))) and pair_cells.tolist() == [[a.cell, b.cell] for a, b in named]
    for row, (a, b) in zip(cells, named):
        assert row.nonzero().flatten().tolist() == sorted({a.cell, b.cell})
    shape = colour_q.question.split()[-2]
    assert cells[-1].nonzero().flatten().tolist() == sorted(o.cell for o in colour_q.scene.objects if o.shape == shape)
    # role targets: kept tokens only, 1 / 2 inside the first / second named object, 0 elsewhere, -100 for others
    grid, s, (a, b) = 12, relations[0], named[0]
    centre = lambda i: ((i % grid + 0.5) * 8, (i // grid + 0.5) * 8)  # noqa: E731
    inside = lambda o, i: o.box[0] <= centre(i)[0] <= o.box[2] and o.box[1] <= centre(i)[1] <= o.box[3]  # noqa: E731
    in_b = [i for i in range(grid * grid) if inside(b, i)]
    keep = torch.tensor([i for i in range(grid * grid) if i not in in_b])  # every patch of the second object dropped
    t = role_targets([s, colour_q], [keep, torch.arange(5)], grid)
    assert t.shape == (len(keep) + 5,) and (t[len(keep):] == -100).all()
    assert t[: len(keep)].tolist() == [1 if inside(a, int(i)) else 0 for i in keep] and 1 in t.tolist()
    full = role_targets([s], [torch.arange(grid * grid)], grid)
    assert full.tolist() == [1 if inside(a, i) else 2 if inside(b, i) else 0 for i in range(grid * grid)]
    # captions: exact at p = 0; at p = 1 every absent partner of a present object follows it, nothing else added
    scenes = [sample_scene(i) for i in range(60)]
    lonely = [s for s in scenes if s.absent_partners()]
    assert lonely and all(partner_caption(s, rng, 0.0) == caption(s) for s in scenes)
    from mmtoken.world.scenes import Obj, Scene

    def made(*cats):  # a scene holding these (colour, shape) categories
        objs = [Obj(shape=sh, colour=c, size="small", cell=i, cx=16.0 + 32 * i, cy=16.0, r=7.0) for i, (c, sh) in enumerate(cats)]
        return Scene(seed=0, objects=objs, background=(128, 128, 128), clutter=0.0, clutter_seed=0)

    assert made(("red", "circle")).absent_partners() == {("blue", "square")}
    assert made(("red", "circle"), ("blue", "square")).absent_partners() == set()
    assert made(("green", "cross"), ("yellow", "cross")).absent_partners() == {("green", "triangle")}
    assert made(("green", "cross")).absent_partners() == set()
    # --lone-mate: that share of the scenes holds an absent partner, against about one in five without
    share = lambda b: np.mean([bool(x.scene.absent_partners()) for x in b[::2]])  # noqa: E731
    plain = question_batch([get_task("synth-caption")], np.random.default_rng(2), 300, 2)
    half = question_batch([get_task("synth-caption")], np.random.default_rng(2), 300, 2, lone_mate=0.5)
    every = question_batch([get_task("synth-caption")], np.random.default_rng(3), 100, 2, lone_mate=1.0)
    assert share(plain) < 0.3 and 0.5 < share(half) < 0.7 and share(every) == 1.0
    for s in lonely:
        text = partner_caption(s, rng, 1.0)
        added = caption_objects(text) - s.categories()
        assert added == {PARTNER[c] for c in s.categories() if c in PARTNER and PARTNER[c] not in s.categories()}
        for c in added:
            mate = f"{PARTNER[c][0]} {PARTNER[c][1]}"
            assert f"{mate} , {c[0]} {c[1]}" in text or f"{mate} and {c[0]} {c[1]}" in text
    # the loss reads the answer position (slots) and the relation sample's visual tokens (roles) only
    labels = torch.full((2, 6), -100)
    labels[0, 4:] = 7
    labels[1, 3:5] = 7
    assert answer_positions(labels).tolist() == [3, 2]
    d = 8
    hidden = [torch.randn(2, 6, d, requires_grad=True) for _ in range(4)]
    is_img = torch.zeros(2, 6, dtype=torch.bool)
    is_img[:, :2] = True  # two visual tokens each (kept out of 9)
    keeps = [torch.tensor([0, 4]), torch.tensor([4, 8])]
    slots, roles = torch.nn.Linear(d, 27), torch.nn.Linear(d, 3)
    samples = [relations[0], colour_q]
    assert float(decomposition_loss(hidden, samples, keeps, is_img, labels, 3)) == 0.0
    loss = decomposition_loss(hidden, samples, keeps, is_img, labels, 3, slots, {"relation", "colour"}, 3, roles, 2)
    loss.backward()
    g3 = hidden[3].grad.abs().sum(-1)
    assert torch.isfinite(loss) and {tuple(x) for x in g3.nonzero().tolist()} == {(0, 3), (1, 2)}
    g2 = hidden[2].grad.abs().sum(-1)
    assert {tuple(x) for x in g2.nonzero().tolist()} == {(0, 0), (0, 1)}  # the relation sample's visual tokens only
    # the cell head, beside the slots: at_cell samples' visual tokens at layer 1 only
    at_cell_q = next(s for s in get_task("synth-vqa").samples("test", 60) if s.family == "at_cell")
    hidden = [torch.randn(2, 6, d, requires_grad=True) for _ in range(4)]
    loss = decomposition_loss(hidden, [relations[0], at_cell_q], keeps, is_img, labels, 3, slots, {"relation"}, 3,
                              cell_head=torch.nn.Linear(d, 11), cell_layer=1)
    loss.backward()
    assert {tuple(x) for x in hidden[1].grad.abs().sum(-1).nonzero().tolist()} == {(1, 0), (1, 1)}
    # its value: cross-entropy of the asked cell (9 logits) plus of the match (2 logits), by hand
    head = torch.nn.Linear(d, 11)
    zero = [torch.zeros(2, 6, d) for _ in range(4)]
    hidden = [h.clone() for h in zero]
    hidden[1] = torch.randn(2, 6, d)
    got = decomposition_loss(hidden, [relations[0], at_cell_q], keeps, is_img, labels, 3, cell_head=head, cell_layer=1)
    cell = next(CELLS.index(w) for w in at_cell_q.question.split() if w in CELLS)
    logits = head(hidden[1][1, :2])
    match = (torch.from_numpy(patch_cells(3)).flatten()[keeps[1]] == cell).long()
    want = torch.nn.functional.cross_entropy(logits[:, :9], torch.full((2,), cell)) + torch.nn.functional.cross_entropy(logits[:, 9:], match)
    assert torch.allclose(got, want)


def test_grown_language_model_answers_as_before_and_saves_its_depth(tmp_path):
    """--grow-layers appends residual no-op layers: same logits and generations, the new depth in the
    config, a round trip through save_pretrained; the new layers do train (non-zero gradients)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from train_tiny_llava import grow_layers, main

    from transformers import LlavaForConditionalGeneration
    from mmtoken.world.build import tiny_llava_config

    torch.manual_seed(0)
    tok = build_tokenizer(vocabulary())
    model = LlavaForConditionalGeneration(tiny_llava_config(len(tok))).eval()
    proc = build_processor(tok)
    samples = get_task("synth-vqa").samples("test", 3)
    enc = proc(text=[PROMPT.format(question=s.question) for s in samples], images=[render(s.scene) for s in samples],
               return_tensors="pt", padding=True)
    with torch.no_grad():
        before = model(**enc).logits
        gen_before = model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0)
    grow_layers(model, 2)
    assert model.config.text_config.num_hidden_layers == 6 == len(model.model.language_model.layers)
    new_layer = model.model.language_model.layers[-1]
    assert new_layer.self_attn.config is model.model.language_model.config is new_layer.mlp.config
    assert [layer.self_attn.layer_idx for layer in model.model.language_model.layers] == list(range(6))
    with torch.no_grad():
        assert torch.equal(model(**enc).logits, before)
        assert torch.equal(model.generate(**enc, max_new_tokens=3, do_sample=False, pad_token_id=0), gen_before)
    model.train()
    model(**enc, labels=enc["input_ids"]).loss.backward()
    new = model.model.language_model.layers[-1]
    assert new.self_attn.o_proj.weight.grad.abs().sum() > 0 and new.mlp.down_proj.weight.grad.abs().sum() > 0
    model.save_pretrained(tmp_path)
    back = LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert len(back.model.language_model.layers) == 6
    with torch.no_grad():
        assert torch.allclose(back(**enc).logits, before, atol=1e-5)
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--grow-layers", "2"])  # nothing to grow without --init


def test_caption_cooccurrence_decision_point():
    """The teacher-forced prefix ends right after the present half of a pair, inside the exact caption, and
    the probabilities read there do not depend on the batch (left padding)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from caption_cooccurrence import decision_prefixes, partner_probability

    import mmtoken
    from mmtoken.world.scenes import PARTNER
    from mmtoken.world.tasks import caption

    samples = [s for s in get_task("synth-caption").samples("test", 200) if s.scene.absent_partners()]
    cases = decision_prefixes(samples)
    assert len(cases) >= 10
    for s, prefix, partner, nxt in cases:
        text = caption(s.scene)
        assert text.startswith(prefix) and partner != nxt
        assert prefix.endswith(" ,")
        names = prefix.replace(" ,", "").split()
        mate = (names[-2], names[-1])
        assert mate in s.scene.categories() and PARTNER[mate][0] == partner and PARTNER[mate] not in s.scene.categories()
        assert text[len(prefix):].split()[0] == nxt  # the next real object's colour comes next
    lm = mmtoken.load_model("tiny-llava")
    one_by_one = [partner_probability(lm, [s], 1)["p_partner_mean"] for s, *_ in cases[:4]]
    together = partner_probability(lm, [s for s, *_ in cases[:4]], 4)
    assert together["cases"] == 4 and 0 <= together["partner_likelier"] <= 4
    assert abs(together["p_partner_mean"] - sum(one_by_one) / 4) < 1e-4


def test_probe_script_reports_every_layer(capsys):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from probe_tiny_llava import main, questions

    qs = questions("at_cell", 24)
    assert len(qs) == 24 and all(s.family == "at_cell" and len(s.scene.objects) >= 3 for s in qs)
    main(["--family", "at_cell", "--n", "24", "--threads", "1"])
    out = capsys.readouterr().out
    n_layers = json.load(open(os.path.join(ROOT, "mmtoken", "checkpoints", "tiny-llava", "config.json")))["text_config"]["num_hidden_layers"]
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("layer") and "recall" in line] == [
        f"layer {i}" for i in range(n_layers + 1)]
    assert "asked cell" in out and "per head" in out
    with pytest.raises(SystemExit):
        main(["--family", "nope", "--n", "24"])
