"""Train ``tiny-llava`` on the synthetic world, on the CPU, from scratch and reproducibly.

Stage 1 (vision): a CLIP-config ViT learns dense per-patch targets (colour, shape, size of the object under
each patch, and the patch's layout cell) on its feature layer, and the categories present in the scene
from its CLS token (which trains the CLS attention that many plugins read).
Stage 2 (language): with the ViT frozen, the projector and a LLaMA-config LM learn to answer synth-vqa and
synth-pope questions; the question comes before the image (``mmtoken.world.build.PROMPT``) so that image
tokens can attend to it. The loss is on the answer and ``</s>``.

    python scripts/train_tiny_llava.py --out runs/tiny-llava            # full recipe
    python scripts/train_tiny_llava.py --quick --out /tmp/tl             # a few steps: checks the script

Writes ``OUT/model`` (safetensors + config + tokenizer + processor), ``OUT/curve.json`` (held-out accuracy
over steps, wall time) and checkpoints as it goes; ``--init OUT/model`` continues from the last one.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.world import COLOURS, SHAPES, get_task, render_batch  # noqa: E402
from mmtoken.world.build import PROMPT, build_processor, build_tokenizer, tiny_llava_config, write_world_card  # noqa: E402
from mmtoken.world.scenes import patch_cells, patch_labels, sample_scene  # noqa: E402
from mmtoken.world.tasks import vocabulary  # noqa: E402

CATS = [(c, s) for c in COLOURS for s in SHAPES]


def pixels(scenes, size: int) -> torch.Tensor:
    return render_batch(scenes, size).sub(0.5).div(0.5)


class VisionHeads(torch.nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.colour = torch.nn.Linear(d, 1 + len(COLOURS))
        self.shape = torch.nn.Linear(d, 1 + len(SHAPES))
        self.size = torch.nn.Linear(d, 3)
        self.cell = torch.nn.Linear(d, 9)
        self.cats = torch.nn.Linear(d, len(CATS))


def vision_step(model, heads, seeds, grid, size):
    dev = model.device
    scenes = [sample_scene(int(s)) for s in seeds]
    pv = pixels(scenes, size).to(dev)
    out = model.model.vision_tower(pv, output_hidden_states=True)
    feat = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    labels = [patch_labels(s, grid) for s in scenes]
    loss = 0.0
    accs = {}
    for name in ("colour", "shape", "size", "cell"):
        y = torch.from_numpy(np.stack([lab[name].reshape(-1) for lab in labels])).to(dev)
        logits = getattr(heads, name)(feat)
        loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        obj = y > 0 if name != "cell" else torch.ones_like(y, dtype=torch.bool)
        accs[name] = (logits.argmax(-1)[obj] == y[obj]).float().mean().item()
    present = torch.tensor([[float(c in s.categories()) for c in CATS] for s in scenes], device=dev)
    cls_logits = heads.cats(out.pooler_output)
    loss = loss + F.binary_cross_entropy_with_logits(cls_logits, present)
    accs["cats"] = ((cls_logits > 0).float() == present).all(-1).float().mean().item()
    return loss, accs


def encode_samples(tok, samples, n_img):
    """Right-padded ids, labels (answer + </s>) and mask for training; ``n_img``: image tokens per sample
    (one int for all, or a list)."""
    rows, labels = [], []
    counts = n_img if isinstance(n_img, (list, tuple)) else [n_img] * len(samples)
    for s, k in zip(samples, counts):
        prompt = PROMPT.format(question=s.question).replace("<image>", " ".join(["<image>"] * k))
        ids = tok(prompt, add_special_tokens=False)["input_ids"]
        ans = tok(s.answers[0], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append(ids + ans)
        labels.append([-100] * len(ids) + ans)
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(r)] = 1
    return ids, lab, mask


def drop_tokens(rng, counts: list[int], drop: float, min_keep: float) -> list[torch.Tensor]:
    """Token-drop augmentation: per sample (``counts``: its visual tokens), the visual tokens it keeps
    (sorted). With probability ``drop`` a random subset whose share is uniform in [``min_keep``, 1], else
    all of them. Kept tokens are really removed from the sequence (positions compacted), as a
    `visual`-stage compression plugin does."""
    keeps = []
    for n_tok in counts:
        if drop > 0 and rng.random() < drop:
            k = max(1, int(round(rng.uniform(min_keep, 1.0) * n_tok)))
            keeps.append(torch.from_numpy(np.sort(rng.choice(n_tok, size=k, replace=False))))
        else:
            keeps.append(torch.arange(n_tok))
    return keeps


def question_batch(tasks, rng, n_images, q_per_image, n_max=5, caption_partner=0.0, focus=None, lone_mate=0.0):
    """``n_images`` fresh training scenes (at most ``n_max`` objects) with ``q_per_image`` questions each.
    ``caption_partner`` > 0: training captions are imperfect the way prior-driven annotations are
    (:func:`partner_caption`); held-out references stay exact. ``lone_mate``: that share of the scenes is
    drawn again until one of its objects' ``PAIRS`` partner is absent, the scenes where such captions
    differ from the exact ones. ``focus``: ``(family, share)`` pairs
    (:func:`parse_focus`); each share of the synth-vqa questions is drawn again until it is of that family (when the
    scene allows it)."""
    from mmtoken.world.tasks import Sample

    samples = []
    for seed in rng.integers(0, 5_000_000, size=n_images):
        scene = sample_scene(int(seed), n_max=n_max)
        if lone_mate > 0 and rng.random() < lone_mate:
            for _ in range(100):  # about one scene in five qualifies
                if scene.absent_partners():
                    break
                seed = rng.integers(0, 5_000_000)
                scene = sample_scene(int(seed), n_max=n_max)
        for _ in range(q_per_image):
            task = tasks[int(rng.integers(len(tasks)))]
            family, question, answer = task.make(scene, rng, int(rng.integers(1 << 30)))
            wanted = focus_family(focus, rng.random()) if focus and task.name == "synth-vqa" else None
            if wanted:
                for _ in range(50):  # a family absent from the scene's draws (e.g. relation with one object) gives up
                    if family == wanted:
                        break
                    family, question, answer = task.make(scene, rng, int(rng.integers(1 << 30)))
            if family == "caption" and caption_partner > 0:
                answer = partner_caption(scene, rng, caption_partner)
            samples.append(Sample(f"{task.name}/train/{seed}", task.name, scene, question, [answer], family))
    return samples


def focus_family(focus, u: float) -> str | None:
    """The family a synth-vqa question is redrawn to for a uniform draw ``u``: the shares of ``focus``
    (``(family, share)`` pairs) are consecutive intervals of [0, 1); None past their sum."""
    for family, share in focus:
        if u < share:
            return family
        u -= share
    return None


def parse_focus(text: str) -> list[tuple[str, float]]:
    """``FAMILY:SHARE[,FAMILY:SHARE...]`` -> pairs; ValueError naming the problem."""
    pairs = []
    for part in text.split(","):
        family, _, share = (x.strip() for x in part.partition(":"))
        try:
            value = float(share)
        except ValueError:
            raise ValueError(f"FAMILY:SHARE with SHARE a number in (0, 1], got {part!r}") from None
        if family not in VQA_FAMILIES or not 0 < value <= 1:
            raise ValueError(f"FAMILY:SHARE with FAMILY one of {sorted(VQA_FAMILIES)} and SHARE in (0, 1], got {part!r}")
        pairs.append((family, value))
    if sum(v for _, v in pairs) > 1 + 1e-9 or len({f for f, _ in pairs}) < len(pairs):
        raise ValueError(f"the shares add up to at most 1, each family once, got {text!r}")
    return pairs


def partner_caption(scene, rng, p: float) -> str:
    """The scene's caption in which each present object whose ``PAIRS`` partner is absent is followed,
    with probability ``p``, by that partner: the annotator names what usually comes with it (as
    prior-driven captions do), so the training text itself carries the co-occurrence hallucination."""
    from mmtoken.world.scenes import PARTNER
    from mmtoken.world.tasks import caption_text

    absent = scene.absent_partners()
    names = []
    for o in sorted(scene.objects, key=lambda o: o.cell):
        names.append(f"{o.colour} {o.shape}")
        partner = PARTNER.get(o.category)
        if partner in absent and rng.random() < p:
            names.append(f"{partner[0]} {partner[1]}")
    return caption_text(names)


def referents(question: str, scene) -> list:
    """The objects a question is about, read off its words: "<colour> <shape>" pairs, else a shape or a
    colour, else a layout cell, else every object ("how many objects")."""
    from mmtoken.world.tasks import plural

    words = question.split()
    pairs = {(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES}
    if pairs:
        return [o for o in scene.objects if o.category in pairs]
    shapes = {s for s in SHAPES if s in words or plural(s) in words}
    if shapes:
        return [o for o in scene.objects if o.shape in shapes]
    colours = {c for c in COLOURS if c in words}
    if colours:
        return [o for o in scene.objects if o.colour in colours]
    cells = set(asked_cells(question))
    if cells:
        return [o for o in scene.objects if o.cell in cells]
    return list(scene.objects)


def asked_cells(question: str) -> list[int]:
    """The layout cells (indices into ``CELLS``) a question names, in order."""
    from mmtoken.world.scenes import CELLS

    return [CELLS.index(w) for w in question.split() if w in CELLS]


def mentioned(question: str, scene) -> list:
    """The objects named by "<colour> <shape>" in the question, in the order the question names them."""
    words = question.split()
    by_cat = {o.category: o for o in scene.objects}
    return [by_cat[(a, b)] for a, b in zip(words, words[1:]) if (a, b) in by_cat]


def object_masks(objects, grid: int) -> list[torch.Tensor]:
    """``[grid * grid]`` per object: 1 for patches whose centre lies in its box (96-px frame)."""
    step = 96 / grid
    centres = (torch.arange(grid) + 0.5) * step
    cy, cx = torch.meshgrid(centres, centres, indexing="ij")
    masks = []
    for o in objects:
        x0, y0, x1, y1 = o.box
        masks.append(((cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1)).float().flatten())
    return masks


def referent_mask(question: str, scene, grid: int) -> torch.Tensor:
    """``[grid * grid]`` 1 for patches whose centre lies in an object the question is about."""
    masks = object_masks(referents(question, scene), grid)
    return torch.stack(masks).amax(0) if masks else torch.zeros(grid * grid)


def readout_mask(question: str, scene, grid: int, last: bool) -> torch.Tensor:
    """``[grid * grid]``: 1 where the readout loss asks for the answer, 0 where it asks for ``<pad>``,
    -1 where it asks nothing. ``last``: only the referent that comes last in the visual-token order
    (raster order of its first patch) carries the answer; the other referents are left out. With causal
    attention over the image span only that object's tokens can see every referent, which answers
    that compare or count objects (relation, counts) need."""
    if not last:
        return referent_mask(question, scene, grid)
    masks = [m for m in object_masks(referents(question, scene), grid) if m.any()]
    out = torch.zeros(grid * grid)
    if not masks:
        return out
    first = [int(m.nonzero()[0]) for m in masks]
    order = sorted(range(len(masks)), key=first.__getitem__)
    for i in order[:-1]:
        out[masks[i] > 0] = -1.0
    out[masks[order[-1]] > 0] = 1.0
    return out


ATTRIBUTE_FAMILIES = {"colour", "shape", "size", "position", "at_cell"}


def lm_loss(model, tok, samples, q_per_image, size, grounding=None, grounding_layer=2, readout=None, readout_layer=3,
            readout_families=ATTRIBUTE_FAMILIES, rng=None, drop=0.0, min_keep=0.1, readout_last=(), slots=None,
            slot_families=(), slot_layer=3, roles=None, role_layer=2, role_weight=1.0, cell_head=None, cell_weight=1.0,
            starts=None, start_families=(), start_weight=1.0):
    """Answer loss with the ViT frozen: its features are computed without grad, the projector with.
    With ``grounding`` (a linear head), adds a dense auxiliary loss: from the LM's hidden states at layer
    ``grounding_layer``, each image token predicts whether it belongs to an object the question is about.
    With ``readout`` (a linear head over the vocabulary), questions about one object's attribute add a
    second dense loss at layer ``readout_layer``: the object's image tokens predict the answer, the other
    image tokens predict ``<pad>`` (nothing to report); for the families in ``readout_last`` only the
    last referent's tokens answer (:func:`readout_mask`). ``drop`` > 0: token-drop augmentation
    (:func:`drop_tokens`). ``slots`` / ``roles`` / ``cell_head`` / ``starts``: the decomposed targets of
    :func:`decomposition_loss`. The batch is built on the CPU and moved to the model's device."""
    dev = model.device
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n_tok = grid * grid
    keeps = drop_tokens(rng, [n_tok] * len(samples), drop, min_keep)
    ids, labels, mask = (t.to(dev) for t in encode_samples(tok, samples, [len(k) for k in keeps]))
    with torch.no_grad():
        out = model.model.vision_tower(pixels([s.scene for s in samples[::q_per_image]], size).to(dev), output_hidden_states=True)
        vis = out.hidden_states[model.config.vision_feature_layer][:, 1:]
    feats = model.model.multi_modal_projector(vis).repeat_interleave(q_per_image, dim=0)
    feats = torch.cat([f[k.to(dev)] for f, k in zip(feats, keeps)])
    emb = model.model.get_input_embeddings()(ids)
    is_img = ids == model.config.image_token_id
    emb = emb.masked_scatter(is_img.unsqueeze(-1), feats.to(emb.dtype))
    out = model(inputs_embeds=emb, attention_mask=mask, labels=labels,
                output_hidden_states=any(h is not None for h in (grounding, slots, roles, cell_head, starts)))
    aux = decomposition_loss(out.hidden_states, samples, keeps, is_img, labels, grid, slots, slot_families, slot_layer,
                             roles, role_layer, role_weight, cell_head=cell_head, cell_weight=cell_weight,
                             starts=starts, start_families=start_families, start_weight=start_weight)
    if grounding is None:
        return out.loss + aux
    full = [referent_mask(s.question, s.scene, grid) for s in samples]
    target = torch.cat([m[k] for m, k in zip(full, keeps)]).to(dev)
    h = out.hidden_states[grounding_layer][is_img]
    aux = aux + F.binary_cross_entropy_with_logits(grounding(h).squeeze(-1), target, pos_weight=torch.tensor(4.0, device=dev))
    if readout is not None:
        wants = [readout_mask(s.question, s.scene, grid, s.family in readout_last) if s.family in readout_families
                 else torch.full((n_tok,), -1.0) for s in samples]
        role = torch.cat([r[k] for r, k in zip(wants, keeps)])
        sample_of = torch.cat([torch.full((len(k),), i) for i, k in enumerate(keeps)])
        # a sample takes part when one of its referents is in the image
        rows = torch.tensor([bool((r > 0).any()) for r in wants])[sample_of] & (role >= 0)
        if rows.any():
            answer = torch.tensor([tok.convert_tokens_to_ids(s.answers[0]) if s.family in readout_families else tok.pad_token_id
                                   for s in samples])[sample_of]
            labels_r = torch.where(role > 0, answer, torch.full_like(answer, tok.pad_token_id))
            logits_r = readout(out.hidden_states[readout_layer][is_img][rows.to(dev)])
            aux = aux + F.cross_entropy(logits_r, labels_r[rows].to(dev))
    return out.loss + aux


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Per row, the position whose logits predict the first answer token (the last prompt token)."""
    return (labels != -100).int().argmax(-1) - 1


def slot_targets(samples) -> tuple[torch.Tensor, list[int], torch.Tensor]:
    """Per sample: its referents' layout cells ``[n, 9]`` (multi-label); the samples that name two
    objects, and their cells ``[m, 2]`` (first named, second named)."""
    cells = torch.zeros(len(samples), 9)
    pairs, pair_cells = [], []
    for j, s in enumerate(samples):
        for o in referents(s.question, s.scene):
            cells[j, o.cell] = 1.0
        named = mentioned(s.question, s.scene)
        if len(named) == 2:
            pairs.append(j)
            pair_cells.append([named[0].cell, named[1].cell])
    return cells, pairs, torch.tensor(pair_cells, dtype=torch.long).reshape(-1, 2)


def role_targets(samples, keeps, grid: int) -> torch.Tensor:
    """Per kept visual token, concatenated over the samples: 1 or 2 where it lies in the first or the
    second object a relation question names, 0 elsewhere in such a question's image, -100 (ignored) for
    the other questions."""
    targets = []
    for s, k in zip(samples, keeps):
        t = torch.full((grid * grid,), -100, dtype=torch.long)
        named = mentioned(s.question, s.scene) if s.family == "relation" else []
        if len(named) == 2:
            t[:] = 0
            for r, m in enumerate(object_masks(named, grid), start=1):
                t[m > 0] = r
        targets.append(t[k])
    return torch.cat(targets)


def cell_targets(samples, keeps, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the questions that name a layout cell (at_cell), per kept visual token concatenated over the
    samples: the asked cell (0-8) and whether the token's own patch lies in it (1 / 0); -100 for the
    other questions' tokens."""
    own = torch.from_numpy(patch_cells(grid)).flatten()
    asked_all, match_all = [], []
    for s, k in zip(samples, keeps):
        cells = asked_cells(s.question) if s.family == "at_cell" else []
        asked = torch.full((len(k),), -100, dtype=torch.long)
        match = torch.full((len(k),), -100, dtype=torch.long)
        if len(cells) == 1:
            asked[:] = cells[0]
            match[:] = (own[k] == cells[0]).long()
        asked_all.append(asked)
        match_all.append(match)
    return torch.cat(asked_all), torch.cat(match_all)


