import torch

import mmtoken
from mmtoken.plugins.vmtc import cosine_kmeans, vmtc_select
from mmtoken.testing import make_batch, make_next_batch, select_rows


def test_kmeans_separates_two_directions():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.95, 0.0]])
    assign, _ = cosine_kmeans(x, torch.tensor([0, 2]), iters=5)
    assert assign.tolist() == [0, 0, 1, 1, 0]


def test_primary_plus_k_tokens_and_importance_weighted_merge():
    importance = torch.tensor([0.5, 0.1, 0.3, 0.05, 0.05])
    feats = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 2.0]])
    primary, merged = vmtc_select(importance, feats, n_primary=1, k=2, iters=5)
    assert primary.tolist() == [0] and merged.shape == (2, 2)
    # rest by importance: 2 (0.3), 1 (0.1), 3, 4; seeds 2 and 1 -> clusters {2, 4} (y-axis) and {1, 3} (x-axis)
    assert torch.allclose(merged[0], (0.3 * feats[2] + 0.05 * feats[4]) / 0.35)
    assert torch.allclose(merged[1], (0.1 * feats[1] + 0.05 * feats[3]) / 0.15)


def test_budget_batch_equals_single(llava, llava_next):
    batch = make_batch(llava, 3, seed=9)
    with mmtoken.apply(llava, "vmtc:tokens=16") as h, torch.no_grad():
        logits = llava(**batch).logits[:, -1]
        assert h.stats.image_tokens_out == [16, 16, 16]
        for i in range(3):
            assert torch.allclose(llava(**select_rows(batch, i)).logits[0, -1], logits[i], atol=1e-4)
    with mmtoken.apply(llava, "vmtc:primary=10,k=3") as h, torch.no_grad():
        llava(**batch)
        assert h.stats.image_tokens_out == [13, 13, 13]
    nb = make_next_batch(llava_next, [(64, 128), (128, 128)], seed=9)
    with mmtoken.apply(llava_next, "vmtc:keep=0.25"), torch.no_grad():
        logits = llava_next(**nb).logits[:, -1]
        for i in range(2):
            assert torch.allclose(llava_next(**select_rows(nb, i)).logits[0, -1], logits[i], atol=1e-4)
