"""Where does a tiny-llava lose a synth-vqa family? Probes on held-out questions of that family.

    python scripts/probe_tiny_llava.py --model tiny-llava --family at_cell [--n 400]

For each LM layer's hidden states (0: the input embeddings; L: after decoder layer L; the last entry
is, as transformers returns it, after the final RMSNorm as well) it reports:

- **grounding**: an MLP probe (one hidden layer) from each visual token's state to "this token lies in
  an object the question is about" (the training script's referent mask), recall / precision on the
  held-out half of the questions. For colour questions the tokens of the named shape should light up.
- **cells** (families that name a layout cell: at_cell): linear probes from a visual token's state to
  the cell the question asks about (fetched from the question words) and to the token's own cell.
- **attention** (layer 0): the share of the visual tokens' attention, per head, on the word that
  selects the referents (the cell word of an at_cell question, the shape word of a colour question, the
  colour word of a shape question, ...; not for relations), for referent tokens and for the other
  visual tokens. Computed with eager attention, for this probe only.

Questions come from the held-out synth-vqa stream (scenes of three objects or more; "is there an object
at ..." questions are left out: they have no referent). Probes train on the first half of the
questions and are scored on the second, so no scene is in both halves.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import mmtoken  # noqa: E402
from mmtoken.world import CELLS, COLOURS, SHAPES, get_task, render  # noqa: E402
from mmtoken.world.tasks import plural  # noqa: E402
from mmtoken.world.scenes import patch_cells  # noqa: E402
from train_tiny_llava import VQA_FAMILIES, asked_cells, referent_mask  # noqa: E402


def questions(family: str, n: int, scan: int = 20_000) -> list:
    """The first ``n`` held-out synth-vqa questions of ``family`` about scenes of three objects or more."""
    out = []
    task = get_task("synth-vqa")
    for i in range(scan):
        s = task.sample("test", i)
        if s.family == family and len(s.scene.objects) >= 3 and not s.question.startswith("is there"):
            out.append(s)
            if len(out) == n:
                break
    return out


@torch.no_grad()
def visual_states(lm, samples, batch: int = 50):
    """Per layer, ``[n, n_visual, d]`` hidden states of the visual tokens."""
    tok = lm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    img = lm.model.config.image_token_id
    states = None
    try:
        for i in range(0, len(samples), batch):
            chunk = samples[i : i + batch]
            enc = lm.processor(text=[lm.format(s.question) for s in chunk], images=[render(s.scene) for s in chunk],
                               return_tensors="pt", padding=True)
            hidden = lm.model(**enc, output_hidden_states=True).hidden_states
            is_img = enc["input_ids"] == img
            rows = [torch.stack([h[j][is_img[j]] for j in range(len(chunk))]) for h in hidden]
            states = rows if states is None else [torch.cat([a, b]) for a, b in zip(states, rows)]
    finally:
        tok.padding_side = side
    return states


def _standardise(x: torch.Tensor, n: int) -> torch.Tensor:
    return (x - x[:n].mean(0)) / (x[:n].std(0) + 1e-5)


def linear_probe(x: torch.Tensor, y: torch.Tensor, n_train: int, classes: int, steps: int = 300) -> float:
    """Held-out accuracy of a softmax probe trained on the first ``n_train`` rows."""
    torch.manual_seed(0)
    x = _standardise(x, n_train)
    w = torch.zeros(x.shape[1], classes, requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.01)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(x[:n_train] @ w + b, y[:n_train])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((x[n_train:] @ w + b).argmax(-1) == y[n_train:]).float().mean().item()


def mlp_probe(x: torch.Tensor, y: torch.Tensor, n_train: int, steps: int = 600) -> tuple[float, float]:
    """Held-out (recall, precision) of a binary MLP probe (positives weighted 4, as the grounding loss)."""
    torch.manual_seed(0)
    x = _standardise(x, n_train)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.003)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x[:n_train]).squeeze(-1), y[:n_train],
                                                                    pos_weight=torch.tensor(4.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = net(x[n_train:]).squeeze(-1) > 0
    true = y[n_train:] > 0
    hit = (pred & true).sum().item()
    return hit / max(1, true.sum().item()), hit / max(1, pred.sum().item())


def key_word(family: str) -> tuple[str, ...] | None:
    """The words that select a family's referents (the last one in the question is read); None for
    relations, whose two named objects have no single selecting word."""
    return {"at_cell": CELLS, "colour": SHAPES, "shape": COLOURS, "count": tuple(plural(x) for x in SHAPES),
            "position": SHAPES, "size": SHAPES}.get(family)


@torch.no_grad()
def key_word_attention(model_path: str, samples, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0, per head: mean attention of referent / other visual tokens on the question's key word."""
    lm = mmtoken.load_model(model_path, attn="eager")
    tok = lm.processor.tokenizer
    tok.padding_side = "left"
    img = lm.model.config.image_token_id
    enc = lm.processor(text=[lm.format(s.question) for s in samples], images=[render(s.scene) for s in samples],
                       return_tensors="pt", padding=True)
    att = lm.model(**enc, output_attentions=True).attentions[0]
    grid = lm.model.config.vision_config.image_size // lm.model.config.vision_config.patch_size
    words = key_word(family)
    ref, other = [], []
    for j, s in enumerate(samples):
        names = tok.convert_ids_to_tokens(enc["input_ids"][j].tolist())
        where = [i for i, w in enumerate(names) if w in words]
        if not where:
            continue
        visual = (enc["input_ids"][j] == img).nonzero().flatten()
        a = att[j][:, visual, where[-1]]
        mask = referent_mask(s.question, s.scene, grid) > 0
        if not mask.any():  # e.g. "how many crosses" with none in the scene
            continue
        ref.append(a[:, mask].mean(1))
        other.append(a[:, ~mask].mean(1))
    return torch.stack(ref).mean(0), torch.stack(other).mean(0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--family", default="at_cell", help="a synth-vqa family whose questions have referents "
                    "(at_cell, colour, shape, position, size, count, relation)")
    ap.add_argument("--n", type=int, default=400, help="questions (half train the probes, half score them)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.family not in VQA_FAMILIES - {"count_all"}:
        ap.error(f"--family: one of {sorted(VQA_FAMILIES - {'count_all'})} (questions with referents), got {args.family!r}")
    if args.n < 20:
        ap.error(f"--n: at least 20 questions (half train the probes), got {args.n}")
    torch.set_num_threads(args.threads)
    samples = questions(args.family, args.n)
    lm = mmtoken.load_model(args.model)
    grid = lm.model.config.vision_config.image_size // lm.model.config.vision_config.patch_size
    states = visual_states(lm, samples)
    half = len(samples) // 2
    n_tok = grid * grid
    target = torch.stack([referent_mask(s.question, s.scene, grid) for s in samples]).flatten()
    print(f"{args.model}, {len(samples)} held-out {args.family} questions (scenes of 3+ objects), probes on the second half")
    for layer, h in enumerate(states):
        x = h.reshape(-1, h.shape[-1])
        rec, prec = mlp_probe(x, target, half * n_tok)
        line = f"layer {layer}: referent tokens recall {rec:.3f} precision {prec:.3f}"
        if args.family == "at_cell":
            asked = torch.tensor([asked_cells(s.question)[0] for s in samples])
            own = torch.from_numpy(patch_cells(grid)).flatten().repeat(len(samples))
            step = 5  # every fifth token keeps the probes quick
            sub = torch.arange(0, len(x), step)
            n_sub = int((sub < half * n_tok).sum())
            line += (f"; asked cell from a visual token {linear_probe(x[sub], asked.repeat_interleave(n_tok)[sub], n_sub, 9):.3f}"
                     f", own cell {linear_probe(x[sub], own[sub], n_sub, 9):.3f} (chance 0.11)")
        print(line, flush=True)
    if key_word(args.family) is None:
        print(f"layer 0 attention: not measured for {args.family} questions (no single word selects the referents)")
        return
    ref, other = key_word_attention(args.model, samples[:100], args.family)
    print("layer 0 attention on the key word, referent / other visual tokens, per head: "
          + ", ".join(f"{r:.2f} / {o:.2f}" for r, o in zip(ref.tolist(), other.tolist())))


if __name__ == "__main__":
    main()
