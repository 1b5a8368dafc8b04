import pytest
import torch

import mmtoken
from mmtoken.plugins.corrcomp import corrcomp_select, information_density, iqr_outliers
from mmtoken.testing import make_batch, make_next_batch, select_rows


def test_iqr_outliers():
    s = torch.tensor([1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0, 9.0])
    assert iqr_outliers(s).tolist() == [7]


def test_blank_view_has_density_near_zero_and_keeps_fewest():
    blank = torch.ones(64, 8) + 1e-4 * torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    distinct = torch.eye(64)[:, :64]
    assert information_density(blank, 0.9) == 0.0
    assert information_density(distinct, 0.9) == 1.0
    attn = torch.full((64,), 1 / 64)
    keep_blank = corrcomp_select(attn, attn, blank, 0.9, seed=0)
    keep_distinct = corrcomp_select(attn, attn, distinct, 0.9, seed=0)
    assert keep_blank.numel() == 1 and keep_distinct.numel() == 64


def test_sampling_is_seeded():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(50, 16, generator=g)
    attn = torch.rand(50, generator=g)
    a = corrcomp_select(attn, attn, keys, 0.95, seed=3, n_sample=10)
    assert torch.equal(a, corrcomp_select(attn, attn, keys, 0.95, seed=3, n_sample=10))
    assert set(iqr_outliers(attn).tolist()) <= set(a.tolist())


@pytest.mark.parametrize("which", ["llava", "next"])
def test_batch_equals_single_and_keep_all(llava, llava_next, which):
    model = llava if which == "llava" else llava_next
    batch = make_batch(model, 3, seed=2) if which == "llava" else make_next_batch(model, [(64, 128), (128, 128)], seed=2)
    with torch.no_grad():
        ref = model(**batch).logits[:, -1]
    with mmtoken.apply(model, "corrcomp:keep=1.0"), torch.no_grad():
        assert torch.equal(model(**batch).logits[:, -1], ref)
    with mmtoken.apply(model, "corrcomp") as h, torch.no_grad():
        logits = model(**batch).logits[:, -1]
        for i in range(batch["input_ids"].shape[0]):
            assert torch.allclose(model(**select_rows(batch, i)).logits[0, -1], logits[i], atol=1e-4)
    assert all(o <= i for o, i in zip(h.stats.image_tokens_out, h.stats.image_tokens_in))
