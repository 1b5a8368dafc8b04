"""Train ``tiny-llava-next`` (AnyRes ``LlavaNextForConditionalGeneration``) on synth-hires and synth-doc, on the CPU.

The model starts from ``tiny-llava``: its ViT, projector and LM load unchanged into a ``LlavaNextConfig``
with 96-px views and pinpoints up to 192 x 192 (a thumbnail + four crops, each crop a quarter of the image at
full resolution, so crop tokens look like the 96-px world the ViT was trained on); only ``image_newline`` is
new. With the ViT frozen, the projector, the newline embedding and the LM learn to answer synth-hires and
synth-doc questions (answer loss, plus the dense grounding and answer-readout losses of
``train_tiny_llava.py``, mapped onto the packed AnyRes token layout).

**Token-drop augmentation** (``--drop``): a share of the training sequences keeps only a random subset of
its visual tokens (keep ratio uniform in [``--min-keep``, 1]); the kept tokens are really removed, so the
LM sees shorter, compacted sequences — what a visual-stage compression plugin feeds it. This teaches the
model to answer from whatever survives instead of relying on a fixed layout, which is what makes
compression methods distinguishable by what they keep.

    python scripts/train_tiny_llava_next.py --out runs/tiny-llava-next           # full recipe
    python scripts/train_tiny_llava_next.py --quick --out /tmp/tln               # a few steps: checks the script

Writes ``OUT/model`` (safetensors + config + tokenizer + processor) and ``OUT/curve.json`` at every
evaluation, so an interrupted run loses at most ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mmtoken.world import get_task, render  # noqa: E402
from mmtoken.world.build import PROMPT, build_next_processor, tiny_llava_next_config, write_world_card  # noqa: E402
from mmtoken.world.tasks import Sample  # noqa: E402
from train_tiny_llava import cosine, drop_tokens, encode_samples, referents  # noqa: E402


def token_boxes(config, image_size: tuple[int, int], canvas: int) -> torch.Tensor:
    """``[T, 4]`` the box (x0, y0, x1, y1, in scene coordinates) each packed visual token of an AnyRes
    image sees, in the model's packing order (thumbnail, then crop rows each ended by a newline); newline
    tokens get an empty box (-1). Assumes an image whose aspect ratio needs no unpadding (square here)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    vc = config.vision_config
    g = vc.image_size // vc.patch_size
    h, w = image_size
    gh, gw = get_anyres_image_grid_shape((h, w), config.image_grid_pinpoints, vc.image_size)
    boxes = []
    step = canvas / g
    for r in range(g):
        for c in range(g):
            boxes.append([c * step, r * step, (c + 1) * step, (r + 1) * step])
    sy, sx = canvas / (gh * g), canvas / (gw * g)
    for r in range(gh * g):
        for c in range(gw * g):
            boxes.append([c * sx, r * sy, (c + 1) * sx, (r + 1) * sy])
        boxes.append([-1.0, -1.0, -1.0, -1.0])
    return torch.tensor(boxes)


def referent_targets(samples, boxes: torch.Tensor) -> torch.Tensor:
    """``[N, T]`` per sample and packed token: 1 when the token covers an object the question is about
    (the object's centre lies in a thumbnail token; a crop token's centre lies in the object's box), -1 for
    newline tokens (no target)."""
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    side = boxes[:, 2] - boxes[:, 0]
    thumb = (side == side[0]).long().cumprod(0).bool()  # the leading tokens with the thumbnail's patch size
    out = torch.zeros(len(samples), len(boxes))
    for i, s in enumerate(samples):
        for o in referents(s.question, s.scene):
            x0, y0, x1, y1 = o.box
            in_crop = (cx >= x0) & (cx <= x1) & (cy >= y0) & (cy <= y1) & ~thumb
            in_thumb = thumb & (boxes[:, 0] <= o.cx) & (o.cx < boxes[:, 2]) & (boxes[:, 1] <= o.cy) & (o.cy < boxes[:, 3])
            out[i, in_crop | in_thumb] = 1.0
    out[:, boxes[:, 0] < 0] = -1.0
    return out


def training_batch(tasks, rng, n_images, q_per_image):
    samples = []
    for seed in rng.integers(0, 5_000_000, size=n_images):
        task = tasks[int(rng.integers(len(tasks)))]
        scene = task.scene_fn(int(seed))
        for _ in range(q_per_image):
            family, question, answer = task.make(scene, rng, int(rng.integers(1 << 30)))
            samples.append(Sample(f"{task.name}/train/{seed}", task.name, scene, question, [answer], family))
    return samples


