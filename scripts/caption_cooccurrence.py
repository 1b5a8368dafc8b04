"""Does a model's captioning follow the world's co-occurrence pairs? On held-out synth-caption scenes
where one half of a ``PAIRS`` entry is present and its partner absent (where a learnt prior would make
the model name the partner): CHAIR_i / CHAIR_s, and how many captions name an absent partner; the same
CHAIR figures on the other held-out scenes for comparison. Without a plugin, also how strongly the
prior is held: with the exact caption fed up to the separator after the present half (teacher forcing),
the probability of the absent partner's colour word against the next real object's.

    python scripts/caption_cooccurrence.py --model tiny-llava --n 300 [--method random:keep=0.25]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmtoken  # noqa: E402
from mmtoken.benchmarks import metrics  # noqa: E402
from mmtoken.benchmarks.runner import answer_batch  # noqa: E402
from mmtoken.benchmarks.tasks import Item  # noqa: E402
from mmtoken.world import get_task, render  # noqa: E402
from mmtoken.world.scenes import PARTNER  # noqa: E402
from mmtoken.world.tasks import caption_objects  # noqa: E402


def measure(lm, samples, batch: int) -> dict:
    mentioned, present, partner = [], [], 0
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        items = [Item(id=s.id, image=render(s.scene), question=s.question, answers=s.answers) for s in chunk]
        preds, _, _ = answer_batch(lm, items, 32, "cpu")
        for s, p in zip(chunk, preds):
            objs = caption_objects(p)
            mentioned.append({" ".join(o) for o in objs})
            present.append({o.name for o in s.scene.objects})
            partner += bool(objs & s.scene.absent_partners())
    return metrics.chair_metrics(mentioned, present) | {"captions": len(samples), "captions_naming_absent_partner": partner}


def decision_prefixes(samples) -> list[tuple[object, str, str, str]]:
    """Per scene with an absent partner whose present half is followed by another object of a different
    colour, and by a comma (not "and": a caption that names the partner puts it after "mate ," only):
    (sample, exact caption prefix up to that comma, the partner's colour word, the next object's colour
    word)."""
    out = []
    for s in samples:
        absent = s.scene.absent_partners()
        objs = sorted(s.scene.objects, key=lambda o: o.cell)
        for i, o in enumerate(objs[:-2]):  # the object after the mate is not the last one: a comma follows the mate
            partner = PARTNER.get(o.category)
            if partner in absent and partner[0] != objs[i + 1].colour:
                prefix = " , ".join(x.name for x in objs[: i + 1]) + " ,"
                out.append((s, prefix, partner[0], objs[i + 1].colour))
                break
    return out


@torch.no_grad()
def partner_probability(lm, samples, batch: int) -> dict:
    """Teacher-forced probabilities at the decision point of :func:`decision_prefixes`."""
    tok = lm.processor.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    p_partner, p_next = [], []
    cases = decision_prefixes(samples)
    try:
        for i in range(0, len(cases), batch):
            chunk = cases[i : i + batch]
            enc = lm.processor(text=[lm.format(s.question) + " " + prefix for s, prefix, _, _ in chunk],
                               images=[render(s.scene) for s, _, _, _ in chunk], return_tensors="pt", padding=True)
            probs = lm.model(**enc).logits[:, -1].float().softmax(-1)
            for row, (_, _, partner, nxt) in zip(probs, chunk):
                p_partner.append(row[tok.convert_tokens_to_ids(partner)].item())
                p_next.append(row[tok.convert_tokens_to_ids(nxt)].item())
    finally:
        tok.padding_side = side
    pp, pn = torch.tensor(p_partner), torch.tensor(p_next)
    return {"cases": len(cases), "p_partner_mean": pp.mean().item() if len(cases) else float("nan"),
            "p_partner_median": pp.median().item() if len(cases) else float("nan"),
            "p_next_median": pn.median().item() if len(cases) else float("nan"),
            "partner_likelier": int((pp > pn).sum())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--n", type=int, default=300, help="scenes in each group")
    ap.add_argument("--method", default="none", help="a plugin spec to apply first, e.g. random:keep=0.25")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = mmtoken.load_model(args.model)
    if args.method != "none":
        mmtoken.apply(lm.model, args.method)
    task = get_task("synth-caption")
    paired, other, index = [], [], 0
    while len(paired) < args.n or len(other) < args.n:  # held-out scenes in order (past the split's 500 if needed)
        s = task.sample("test", index)
        index += 1
        group = paired if s.scene.absent_partners() else other
        if len(group) < args.n:
            group.append(s)
    print(f"{args.model}, method {args.method}: {index} held-out scenes scanned; {args.n} in each group")
    for name, group in (("one half of a pair present, its partner absent", paired), ("the other scenes", other)):
        m = measure(lm, group, args.batch)
        print(f"{name}: CHAIR_i {m['chair_i']:.4f}, CHAIR_s {m['chair_s']:.4f}, recall {m['recall']:.3f}, "
              f"{m['captions_naming_absent_partner']} of {m['captions']} captions name an absent partner")
    if args.method == "none":
        q = partner_probability(lm, paired, args.batch)
        print(f"teacher-forced after the present half ({q['cases']} scenes): P(partner's colour) mean "
              f"{q['p_partner_mean']:.3f}, median {q['p_partner_median']:.3f}; P(next object's colour) median "
              f"{q['p_next_median']:.3f}; the partner likelier in {q['partner_likelier']} of {q['cases']}")


if __name__ == "__main__":
    main()
