import pytest
import torch

import mmtoken
from mmtoken.errors import MmtokenError
from mmtoken.plugins.dyvte import Routers, exit_keep, exit_labels, masked_exit, router_features, train_routers
from mmtoken.testing import make_batch, select_rows


def _last_logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits[:, -1]


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fixed_exit_equals_masking_the_visual_tokens_from_that_layer(llava, layer):
    batch = make_batch(llava, 3, seed=21)
    image = batch["input_ids"] == llava.config.image_token_id
    with masked_exit(llava, layer, image, batch["attention_mask"]):
        ref = _last_logits(llava, batch)
    full = _last_logits(llava, batch)
    assert not torch.allclose(ref, full, atol=1e-4)
    with mmtoken.apply(llava, f"dyvte:mode=fixed,layer={layer}") as h:
        got = _last_logits(llava, batch)
        counts = h.stats.llm_visual_tokens
    assert torch.allclose(got, ref, atol=1e-5)
    assert all(counts[l] == [0, 0, 0] for l in counts if l >= layer)
    assert all(counts[l] == image.sum(-1).tolist() for l in counts if l < layer)


def test_exit_at_layer_0_equals_a_text_only_run_with_the_original_positions(llava):
    batch = make_batch(llava, 1, seed=22)
    ids = batch["input_ids"][0]
    text = ids != llava.config.image_token_id
    emb = llava.get_input_embeddings()(ids[text])[None]
    pos = torch.arange(ids.numel())[text][None]
    with torch.no_grad():
        ref = llava.model.language_model(inputs_embeds=emb, position_ids=pos).last_hidden_state
        ref = llava.lm_head(ref)[:, -1]
    with mmtoken.apply(llava, "dyvte:mode=fixed,layer=0"):
        got = _last_logits(llava, batch)
    assert torch.allclose(got, ref, atol=1e-5)


def test_router_features_and_keep():
    h = torch.arange(2 * 5 * 2, dtype=torch.float).view(2, 5, 2)
    image = torch.tensor([[False, True, True, False, False], [False, False, True, False, False]])
    valid = torch.tensor([[True] * 5, [False, True, True, True, True]])
    last = torch.tensor([4, 4])
    f = router_features(h, image, valid, last, "after")
    assert f[0].tolist() == h[0, 3].tolist() + h[0, 4].tolist()  # text after the image, last excluded: position 3
    f_all = router_features(h, image, valid, last, "all")
    assert f_all[1].tolist() == ((h[1, 1] + h[1, 3]) / 2).tolist() + h[1, 4].tolist()
    keep = exit_keep(image, valid, torch.tensor([True, False]))
    assert keep[0].tolist() == [0, 3, 4] and keep[1].tolist() == [1, 2, 3, 4]


def test_exit_labels_follow_agreement_and_loss_ratio():
    v = 4
    labels = torch.tensor([[-100, 1, 2], [-100, 1, 2]])
    full = torch.zeros(2, 3, v)
    full[:, 0, 1] = 5.0
    full[:, 1, 2] = 5.0
    exited = full.clone()
    exited[1, 1, 2] = -5.0  # sample 1 changes its answer
    assert exit_labels(full, exited, labels).tolist() == [1, 0]
    worse = full.clone()
    worse[0, 0, 1] = 3.0  # same argmax, but a higher loss than 1.03x
    assert exit_labels(full, worse, labels)[0].item() == 0


def _router_file(tmp_path, model, seed):
    torch.manual_seed(seed)
    r = Routers(model.config.text_config.hidden_size, 8, [1, 2, 3], "all")
    path = str(tmp_path / f"routers{seed}.safetensors")
    r.save(path)
    return path


def test_routers_exit_each_sample_at_its_own_layer_batch_equals_single_and_cache(llava, tmp_path):
    batch = make_batch(llava, 4, seed=23)
    found = None
    for seed in range(20):
        for margin in (0.0, 0.05, -0.05, 0.1, -0.1):
            spec = f"dyvte:routers={_router_file(tmp_path, llava, seed)},margin={margin}"
            with mmtoken.apply(llava, spec) as h:
                _last_logits(llava, batch)
                layers = list(h.plugins[0].exit_layers)
            if len(set(layers)) > 1:
                found = spec
                break
        if found:
            break
    assert found, "no router among the seeds gave different exit layers"
    with mmtoken.apply(llava, found) as h, torch.no_grad():
        logits = _last_logits(llava, batch)
        ids = llava.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert torch.equal(llava.generate(**batch, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False), ids)
        for i in range(4):
            one = select_rows(batch, i)
            assert torch.allclose(_last_logits(llava, one)[0], logits[i], atol=1e-4)
            assert torch.equal(llava.generate(**one, max_new_tokens=6, min_new_tokens=6, do_sample=False)[0, -6:], ids[i, -6:])


def test_modes_compose_and_refuse_clearly(llava, tmp_path):
    batch = make_batch(llava, 2, seed=24)
    with mmtoken.apply(llava, "dyvte:mode=attention,threshold=1.0") as h:  # the mass is always below 1: exit at once
        _last_logits(llava, batch)
        assert h.plugins[0].exit_layers == [1, 1]
    with mmtoken.apply(llava, "dyvte:mode=attention,threshold=0.0") as h:
        _last_logits(llava, batch)
        assert h.plugins[0].exit_layers == [-1, -1]
    spec = f"fastv:k=2,keep=0.5+dyvte:routers={_router_file(tmp_path, llava, 0)}"
    with mmtoken.apply(llava, spec) as h:
        _last_logits(llava, batch)
        assert h.stats.llm_visual_tokens[2][0] <= (batch["input_ids"][0] == llava.config.image_token_id).sum() // 2 + 1
    ref = _last_logits(llava, batch)
    with pytest.raises(MmtokenError, match="no trained routers"):
        mmtoken.apply(llava, "dyvte")
    assert torch.equal(_last_logits(llava, batch), ref)


def test_train_routers_learns_a_separable_rule(llava):
    """Routers fit their labels on a batch stream (the model stays frozen)."""
    g = torch.Generator().manual_seed(0)
    before = {k: v.clone() for k, v in llava.state_dict().items()}

    def stream():
        while True:
            b = make_batch(llava, 4, seed=int(torch.randint(1000, (1,), generator=g)))
            labels = b["input_ids"].clone()
            labels[:, :-2] = -100
            b["labels"] = labels
            b["prompt_len"] = torch.full((4,), b["input_ids"].shape[1] - 2)
            yield b

    routers, hist = train_routers(llava, stream(), steps=30, hidden=8, text="all")
    assert len(hist) == 30 and sorted(routers.layers) == [1, 2, 3]
    assert all(torch.equal(v, before[k]) for k, v in llava.state_dict().items())
    assert sum(h["loss"] for h in hist[-10:]) < sum(h["loss"] for h in hist[:10])


def test_router_training_script_quick_mode(tmp_path):
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "r.safetensors"
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "train_dyvte_routers.py"), "--quick", "--out", str(out), "--threads", "1"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    routers = Routers.load(str(out))
    cfg = json.load(open(os.path.join(root, "mmtoken", "checkpoints", "tiny-llava", "config.json")))
    assert routers.layers == list(range(1, cfg["text_config"]["num_hidden_layers"])) and routers.text == "all"