def lm_loss(model, tok, processor, samples, q_per_image, heads, rng, drop, min_keep, boxes_cache):
    """Answer loss (+ grounding at LM layer 2 and answer readout at layer 3) with the ViT frozen; with
    probability ``drop`` a sequence keeps only a random subset of its visual tokens."""
    grounding, readout = heads
    images = [render(s.scene) for s in samples[::q_per_image]]
    enc = processor.image_processor(images, return_tensors="pt")
    pv, sizes = enc["pixel_values"], enc["image_sizes"]
    inner = model.model
    with torch.no_grad():
        flat = torch.cat([p for p in pv], dim=0)
        hs = inner.vision_tower(flat, output_hidden_states=True).hidden_states[model.config.vision_feature_layer][:, 1:]
    feats = inner.multi_modal_projector(hs).split(pv.shape[1], dim=0)
    packed, _ = inner.pack_image_features(list(feats), sizes, "default", image_newline=inner.image_newline)
    key = tuple(sizes[0].tolist())
    if key not in boxes_cache:
        boxes_cache[key] = token_boxes(model.config, key, samples[0].scene.canvas)
    targets = referent_targets(samples, boxes_cache[key])

    keeps = drop_tokens(rng, [packed[i // q_per_image].shape[0] for i in range(len(samples))], drop, min_keep)
    ids, lab, mask = encode_samples(tok, samples, [len(k) for k in keeps])
    vis = torch.cat([packed[i // q_per_image][keep] for i, keep in enumerate(keeps)], dim=0)
    emb = inner.get_input_embeddings()(ids)
    is_img = ids == model.config.image_token_id
    emb = emb.masked_scatter(is_img.unsqueeze(-1), vis.to(emb.dtype))
    out = model(inputs_embeds=emb, attention_mask=mask, labels=lab, output_hidden_states=True)
    tgt = torch.cat([targets[i][keep] for i, keep in enumerate(keeps)])
    valid = tgt >= 0
    h2 = out.hidden_states[2][is_img]
    aux = F.binary_cross_entropy_with_logits(grounding(h2[valid]).squeeze(-1), tgt[valid], pos_weight=torch.tensor(4.0))
    # readout: referent tokens of one-word answers predict the answer, other visual tokens predict <pad>
    answer = torch.tensor([tok.convert_tokens_to_ids(s.answers[0]) for s in samples])
    per_tok_answer = torch.cat([answer[i].expand(len(keep)) for i, keep in enumerate(keeps)])
    lab_r = torch.where(tgt > 0, per_tok_answer, torch.full_like(per_tok_answer, tok.pad_token_id))
    h3 = out.hidden_states[3][is_img]
    aux = aux + F.cross_entropy(readout(h3[valid]), lab_r[valid])
    return out.loss + aux


@torch.no_grad()
def evaluate(model, tok, processor, task_names, n, batch=25):
    """Held-out exact-match accuracy per task (first answer token), through the processor as users run it."""
    model.eval()
    res = {}
    for name in task_names:
        samples = get_task(name).samples("test", n)
        correct = 0
        for i in range(0, n, batch):
            chunk = samples[i : i + batch]
            enc = processor(images=[render(s.scene) for s in chunk], text=[PROMPT.format(question=s.question) for s in chunk],
                            return_tensors="pt", padding=True)
            logits = model(**enc, logits_to_keep=1).logits[:, -1]
            pred = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
            correct += sum(p == s.answers[0] for p, s in zip(pred, chunk))
        res[name] = correct / n
    model.train()
    return res


def build_model(init: str):
    """``(tok, model)``: a saved tiny-llava-next to continue, or a tiny-llava whose weights seed a new one."""
    from transformers import AutoConfig, AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(init)
    if AutoConfig.from_pretrained(init).model_type == "llava_next":
        return tok, LlavaNextForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    base = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    model = LlavaNextForConditionalGeneration(tiny_llava_next_config(base.config))
    result = model.load_state_dict(base.state_dict(), strict=False)
    if result.unexpected_keys or set(result.missing_keys) != {"model.image_newline"}:
        raise RuntimeError(f"tiny-llava weights do not fit the LLaVA-NeXT config: {result}")
    model.tie_weights()
    return tok, model


def save(model, tok, processor, out, curve, init):
    path = os.path.join(out, "model")
    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.suppress_tokens = [model.config.image_token_id]
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    write_world_card(path, {"trained_by": "scripts/train_tiny_llava_next.py", "init": init, "image_size": 192})
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    model.train()


def main(argv=None):
    from mmtoken.models import resolve

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--init", default="tiny-llava", help="a tiny-llava (seeds a new model) or tiny-llava-next (continues) name or folder")
    p.add_argument("--quick", action="store_true", help="a few steps (checks the script)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--images", type=int, default=8, help="images per step")
    p.add_argument("--questions", type=int, default=2, help="questions per image per step")
    p.add_argument("--tasks", default="synth-hires:1,synth-doc:1", help="image mix, name:weight,...")
    p.add_argument("--drop", type=float, default=0.5, help="share of sequences trained with a random subset of visual tokens")
    p.add_argument("--min-keep", type=float, default=0.1, help="smallest kept share of visual tokens under --drop")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_n, args.images = 2, 2, 10, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)

    init = resolve(args.init)
    tok, model = build_model(init)
    model.set_attn_implementation("sdpa")
    processor = build_next_processor(tok)
    for prm in model.model.vision_tower.parameters():
        prm.requires_grad_(False)
    d = model.config.text_config.hidden_size
    heads = (torch.nn.Linear(d, 1), torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, len(tok))))
    params = [prm for prm in model.parameters() if prm.requires_grad] + [q for h in heads for q in h.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    tasks = []
    for part in args.tasks.split(","):
        name, _, weight = part.partition(":")
        tasks += [get_task(name)] * int(weight or 1)
    names = sorted({t.name for t in tasks})
    curve = {"args": vars(args), "lm": []}
    boxes_cache: dict = {}
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = cosine(step, args.steps, 50, args.lr)
        samples = training_batch(tasks, rng, args.images, args.questions)
        loss = lm_loss(model, tok, processor, samples, args.questions, heads, rng, args.drop, args.min_keep, boxes_cache)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            acc = evaluate(model, tok, processor, names, args.eval_n)
            curve["lm"].append({"step": step + 1, "loss": loss.item(), "s": time.time() - t0} | acc)
            print(f"eval {step + 1} {acc} {time.time() - t0:.0f}s", flush=True)
            save(model, tok, processor, args.out, curve, args.init)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