def start_targets(samples, keeps, grid: int, families) -> torch.Tensor:
    """For the questions of ``families`` (counting ones), per kept visual token concatenated over the
    samples: 1 where the token is the first kept one, in raster order, of one of the question's
    referents (:func:`referents`; every object for "how many objects"), 0 for the question's other
    tokens; -100 (ignored) for the other questions' tokens. A count is then the number of flagged tokens."""
    targets = []
    for s, k in zip(samples, keeps):
        t = torch.full((len(k),), -100, dtype=torch.long)
        if s.family in families:
            t[:] = 0
            for m in object_masks(referents(s.question, s.scene), grid):
                inside = (m[k] > 0).nonzero()
                if len(inside):
                    t[inside[0]] = 1
        targets.append(t)
    return torch.cat(targets)


ROLE_WEIGHTS = (0.1, 1.0, 1.0)  # "neither" is about 91% of a relation question's visual tokens
START_POS_WEIGHT = 10.0  # a counting question flags 0-5 of its up to 144 visual tokens


def decomposition_loss(hidden, samples, keeps, is_img, labels, grid, slots=None, slot_families=(), slot_layer=3,
                       roles=None, role_layer=2, role_weight=1.0, cell_head=None, cell_layer=1, cell_weight=1.0,
                       starts=None, start_families=(), start_layer=3, start_weight=1.0):
    """Decomposed supervision for the questions that combine several objects or select one by its cell
    (ours; 0 when every head is None). ``slots`` (a head with 27 outputs): at the answer position, layer ``slot_layer``
    predicts the layout cells of the question's referents (9 outputs, multi-label; families in
    ``slot_families``) and, for a question that names two objects (relation), the cell of the first
    and of the second (9 + 9 outputs). The last layers then only have to compare or count what is
    already gathered there. ``roles`` (a head with 3 outputs): for relation questions each image token
    predicts, at layer ``role_layer``, whether it belongs to the first named object, the second, or
    neither (classes weighted by ``ROLE_WEIGHTS``; the loss by ``role_weight``); image tokens see the
    question, so they can tell the two apart. ``cell_head`` (a head with 11 outputs): for questions that
    name a layout cell (at_cell), each image token predicts at layer ``cell_layer`` the asked cell (9-way:
    it fetches the cell word from the question) and whether its own patch lies in that cell (2-way), the
    two steps that selecting an object by where it is needs (loss weight ``cell_weight``). ``starts`` (a
    head with 1 output): for the questions of ``start_families`` each image token predicts at layer
    ``start_layer`` whether it is the first visible token of a referent (:func:`start_targets`; positives
    weighted by ``START_POS_WEIGHT``, the loss by ``start_weight``), so that a count becomes a sum of flags
    the answer position can gather. Targets are built on the CPU and moved to the hidden states' device."""
    dev = hidden[0].device
    loss = torch.zeros((), device=dev)
    if slots is not None:
        rows = [i for i, s in enumerate(samples) if s.family in slot_families]
        if rows:
            rows_t = torch.tensor(rows, device=dev)
            logits = slots(hidden[slot_layer][rows_t, answer_positions(labels)[rows_t]])
            cells, pairs, pair_cells = slot_targets([samples[i] for i in rows])
            loss = loss + F.binary_cross_entropy_with_logits(logits[:, :9], cells.to(dev))
            if pairs:
                idx = torch.tensor(pairs, device=dev)
                pair_cells = pair_cells.to(dev)
                loss = loss + F.cross_entropy(logits[idx, 9:18], pair_cells[:, 0]) + F.cross_entropy(logits[idx, 18:27], pair_cells[:, 1])
    if roles is not None:
        target = role_targets(samples, keeps, grid)
        if (target >= 0).any():
            weight = torch.tensor(ROLE_WEIGHTS, device=dev)
            loss = loss + role_weight * F.cross_entropy(roles(hidden[role_layer][is_img]), target.to(dev), weight=weight,
                                                        ignore_index=-100)
    if cell_head is not None:
        asked, match = cell_targets(samples, keeps, grid)
        if (asked >= 0).any():
            logits = cell_head(hidden[cell_layer][is_img])
            loss = loss + cell_weight * (F.cross_entropy(logits[:, :9], asked.to(dev), ignore_index=-100)
                                         + F.cross_entropy(logits[:, 9:], match.to(dev), ignore_index=-100))
    if starts is not None:
        target = start_targets(samples, keeps, grid, start_families)
        rows = target >= 0
        if rows.any():
            logits = starts(hidden[start_layer][is_img][rows.to(dev)]).squeeze(-1)
            loss = loss + start_weight * F.binary_cross_entropy_with_logits(
                logits, target[rows].float().to(dev), pos_weight=torch.tensor(START_POS_WEIGHT, device=dev))
    return loss


