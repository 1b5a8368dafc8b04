"""The hook layer on a tiny random LLaVA-NeXT (AnyRes) model."""

import pytest
import torch

import mmtoken
from mmtoken.testing import make_next_batch, select_rows
from mmtoken.tokens import Selection

SIZES = [(64, 128), (128, 128), (128, 64)]
KEEP_ALL = ["random:keep=1.0", "pool:stride=1", "visionzip:keep=1.0,contextual_ratio=0", "fastv:keep=1.0"]
COMPRESSING = ["random:keep=0.25", "pool", "visionzip:keep=0.25", "fastv:k=2,keep=0.25", "random:keep=0.5+fastv:k=1,keep=0.5",
               "tome:keep=0.5", "tome:keep=0.5+random:keep=0.5+fastv:k=1,keep=0.5"]


def _run(model, batch, new_tokens=6):
    with torch.no_grad():
        logits = model(**batch).logits[:, -1]
        ids = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return logits, ids


@pytest.fixture(scope="module")
def batch(llava_next):
    return make_next_batch(llava_next, SIZES, seed=3)


@pytest.fixture(scope="module")
def reference(llava_next, batch):
    return _run(llava_next, batch)


@pytest.mark.parametrize("spec", KEEP_ALL)
def test_keep_everything_is_identical(llava_next, batch, reference, spec):
    with mmtoken.apply(llava_next, spec):
        logits, ids = _run(llava_next, batch)
    assert torch.equal(logits, reference[0]) and torch.equal(ids, reference[1])


@pytest.mark.parametrize("spec", COMPRESSING)
def test_batch_equals_single_and_remove_restores(llava_next, batch, reference, spec):
    with mmtoken.apply(llava_next, spec):
        logits, ids = _run(llava_next, batch)
        for i in range(len(SIZES)):
            l1, g1 = _run(llava_next, select_rows(batch, i))
            assert torch.allclose(l1[0], logits[i], atol=1e-4), spec
            assert torch.equal(g1[0, -6:], ids[i, -6:]), spec
    logits, ids = _run(llava_next, batch)
    assert torch.equal(logits, reference[0]) and torch.equal(ids, reference[1])


def test_crop_geometry_and_newlines(llava_next, batch):
    """Every crop's tokens carry their view and grid position; newlines end the kept rows."""
    seen = {}

    class Probe(mmtoken.Plugin):
        name = "probe"
        stages = ("visual",)

        def select(self, tokens):
            seen.setdefault("tokens", []).append(tokens)
            keep = (tokens.segment == 0) | (tokens.row == 0)  # base view + the first patch row of every crop
            return Selection(keep=keep.nonzero().flatten())

    with mmtoken.apply(llava_next, Probe(mmtoken.PluginConfig())) as h, torch.no_grad():
        llava_next(**batch)
    cfg = llava_next.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    side = cfg.image_size // cfg.patch_size
    t_wide, t_square, t_tall = seen["tokens"]
    assert t_square.crop_grid == (2, 2) and int((t_square.segment == 0).sum()) == n
    assert sorted(set(t_square.segment.tolist())) == [0, 1, 2, 3, 4]
    # the square image: 2x2 crops, base + first row of each crop; rows with tokens: rows 0 and `side` of the
    # 2*side-row grid, each ended by a newline: n + 4*side tokens + 2 newlines
    assert h.stats.image_tokens_out[1] == n + 4 * side + 2
    assert h.stats.image_tokens_in[1] == n + (2 * side) * (2 * side + 1)


class NoMerge(mmtoken.Plugin):
    """A vision-stage plugin that merges nothing: exercises the merge-aware packing on full grids."""

    name = "no-merge-test"
    stages = ("vision",)

    def vision_layers(self, n_layers, n_tokens):
        return [0]

    def vision_merge(self, ctx):
        pass


def test_merge_aware_packing_equals_the_models_packing(llava_next, batch, reference):
    with mmtoken.apply(llava_next, NoMerge(mmtoken.PluginConfig())):
        logits, ids = _run(llava_next, batch)
        assert "pack_image_features" in llava_next.model.__dict__
    assert torch.equal(logits, reference[0]) and torch.equal(ids, reference[1])
    assert "pack_image_features" not in llava_next.model.__dict__


def test_tome_halves_every_view(llava_next, batch):
    with mmtoken.apply(llava_next, "tome:keep=0.5") as h, torch.no_grad():
        llava_next(**batch)
    cfg = llava_next.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    # the square image: 5 views of n patches -> n/2 each; its 2x2 crops form 2*side rows, each kept
    side = cfg.image_size // cfg.patch_size
    assert h.stats.image_tokens_out[1] == 5 * n // 2 + 2 * side
