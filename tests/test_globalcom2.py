import pytest
import torch

import mmtoken
from mmtoken.plugins.globalcom2 import crop_budgets, global_scores
from mmtoken.testing import make_batch, make_next_batch, select_rows


def test_the_salient_crop_gets_the_largest_budget_and_budgets_average_to_r():
    thumb = torch.zeros(4, 4)
    thumb[:2, :2] = 5.0  # all saliency in the top-left quarter = crop 0 of a 2 x 2 grid
    r, tau = 0.25, 1.0
    scale = crop_budgets(thumb, (2, 2), r, tau)
    assert int(scale.argmax()) == 0 and torch.all(scale[0] > scale[1:])
    s = torch.tensor([20.0, 0, 0, 0])
    sigma = torch.softmax((s - s.max()) / tau, 0)
    assert torch.allclose(scale, torch.clamp(r * (1 + sigma - sigma.mean()), max=1))
    assert float((r * (1 + sigma - sigma.mean())).mean()) == pytest.approx(r)


def test_uniform_thumbnail_gives_every_crop_r():
    scale = crop_budgets(torch.ones(6, 6), (2, 3), 0.3, 10.0)
    assert torch.allclose(scale, torch.full((6,), 0.3))


def test_global_scores_cover_the_crop_canvas():
    g = global_scores(torch.arange(16.0).view(4, 4), (2, 2), (4, 4))
    assert g.shape == (8, 8)
    assert g[0, 0] < g[-1, -1]


SIZES = [(64, 128), (128, 128), (128, 64)]


def _run(model, batch, n=4):
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        ids = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return logits, ids


def test_keep_everything_is_identical_on_llava_next(llava_next):
    batch = make_next_batch(llava_next, SIZES, seed=3)
    ref = _run(llava_next, batch)
    with mmtoken.apply(llava_next, "globalcom2:r=1.0,tau=1e9"):
        got = _run(llava_next, batch)
    assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize("spec", ["globalcom2:r=0.25", "globalcom2:keep=0.5,score=probs", "globalcom2:r=0.25,score=norm+fastv:k=1,keep=0.5"])
def test_batch_equals_single_on_llava_next(llava_next, spec):
    batch = make_next_batch(llava_next, SIZES, seed=4)
    with mmtoken.apply(llava_next, spec) as h:
        logits, ids = _run(llava_next, batch)
        n_out = h.stats.image_tokens_out
        for i in range(len(SIZES)):
            l1, g1 = _run(llava_next, select_rows(batch, i))
            assert torch.allclose(l1[0], logits[i], atol=1e-4)
            assert torch.equal(g1[0, -4:], ids[i, -4:])
    assert all(o < i for o, i in zip(n_out, h.stats.image_tokens_in))


def test_thumbnail_budget_and_single_view_llava(llava, llava_next):
    batch = make_batch(llava, 2, seed=1)
    with mmtoken.apply(llava, "globalcom2:r=0.25") as h, torch.no_grad():
        llava(**batch)
    assert h.stats.image_tokens_out == [16, 16]
    batch = make_next_batch(llava_next, [(128, 128)], seed=2)
    with mmtoken.apply(llava_next, "globalcom2:r=0.25,tau=1e9") as h, torch.no_grad():
        llava_next(**batch)
    cfg = llava_next.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    side = cfg.image_size // cfg.patch_size
    # uniform budgets (huge tau): thumbnail n/4, each of 4 crops n/4, plus at most one newline per hi-res row
    content = h.stats.image_tokens_out[0]
    assert 5 * n // 4 <= content <= 5 * n // 4 + 2 * side