@torch.no_grad()
def evaluate(model, tok, task_names, n, size, batch=50):
    """Held-out exact-match accuracy per task (greedy, first answer token), and per synth-vqa family
    (keys ``synth-vqa/<family>``)."""
    model.eval()
    n_img = (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    res = {}
    for name in task_names:
        samples = get_task(name).samples("test", n)
        hits = []
        for i in range(0, n, batch):
            chunk = samples[i : i + batch]
            prompts = [PROMPT.format(question=s.question).replace("<image>", " ".join(["<image>"] * n_img)) for s in chunk]
            enc = tok(prompts, add_special_tokens=False, padding=True, return_tensors="pt").to(model.device)
            pv = pixels([s.scene for s in chunk], size).to(model.device)
            logits = model(**enc, pixel_values=pv, logits_to_keep=1).logits[:, -1]
            pred = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
            hits += [p == s.answers[0] for p, s in zip(pred, chunk)]
        res[name] = sum(hits) / n
        if name == "synth-vqa":
            for fam in sorted({s.family for s in samples}):
                got = [h for h, s in zip(hits, samples) if s.family == fam]
                res[f"{name}/{fam}"] = round(sum(got) / len(got), 3)
    model.train()
    return res


_TASKS: dict = {}


def step_batch(job):
    """One step's questions from a per-step generator (``seed``, ``step``), so that worker processes can
    draw them in any order: ``job`` is ``(seed, step, task_names, n_images, q_per_image, n_max,
    caption_partner, focus, lone_mate)``."""
    seed, step, names, n_images, q_per_image, n_max, caption_partner, focus, lone_mate = job
    tasks = [_TASKS.setdefault(n, get_task(n)) for n in names]
    return question_batch(tasks, np.random.default_rng([seed, step]), n_images, q_per_image, n_max=n_max,
                          caption_partner=caption_partner, focus=focus, lone_mate=lone_mate)


def _quiet_worker():
    torch.set_num_threads(1)


class Prefetcher:
    """Draws the next steps' questions in ``workers`` processes while the model trains (for a GPU, where
    drawing scenes and questions on one core would be the bottleneck); at most ``depth`` steps ahead."""

    def __init__(self, workers: int, depth: int):
        import atexit
        import multiprocessing as mp

        self.pool = mp.get_context("fork").Pool(workers, initializer=_quiet_worker)
        self.depth, self.pending = depth, {}
        atexit.register(self.pool.terminate)  # also when model loading or stage 1 fails before the loop

    def get(self, step: int, job_for):
        """Step ``step``'s batch; ``job_for(i)``: the :func:`step_batch` job of step ``i``."""
        for i in range(step, step + self.depth):
            if i not in self.pending:
                self.pending[i] = self.pool.apply_async(step_batch, (job_for(i),))
        return self.pending.pop(step).get()

    def close(self):
        self.pool.terminate()


def fit_steps(done: int, pace_s: float, left_s: float) -> int:
    """The step count that ends a wall-clock budget: ``done`` steps so far, ``pace_s`` seconds a step,
    ``left_s`` seconds of budget left."""
    return done + max(1, int(left_s / pace_s))


class Budget:
    """``--minutes``: at the first step >= 100 after each quarter of the budget (1/4, 1/2, 3/4) the step
    count becomes what fits at the pace since the previous fit (the first: since the start), so a run
    that slows down (a shared GPU) still ends its schedule near the budget; quarters passed together
    (slow first steps) give one fit. Past 1.15 times the budget the run stops. ``fits`` records each fit."""

    def __init__(self, minutes: float):
        self.seconds, self.fits = 60 * minutes, []

    def update(self, step: int, spent: float, steps: int) -> tuple[int, bool]:
        """``(steps, stop)`` after step ``step`` (``spent`` seconds in, ``steps`` the current count)."""
        if not self.seconds:
            return steps, False
        quarter = min(3, int(4 * spent / self.seconds))  # quarters of the budget passed (fits at 1, 2, 3)
        if step >= 100 and quarter > (self.fits[-1]["quarter"] if self.fits else 0):
            last_step, last_s = (self.fits[-1]["at_step"], self.fits[-1]["s"]) if self.fits else (0, 0.0)
            pace = (spent - last_s) / max(1, step - last_step)
            new = fit_steps(step, pace, self.seconds - spent)
            self.fits.append({"at_step": step, "s": spent, "quarter": quarter, "s_per_step": pace, "from": steps,
                              "lm_steps": new})
            steps = new
        return steps, spent > 1.15 * self.seconds


def cosine(step, total, warmup, base):
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--quick", action="store_true", help="a few steps of each stage (checks the script)")
    p.add_argument("--vision-steps", type=int, default=1200)
    p.add_argument("--lm-steps", type=int, default=3000)
    p.add_argument("--images", type=int, default=16, help="scenes per LM step")
    p.add_argument("--questions", type=int, default=4, help="questions per scene per LM step")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda (both stages train there; scenes are drawn on the CPU)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes drawing the next steps' questions ahead (0: in the training loop). With workers "
                        "each step draws from its own generator (seed, step), so the draws differ from --workers 0's")
    p.add_argument("--minutes", type=float, default=0.0,
                   help="LM-stage wall-clock budget: after each quarter of it (at a step >= 100) --lm-steps is set "
                        "from the pace since the previous fit and written to curve.json; the run also stops at 1.15 "
                        "times the budget. 0: --lm-steps as given")
    p.add_argument("--stop-after", type=int, default=0,
                   help="stop after this many LM steps, keeping the learning-rate schedule of --lm-steps (0: no)")
    p.add_argument("--init", default=None, help="start from this saved model (e.g. to skip stage 1 with --vision-steps 0)")
    p.add_argument("--grounding", type=float, default=1.0, help="1: add the dense grounding loss in stage 2; 0: off")
    p.add_argument("--curriculum", type=float, default=0.3, help="share of stage 2 over which scenes grow from 1 to 5 objects")
    p.add_argument("--readout", type=float, default=1.0, help="1: add the dense answer-readout loss in stage 2; 0: off")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--drop", type=float, default=0.0,
                   help="token-drop augmentation: share of stage-2 sequences trained on a random subset of visual tokens")
    p.add_argument("--min-keep", type=float, default=0.1, help="smallest kept share of visual tokens under --drop")
    p.add_argument("--tasks", default="synth-vqa:1,synth-pope:1",
                   help="stage-2 question mix, name:weight,... (synth-vqa, synth-pope, synth-caption, synth-format)")
    p.add_argument("--readout-families", default=",".join(sorted(ATTRIBUTE_FAMILIES)),
                   help="synth-vqa families whose referent tokens learn the answer (readout loss); 'all' for every "
                        "family with a one-word answer")
    p.add_argument("--readout-last", default="",
                   help="families whose answer only the last referent's tokens learn (e.g. relation,count,count_all); "
                        "the shipped phases 1-5 used none")
    p.add_argument("--slots", default="",
                   help="families that get the decomposed answer-position targets (referent cells; first and second "
                        "named object's cell), e.g. relation,count_all,count,at_cell; the shipped phases 1-5 used none")
    p.add_argument("--roles", type=float, default=0.0,
                   help="weight of a loss by which relation questions' image tokens learn which named object they "
                        "belong to (ours; 0: off)")
    p.add_argument("--cells", type=float, default=0.0,
                   help="weight of a loss by which at_cell questions' image tokens learn, at LM layer 1, the asked "
                        "cell and whether they lie in it (ours; 0: off)")
    p.add_argument("--starts", type=float, default=0.0,
                   help="weight of a loss by which counting questions' image tokens learn, at LM layer 3, whether they "
                        "are the first visible token of an object counted (ours; 0: off)")
    p.add_argument("--start-families", default="count,count_all", help="the families --starts applies to")
    p.add_argument("--caption-partner", type=float, default=0.0,
                   help="probability that a training caption names a present object's absent co-occurrence partner "
                        "after it (prior-driven annotation); held-out captions stay exact")
    p.add_argument("--lone-mate", type=float, default=0.0,
                   help="share of training scenes drawn again until one of their objects' co-occurrence partner is "
                        "absent (the scenes where --caption-partner acts; about one in five otherwise)")
    p.add_argument("--grow-layers", type=int, default=0,
                   help="with --init: append this many decoder layers to the LM, each starting as a residual no-op "
                        "(ours; the shipped phases 1-5 used none)")
    p.add_argument("--focus", default="", help="FAMILY:SHARE[,FAMILY:SHARE...]: that share of the synth-vqa draws is redrawn until it is of "
                        "FAMILY, on top of the family's own share of ordinary draws (e.g. relation:0.5 or "
                        "relation:0.3,at_cell:0.3)")
    args = p.parse_args(argv)
    focus = None
    if args.focus:
        try:
            focus = parse_focus(args.focus)
        except ValueError as e:
            p.error(f"--focus: {e}")
    slot_families = set(args.slots.split(",")) - {""}
    if slot_families - VQA_FAMILIES:
        p.error(f"--slots: unknown families {sorted(slot_families - VQA_FAMILIES)}; known: {sorted(VQA_FAMILIES)}")
    if args.grow_layers < 0 or (args.grow_layers and not args.init):
        p.error(f"--grow-layers: a count >= 0 that needs --init (a model to grow), got {args.grow_layers}")
    start_families = set(args.start_families.split(",")) - {""}
    if start_families - VQA_FAMILIES:
        p.error(f"--start-families: unknown families {sorted(start_families - VQA_FAMILIES)}; known: {sorted(VQA_FAMILIES)}")
    if args.workers < 0 or args.minutes < 0 or args.stop_after < 0:
        p.error("--workers, --minutes and --stop-after: >= 0")
    for flag, value in (("--roles", args.roles), ("--cells", args.cells), ("--starts", args.starts)):
        if value < 0:
            p.error(f"{flag}: a loss weight >= 0, got {value}")
    for flag, value in (("--caption-partner", args.caption_partner), ("--lone-mate", args.lone_mate)):
        if not 0 <= value <= 1:
            p.error(f"{flag}: a probability, got {value}")
    if args.minutes and args.curriculum:
        p.error("--minutes sets the step count as it runs; the curriculum's ramp needs it up front (--curriculum 0)")
    if args.quick:
        args.vision_steps = min(args.vision_steps, 3)
        args.lm_steps, args.eval_every, args.eval_n, args.images = 3, 3, 20, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)
    # forked before the model is built or CUDA starts: the workers only draw scenes and questions
    prefetch = Prefetcher(args.workers, 2 * args.workers) if args.workers else None

    from transformers import LlavaForConditionalGeneration

    if args.init:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.init)
        model = LlavaForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32)
        tok, model = grow_vocabulary(tok, model, vocabulary(), args.seed)
        if args.grow_layers:
            grow_layers(model, args.grow_layers)
        config = model.config
    else:
        tok = build_tokenizer(vocabulary())
        config = tiny_llava_config(len(tok))
        model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("sdpa")
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model.to(args.device)
    size = config.vision_config.image_size
    grid = size // config.vision_config.patch_size
    heads = VisionHeads(config.vision_config.hidden_size).to(args.device)
    curve = {"vision": [], "lm": [], "args": dict(vars(args))}  # as given: --minutes changes args.lm_steps
    t0 = time.time()

    # stage 1: vision
    params = list(model.model.vision_tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    for step in range(args.vision_steps):
        for g in opt.param_groups:
            g["lr"] = cosine(step, args.vision_steps, 50, 1e-3)
        loss, accs = vision_step(model, heads, rng.integers(0, 5_000_000, size=48), grid, size)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0 or step == args.vision_steps - 1:
            curve["vision"].append({"step": step, "loss": loss.item(), "s": time.time() - t0} | accs)
            print(f"vision {step} loss {loss.item():.3f} {accs} {time.time() - t0:.0f}s", flush=True)

    # stage 2: language
    for prm in model.model.vision_tower.parameters():
        prm.requires_grad_(False)
    grounding = torch.nn.Linear(config.text_config.hidden_size, 1) if args.grounding else None
    d_lm = config.text_config.hidden_size
    readout = torch.nn.Sequential(torch.nn.LayerNorm(d_lm), torch.nn.Linear(d_lm, len(tok))) if args.readout and grounding is not None else None
    params = list(model.model.multi_modal_projector.parameters()) + list(model.model.language_model.parameters())
    # intermediate hidden states are not normalised: a LayerNorm keeps the new heads' first logits small
    slots = torch.nn.Sequential(torch.nn.LayerNorm(d_lm), torch.nn.Linear(d_lm, 27)) if slot_families else None
    roles = torch.nn.Sequential(torch.nn.LayerNorm(d_lm), torch.nn.Linear(d_lm, 3)) if args.roles else None
    cell_head = torch.nn.Sequential(torch.nn.LayerNorm(d_lm), torch.nn.Linear(d_lm, 11)) if args.cells else None
    starts = torch.nn.Sequential(torch.nn.LayerNorm(d_lm), torch.nn.Linear(d_lm, 1)) if args.starts else None
    for head in (grounding, readout, slots, roles, cell_head, starts):
        if head is not None:
            head.to(model.device)
            params += list(head.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    tasks = []
    for part in args.tasks.split(","):
        name, _, weight = part.partition(":")
        tasks += [get_task(name)] * int(weight or 1)
    families = VQA_FAMILIES if args.readout_families == "all" else set(args.readout_families.split(","))
    readout_last = set(args.readout_last.split(",")) - {""}
    model.train()
    ramp = max(1, int(args.curriculum * args.lm_steps))
    names = [t.name for t in tasks]

    def n_max_at(i):  # the curriculum's largest object count at step i
        return 1 + min(4, (4 * i) // ramp) if args.curriculum else 5

    def job_for(i):
        return (args.seed, i, names, args.images, args.questions, n_max_at(i), args.caption_partner, focus, args.lone_mate)

    def record(loss):  # held-out accuracy at this step, into the curve and the log
        acc = evaluate(model, tok, ["synth-vqa", "synth-pope"], args.eval_n, size)
        curve["lm"].append({"step": step, "loss": loss.item(), "s": time.time() - t0} | acc)
        print(f"eval {step} {acc} {time.time() - t0:.0f}s", flush=True)

    t_lm = time.time()
    budget = Budget(args.minutes)
    step = 0
    try:
        while step < min(args.lm_steps, args.stop_after or args.lm_steps):
            for g in opt.param_groups:
                g["lr"] = cosine(step, args.lm_steps, 100, args.lr)
            if prefetch:
                samples = prefetch.get(step, job_for)
            else:
                samples = question_batch(tasks, rng, args.images, args.questions, n_max=n_max_at(step),
                                         caption_partner=args.caption_partner, focus=focus, lone_mate=args.lone_mate)
            loss = lm_loss(model, tok, samples, args.questions, size, grounding, readout=readout, readout_families=families,
                           rng=rng, drop=args.drop, min_keep=args.min_keep, readout_last=readout_last, slots=slots,
                           slot_families=slot_families, roles=roles, role_weight=args.roles, cell_head=cell_head,
                           cell_weight=args.cells, starts=starts, start_families=start_families, start_weight=args.starts)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            spent = time.time() - t_lm
            n_fits = len(budget.fits)
            args.lm_steps, stop = budget.update(step, spent, args.lm_steps)
            if len(budget.fits) > n_fits:
                curve["fitted_steps"] = budget.fits
                print(f"{1000 * budget.fits[-1]['s_per_step']:.1f} ms a step: {args.lm_steps} steps fit {args.minutes} min",
                      flush=True)
            if stop:
                curve["stopped_at"] = {"step": step, "s": spent, "reason": "1.15 x --minutes passed"}
                print(f"stopped at step {step}: past 1.15 x the budget", flush=True)
                break
            if (step - 1) % 25 == 0:
                print(f"lm {step - 1} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
            if step % args.eval_every == 0 or step == args.lm_steps:
                record(loss)
                save(model, tok, args.out, curve)
    finally:
        if prefetch:
            prefetch.close()
    if step and (not curve["lm"] or curve["lm"][-1]["step"] != step):
        record(loss)
    save(model, tok, args.out, curve)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


# the synth-vqa families (the shipped phases' --readout-families also name "occupied", a family the task
# generator never produces: "is there an object at <cell>" questions are at_cell ones)
VQA_FAMILIES = {"colour", "shape", "count", "count_all", "position", "size", "at_cell", "relation"}


def grow_vocabulary(tok, model, words, seed):
    """The world's vocabulary may have grown since ``model`` was saved (new tasks bring new words): rebuild
    the tokenizer and move every known word's embedding row to its new id; new words start as small noise
    (tied output rows: their logits start near 0 instead of competing with the learnt words). Returns ``(tok, model)`` unchanged when nothing is new."""
    old = tok.get_vocab()
    if not set(words) - set(old):
        return tok, model
    new_tok = build_tokenizer(words)
    new = new_tok.get_vocab()
    emb = model.get_input_embeddings().weight.data.clone()
    model.resize_token_embeddings(len(new_tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed)
    rows = 0.02 * torch.randn(len(new_tok), emb.shape[1], generator=g)
    for word, i in new.items():
        if word in old:
            rows[i] = emb[old[word]]
    model.get_input_embeddings().weight.data.copy_(rows)
    model.tie_weights()
    print(f"vocabulary grown from {len(old)} to {len(new)} words", flush=True)
    return new_tok, model


def grow_layers(model, n: int):
    """Appends ``n`` decoder layers to the LM, after its last one (ours, for circuits that need more
    sequential steps than four layers give). Each new layer starts as a copy of the last layer with its
    attention output and MLP down projections zeroed: a residual no-op, so the grown model answers
    exactly as before until training moves it, while its queries, keys and features start from learnt
    ones instead of noise. The auxiliary heads keep reading the layers they read before. With ``n`` >= 2
    the new layers start identical and part only as training moves them (second-order at first: only
    their zeroed projections get a gradient on the first step)."""
    import copy

    lm = model.model.language_model
    cfg = lm.config
    for _ in range(n):
        layer = copy.deepcopy(lm.layers[-1])
        layer.self_attn.layer_idx = len(lm.layers)
        for module in layer.modules():  # share the model's config (a deep copy would keep a stale private one)
            if hasattr(module, "config"):
                module.config = cfg
        for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
            torch.nn.init.zeros_(proj.weight)
            if proj.bias is not None:
                torch.nn.init.zeros_(proj.bias)
        lm.layers.append(layer)
    added = len(lm.layers) - cfg.num_hidden_layers
    cfg.num_hidden_layers = len(lm.layers)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = list(cfg.layer_types) + [cfg.layer_types[-1]] * added
    print(f"language model grown to {cfg.num_hidden_layers} layers", flush=True)
    return model


def save(model, tok, out, curve):
    path = os.path.join(out, "model")
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    model.save_pretrained(path, safe_serialization=True)
    build_processor(tok).save_pretrained(path)
    write_world_card(path, {"trained_by": "scripts/train_tiny_llava.py"})
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    model.train()


if __name__ == "__main__":
    main()
