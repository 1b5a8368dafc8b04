"""The pure tensor functions of the baseline plugins, on inputs whose answer is known by hand."""

import torch

import mmtoken

from mmtoken.plugins.fastv import fastv_keep
from mmtoken.plugins.pool import pool_grid
from mmtoken.plugins.random import random_subset
from mmtoken.plugins.tome import bipartite_merge, merge_schedule
from mmtoken.plugins.visionzip import visionzip_select


def test_random_subset_is_seeded_sorted_and_distinct():
    a = random_subset(100, 10, seed=3)
    assert torch.equal(a, random_subset(100, 10, seed=3))
    assert not torch.equal(a, random_subset(100, 10, seed=4))
    assert a.unique().numel() == 10 and torch.all(a[1:] > a[:-1])


def test_pool_grid_2x2_means():
    feats = torch.arange(16, dtype=torch.float32).view(16, 1)
    idx = torch.arange(16)
    first, pooled = pool_grid(feats, idx // 4, idx % 4, 2, 2, (4, 4))
    assert first.tolist() == [0, 2, 8, 10]
    assert pooled.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_fastv_keeps_text_and_top_attended_image_tokens():
    image = torch.tensor([[False, True, True, True, True, False]])
    valid = torch.ones_like(image)
    scores = torch.tensor([[0.0, 0.1, 0.5, 0.05, 0.3, 0.0]])
    (keep,) = fastv_keep(scores, image, valid, [2])
    assert keep.tolist() == [0, 2, 4, 5]


def test_tome_merges_the_most_similar_pair_and_conserves_size():
    # tokens: CLS, then four; token 1 (A) and 2 (B) are identical, 3 (A) is orthogonal to everything in B
    keys = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0.1]]])
    x = torch.tensor([[[9.0], [1.0], [3.0], [5.0], [7.0]]])
    sizes = torch.ones(1, 5)
    pos = torch.tensor([[-1, 0, 1, 2, 3]])
    x2, s2, p2 = bipartite_merge(x, keys, sizes, pos, r=1, protect_first=True)
    assert p2.tolist() == [[-1, 0, 2, 3]]
    assert s2.tolist() == [[1.0, 2.0, 1.0, 1.0]]
    assert x2.flatten().tolist() == [9.0, 2.0, 5.0, 7.0]
    assert s2.sum() == sizes.sum()


def test_tome_never_merges_cls():
    keys = torch.ones(1, 7, 4)  # everything identical: CLS would merge first if allowed
    x = torch.randn(1, 7, 2)
    x2, s2, p2 = bipartite_merge(x, keys, torch.ones(1, 7), torch.arange(7)[None] - 1, r=3, protect_first=True)
    assert p2[0, 0] == -1 and s2[0, 0] == 1 and torch.equal(x2[0, 0], x[0, 0])


def test_merge_schedule_hits_the_target_evenly():
    s = merge_schedule(577, 23, 576 - 144)
    assert sum(s) == 432 and max(s) - min(s) <= 1
    s = merge_schedule(17, 2, 14)  # at most half of the 16 mergeable tokens in layer 0; the last takes the rest
    assert s == [7, 7]


def test_visionzip_dominant_and_contextual():
    cls = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.0, 0.05])
    keys = torch.tensor([[1.0, 0], [0, 1], [1, 0.1], [0, 1], [0.9, 0.1], [0.1, 1]])
    vf = torch.arange(6, dtype=torch.float32).view(6, 1)
    dom, ctx = visionzip_select(cls, keys, vf, n_dominant=2, n_contextual=2, num_heads=1)
    assert sorted(dom.tolist()) == [1, 3]
    # rest = [0, 2, 4, 5]; targets every 2nd of the rest: tokens 0 and 4. Token 2 (key [1, .1]) is closer
    # to 4 ([.9, .1]) than to 0 ([1, 0]); token 5 ([.1, 1]) too. So the groups are {0} and {4, 2, 5}.
    assert torch.allclose(ctx.flatten(), torch.tensor([0.0, (4 + 2 + 5) / 3]))


def test_a_token_count_is_shared_among_an_images_views():
    from mmtoken.plugins.visionzip import VisionZipConfig

    c = VisionZipConfig(tokens=30)
    assert c.view_budgets([144]) == [30]
    got = c.view_budgets([144, 144, 144, 100])
    assert sum(got) == 30 and got[:3] == [8, 8, 8] and got[3] == 6  # by size, largest remainders
    assert c.view_budgets([1, 144]) == [1, 29]  # every view keeps at least one token
    assert VisionZipConfig(tokens=2).view_budgets([144, 144, 144]) == [1, 1, 1]  # at least one per view
    assert VisionZipConfig(keep=0.25).view_budgets([144, 100]) == [36, 25]  # keep applies to each view


def test_anyres_token_budgets_are_per_image_for_every_plugin(llava_next):
    """``tokens=n`` counts per image on AnyRes models too: view-wise plugins keep about what a random
    subset of n tokens keeps (the same n content tokens, newlines aside)."""
    from mmtoken.testing import make_next_batch

    s = llava_next.config.vision_config.image_size
    batch = make_next_batch(llava_next, [(2 * s, s), (s, s)], seed=7)

    def kept(spec):
        with torch.no_grad(), mmtoken.apply(llava_next, spec) as h:
            llava_next(**batch)
            return h.stats.image_tokens_out

    ref = kept("random:tokens=30")
    for spec in ("visionzip:tokens=30", "corrcomp:tokens=30", "vmtc:tokens=30"):
        assert all(abs(a - r) <= 0.2 * r for a, r in zip(kept(spec), ref)), (spec, kept(spec), ref)
    assert all(a <= r for a, r in zip(kept("pool:tokens=30"), ref))  # pooled grids round each side down here
