import torch

import mmtoken
from mmtoken.plugins.tome import bipartite_merge
from mmtoken.testing import make_batch, make_next_batch, select_rows


def test_informative_tokens_are_protected_from_merging():
    # index: 0 CLS, 1 (B, pos 0), 2 (A, pos 1), 3 (B, pos 2), 4 (A, pos 3). A = even indices, B = odd.
    # A2 duplicates B1 (cos 1); A4 is close to B3 (cos 1/sqrt(1.09) = 0.958); the other pairs are far.
    keys = torch.tensor([[[1.0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0.3, 1]]])
    x = torch.arange(5.0).view(1, 5, 1)
    sizes, pos = torch.ones(1, 5), torch.tensor([[-1, 0, 1, 2, 3]])
    _, _, p_tome = bipartite_merge(x, keys, sizes, pos, 1, True)
    assert p_tome.tolist() == [[-1, 0, 2, 3]]  # ToMe merges A2 (pos 1) into B1 (pos 0)
    penalty = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0]])  # A2 is informative (high CLS attention)
    x2, s, p_turbo = bipartite_merge(x, keys, sizes, pos, 1, True, penalty)
    assert p_turbo.tolist() == [[-1, 0, 1, 2]]  # Turbo merges A4 (pos 3) into B3 (pos 2) instead
    assert x2.flatten().tolist() == [0.0, 1.0, 2.0, 3.5]
    assert s.sum() == 5 and s[0, 0] == 1  # sizes conserved, CLS untouched


def test_alpha_zero_is_tome(llava):
    batch = make_batch(llava, 2, seed=5)
    with torch.no_grad():
        with mmtoken.apply(llava, "tome:keep=0.5"):
            a = llava(**batch).logits
        with mmtoken.apply(llava, "turbo:keep=0.5,alpha=0"):
            b = llava(**batch).logits
    assert torch.equal(a, b)


def test_turbo_budget_batch_equals_single_and_one_shot(llava, llava_next):
    batch = make_batch(llava, 3, seed=6)
    for spec in ["turbo:keep=0.25", "turbo:keep=0.25,one_shot=true"]:
        with mmtoken.apply(llava, spec) as h, torch.no_grad():
            logits = llava(**batch).logits[:, -1]
            assert h.stats.image_tokens_out == [16, 16, 16]
            for i in range(3):
                assert torch.allclose(llava(**select_rows(batch, i)).logits[0, -1], logits[i], atol=1e-4)
    nb = make_next_batch(llava_next, [(64, 128), (128, 128)], seed=6)
    with mmtoken.apply(llava_next, "turbo:keep=0.5"), torch.no_grad():
        logits = llava_next(**nb).logits[:, -1]
        for i in range(2):
            assert torch.allclose(llava_next(**select_rows(nb, i)).logits[0, -1], logits[i], atol=1e-4)
