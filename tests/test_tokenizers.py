import pytest
import torch

from mmtoken.errors import MmtokenError
from mmtoken.tokenizers import FSQ, FlexTok, FlexTokConfig, ImageTokenizer, load
from mmtoken.tokenizers.flextok import register_mask


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3], [7]])
def test_fsq_round_trips_its_code_grid(levels):
    fsq = FSQ(levels)
    idx = torch.arange(fsq.codebook_size)
    codes = fsq.indices_to_codes(idx)
    assert torch.equal(fsq.codes_to_indices(codes), idx)
    z = torch.randn(1000, len(levels)) * 3
    q, i = fsq(z)
    assert ((i >= 0) & (i < fsq.codebook_size)).all()
    assert torch.equal(fsq.indices_to_codes(i), q)  # quantised values lie on the grid
    for c, l in enumerate(levels):
        assert len(torch.unique(q[:, c])) <= l


def test_fsq_straight_through_gradient():
    fsq = FSQ([5, 5])
    z = torch.randn(4, 2, requires_grad=True)
    fsq.quantize(z).sum().backward()
    assert z.grad is not None and (z.grad != 0).any()


def _tiny():
    torch.manual_seed(0)
    return FlexTok(FlexTokConfig(image_size=16, patch=4, dim=32, heads=2, enc_layers=2, dec_layers=2, registers=8, levels=[5, 5])).eval()


def test_register_mask_is_causal_last():
    m = register_mask(3, 2)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # patches never see registers
    assert m[3, :4].all() and not m[3, 4]  # register 0: patches + itself
    assert m[4].all()


def test_register_j_ignores_later_registers():
    tok = _tiny()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    ref = tok.encode_latent(x)
    with torch.no_grad():
        tok.registers[:, 5:] += 3.0  # change registers 5..7
    got = tok.encode_latent(x)
    assert torch.equal(got[:, :5], ref[:, :5]) and not torch.equal(got[:, 5:], ref[:, 5:])


def _decode_ignores_ids_beyond_k(tok, ids, k):
    """Decode ``ids[:, :k]``: changing the ids after ``k`` changes nothing, the ``k + 1``-th token does."""
    a = tok.decode(ids[:, :k], steps=3)
    other = ids.clone()
    other[:, k:] = (other[:, k:] + 7) % 25
    assert torch.equal(a, tok.decode(other[:, :k], steps=3))
    assert not torch.equal(a, tok.decode(ids[:, : k + 1], steps=3))
    assert a.min() >= 0 and a.max() <= 1
    return a


def test_decoding_k_tokens_ignores_registers_beyond_k(tmp_path):
    tok = _tiny()
    with torch.no_grad():
        for p in tok.parameters():  # zero-initialised heads would make every decode equal
            p.add_(torch.randn_like(p) * 0.05)
    ids = tok.encode(torch.rand(2, 3, 16, 16))
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    a = _decode_ignores_ids_beyond_k(tok, ids, 3)
    assert a.shape == (2, 3, 16, 16)
    tok.save_pretrained(str(tmp_path / "t"))
    back = load(str(tmp_path / "t"))
    assert isinstance(back, FlexTok) and torch.equal(back.decode(ids[:, :3], steps=3), a)
    assert torch.isfinite(tok.loss(torch.rand(4, 3, 16, 16) * 2 - 1))


def _tiny_latent():
    torch.manual_seed(0)
    return FlexTok(FlexTokConfig(image_size=32, patch=2, dim=32, heads=2, enc_layers=2, dec_layers=2, registers=8, levels=[5, 5],
                                 latent_channels=4, ae_widths=[8, 16])).eval()


def test_conv_auto_encoder_shapes_and_loss():
    from mmtoken.tokenizers.conv_ae import ConvAutoEncoder

    ae = ConvAutoEncoder(4, [8, 16, 16])
    assert ae.factor == 8
    x = torch.rand(2, 3, 48, 48) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 4, 6, 6) and ae.decode(z).shape == (2, 3, 48, 48)
    loss, rec = ae.loss(x, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss >= rec and all(p.grad is not None for p in ae.parameters())


def test_latent_mode_shapes_freezes_the_auto_encoder_and_ignores_ids_beyond_k(tmp_path):
    tok = _tiny_latent()
    assert tok.side == 8 and tok.grid == 4 and tok.in_ch == 4
    assert not any(p.requires_grad for p in tok.ae.parameters())
    with torch.no_grad():
        for n, p in tok.named_parameters():
            if not n.startswith("ae."):
                p.add_(torch.randn_like(p) * 0.05)
        tok.latent_mean.fill_(0.3)
        tok.latent_std.fill_(2.0)
    x = torch.rand(2, 3, 32, 32)
    z = tok.to_flow(x * 2 - 1)
    assert z.shape == (2, 4, 8, 8)
    assert torch.allclose(tok.from_flow(z), tok.ae.decode(tok.ae.encode(x * 2 - 1)), atol=1e-5)
    ids = tok.encode(x)
    assert ids.shape == (2, 8)
    a = _decode_ignores_ids_beyond_k(tok, ids, 3)
    assert a.shape == (2, 3, 32, 32)
    tok.train()
    loss = tok.loss(x * 2 - 1)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None for p in tok.ae.parameters())
    assert tok.registers.grad is not None and tok.out.weight.grad is not None
    tok.eval()
    tok.save_pretrained(str(tmp_path / "t"), dtype=torch.float16)
    back = load(str(tmp_path / "t"))
    assert torch.equal(back.latent_std, tok.latent_std) and torch.equal(back.encode(x), ids)


@pytest.mark.parametrize("p_pure", [0.0, 1.0])
def test_pure_noise_share_sets_the_flow_time_to_one(p_pure, monkeypatch):
    tok = _tiny()
    tok.config.p_pure_noise = p_pure
    seen = []
    real = tok.velocity

    def spy(x_t, t, codes, keep):
        seen.append(t.clone())
        return real(x_t, t, codes, keep)

    monkeypatch.setattr(tok, "velocity", spy)
    tok.loss(torch.rand(32, 3, 16, 16) * 2 - 1, torch.Generator().manual_seed(0))
    assert bool((seen[0] == 1).all()) == (p_pure == 1.0)


def test_load_refuses_clearly(tmp_path):
    with pytest.raises(MmtokenError, match="no tokenizer"):
        load(str(tmp_path / "missing"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "image_tokenizer.json").write_text('{"kind": "nope", "config": {}}')
    with pytest.raises(MmtokenError, match="field 'kind'"):
        ImageTokenizer.from_pretrained(str(tmp_path / "bad"))


def test_flextok_training_script_quick_mode(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "train_flextok.py"), "--quick", "--out", str(tmp_path), "--threads", "1"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load(str(tmp_path / "tokenizer"))
    assert tok.encode(torch.rand(1, 3, 48, 48)).shape == (1, 8)
    # the second phase of the shipped recipe: continue that tokenizer as a rectified flow
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "train_flextok.py"), "--quick", "--out", str(tmp_path / "flow"),
                        "--init", str(tmp_path / "tokenizer"), "--p-pure-noise", "0.3", "--threads", "1"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    flow = load(str(tmp_path / "flow" / "tokenizer"))
    assert flow.config.p_pure_noise == 0.3 and torch.equal(flow.latent_std, tok.latent_std)
    for a, b in zip(flow.ae.parameters(), tok.ae.parameters()):
        assert torch.equal(a, b)  # the auto-encoder stays frozen


def test_flextok_script_parallel_latent_cache_and_ae_from_a_folder(tmp_path):
    """Scenes rendered by worker processes give the same cached latents, in the same order, as rendered
    here; ``--ae-from`` takes a saved tokenizer folder as well as an ``ae.safetensors``."""
    script = _train_flextok_script()
    torch.manual_seed(0)
    cfg = FlexTokConfig(image_size=32, patch=2, dim=32, heads=2, enc_layers=1, dec_layers=1, registers=4, levels=[5, 5],
                        latent_channels=4, ae_widths=[8, 8])
    tok = FlexTok(cfg).eval()
    serial = script.cache_latents(tok, 10, 32, seed=3, chunk=4)
    parallel = script.cache_latents(tok, 10, 32, seed=3, chunk=4, workers=2)
    assert serial.shape == (10, 4, 8, 8) and torch.equal(serial, parallel)
    tok.save_pretrained(str(tmp_path / "tok"), dtype=torch.float16)  # as the shipped folders are stored
    other = FlexTok(cfg)
    assert not all(torch.equal(a, b.half().float()) for a, b in zip(other.ae.parameters(), tok.ae.parameters()))
    script.load_ae(other, str(tmp_path / "tok"))
    assert all(a.dtype == torch.float32 and torch.equal(a, b.half().float()) for a, b in zip(other.ae.parameters(), tok.ae.parameters()))


def _train_flextok_script():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("train_flextok", os.path.join(root, "scripts", "train_flextok.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_flextok_step_budget_fits_the_step_count_to_the_minutes():
    """``--minutes``: a fake clock at 0.5 s a step after 10 s of warm-up, 5 minutes of budget."""
    budget = _train_flextok_script().StepBudget(5.0)
    clock = lambda step: 10.0 + 0.5 * (step - 20)  # noqa: E731
    refits = []
    for step in range(1, 1000):
        if budget.due(step, clock(step)):
            r = budget.clock(step, clock(step))
            if r:
                refits.append(r)
    assert [r["step"] for r in refits] == [120, 151]  # at step 120, then once a quarter (75 s) has passed
    for r in refits:
        assert r["s_per_step"] == 0.5 and r["steps"] == 20 + int((300 - 10) / 0.5)  # 600 steps end at 300 s
    # a pace that slows after the first fit moves the count down; never below the step after the current one
    budget = _train_flextok_script().StepBudget(1.0)
    assert budget.due(20, 1.0) and budget.clock(20, 1.0) is None
    assert budget.clock(120, 11.0)["steps"] == 120 + int((60 - 11.0) / 0.1)
    assert not budget.due(121, 14.0) and budget.due(121, 16.0)
    assert budget.clock(121, 70.0)["steps"] == 122  # over budget: one more step evaluates and saves
    assert not budget.due(500, 100.0)  # re-fitted once only


def test_flextok_script_refuses_cuda_without_a_gpu(tmp_path):
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "train_flextok.py"), "--quick", "--out", str(tmp_path),
                        "--device", "cuda"], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600)
    assert r.returncode != 0 and "--device cuda: this torch sees no CUDA device" in r.stderr


def test_psnr_and_ssim_on_known_cases():
    from mmtoken.tokenizers.evaluate import psnr, ssim

    a = torch.rand(2, 3, 24, 24)
    assert torch.allclose(ssim(a, a), torch.ones(2), atol=1e-5)
    b = (a + 0.1).clamp(0, 1)
    assert (ssim(a, b) < 1).all()
    assert torch.allclose(psnr(torch.zeros(1, 3, 4, 4), torch.full((1, 3, 4, 4), 0.1)), torch.tensor([20.0]), atol=1e-4)


def test_flextok_nested_probs_weight_the_kept_prefix_lengths():
    tok = _tiny()  # 8 registers: k in 1, 2, 4, 8
    tok.config.p_uncond = 0.0
    seen = []
    real = tok.velocity
    tok.velocity = lambda x_t, t, codes, keep: seen.append(keep.clone()) or real(x_t, t, codes, keep)
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    tok.loss(x, torch.Generator().manual_seed(0))
    assert set(seen[-1].tolist()) == {1, 2, 4, 8}  # uniform by default (the paper)
    tok.config.nested_probs = [0.0, 0.0, 0.0, 1.0]
    tok.loss(x, torch.Generator().manual_seed(0))
    assert seen[-1].tolist() == [8] * 64
    tok.config.nested_probs = [0.5, 0.5]
    with pytest.raises(ValueError, match="nested_probs has 2 entries"):
        tok.loss(x)


def _condition_decoder(tok):
    """Random weights in the decoder's zero-initialised (adaLN-zero) layers: untrained, it would ignore its
    registers and its noise, so guidance and decoding seeds would change nothing."""
    torch.manual_seed(0)
    for m in (tok.out, tok.out_ada[1], *(blk.ada[1] for blk in tok.dec)):
        torch.nn.init.normal_(m.weight, std=0.2)
    return tok


def test_tokbench_runs_end_to_end(tmp_path, monkeypatch):
    from mmtoken.models import load_model
    from mmtoken.tokenizers import evaluate as tev

    tok = _tiny()
    tok.config.image_size = 16
    res = tev.evaluate(tok, load_model("tiny-llava"), limit=4, steps=1, batch=2, progress=False)
    ks = [r["k"] for r in res["rows"]]
    assert ks == [0, 0, 1, 2, 4, 8] and all(0 <= r["accuracy"] <= 1 for r in res["rows"])
    files = tev.write(res, str(tmp_path), "tiny")
    assert [r["k"] for r in __import__("json").loads((tmp_path / "summary.json").read_text())["rows"]] == ks
    table = (tmp_path / "summary.md").read_text().split("\n\n")[0].splitlines()  # the first table
    assert [line.split(" | ")[0] for line in table[2:]] == [f"| {r['label']}" for r in res["rows"]]
    assert {p.name for p in tmp_path.iterdir()} == {__import__("os").path.basename(f) for f in files}
    # several decoding seeds: a row is their mean, each seed kept; per-family accuracy averages to the whole
    _condition_decoder(tok)  # so that the noise, hence the seed, reaches the output
    import mmtoken.benchmarks.runner as runner

    items = __import__("mmtoken.benchmarks.tasks", fromlist=["TASKS"]).TASKS["synth-vqa"].items(6)
    families = [it.meta["family"] for it in items]
    favoured = families[0]  # a fake model that answers this family's questions right and no other's

    def fake_answers(lm, chunk, max_new, device):
        return [it.answers[0] if it.meta["family"] == favoured else "?" for it in chunk], None, None

    with monkeypatch.context() as patch:
        patch.setattr(runner, "answer_batch", fake_answers)
        res = tev.evaluate(tok, load_model("tiny-llava"), limit=6, steps=2, batch=3, progress=False, seeds=(0, 1))
    assert len(set(families)) > 1
    for r in res["rows"]:
        assert r["families"] == {f: float(f == favoured) for f in set(families)}
        assert r["accuracy"] == families.count(favoured) / 6
    res = tev.evaluate(tok, load_model("tiny-llava"), limit=6, steps=2, batch=3, progress=False, seeds=(0, 1))
    for r in res["rows"]:
        if r["k"]:
            per = r["per_seed"]
            assert [m["seed"] for m in per] == [0, 1] and per[0]["psnr"] != per[1]["psnr"]
            assert abs(r["psnr"] - (per[0]["psnr"] + per[1]["psnr"]) / 2) < 1e-9
    tev.write(res, str(tmp_path / "seeds"), "tiny")
    md = (tmp_path / "seeds" / "summary.md").read_text()
    assert "accuracy per seed" in md and "| family |" in md and "Decoding: 2 Euler steps, guidance 1, seeds 0, 1." in md


def test_tokbench_guidance_reaches_the_flextok_decoder_and_is_refused_for_seed():
    from mmtoken.cli import main
    from mmtoken.tokenizers import evaluate as tev

    tok = _condition_decoder(_tiny())
    plain = tev.evaluate(tok, None, limit=4, steps=2, batch=2, progress=False)
    guided = tev.evaluate(tok, None, limit=4, steps=2, batch=2, progress=False, guidance=3.0)
    assert guided["guidance"] == 3.0 and plain["guidance"] == 1.0
    assert all(abs(a["psnr"] - b["psnr"]) > 1e-4 for a, b in zip(plain["rows"][2:], guided["rows"][2:]))
    for flag in (["--guidance", "2"], ["--seeds", "0,1"]):
        with pytest.raises(SystemExit, match="apply to FlexTok"):
            main(["tokbench", "--tokenizer", "tiny-seed", "--model", "", "--limit", "2", *flag])
    with pytest.raises(ValueError, match="apply to FlexTok"):
        tev.evaluate(_tiny_seed(), None, limit=2, progress=False, seeds=(0, 1))
    with pytest.raises(ValueError, match="distinct"):
        tev.evaluate(tok, None, limit=2, progress=False, seeds=(0, 0))


def test_normalized_guidance_is_apg():
    """APG: scale 1 is the conditional velocity; with eta 0 the update is orthogonal to it; the guidance
    direction's norm is capped per image; momentum carries the previous step's direction."""
    from mmtoken.tokenizers.flextok import normalized_guidance

    torch.manual_seed(0)
    c, u = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert torch.equal(normalized_guidance(c, u, 1.0, {}), c)
    upd = (normalized_guidance(c, u, 3.0, {}, momentum=0.0, norm_threshold=0.0) - c) / 2
    assert torch.allclose((upd * c).flatten(1).sum(1), torch.zeros(3), atol=1e-4)  # orthogonal to v_cond
    par = ((c - u) * c).flatten(1).sum(1) / c.flatten(1).pow(2).sum(1)
    assert torch.allclose(upd, (c - u) - par.view(-1, 1, 1, 1) * c, atol=1e-5)
    full = normalized_guidance(c, u, 3.0, {}, momentum=0.0, eta=1.0, norm_threshold=0.0)
    assert torch.allclose(full, u + 3.0 * (c - u), atol=1e-5)  # eta 1 without the cap: plain CFG
    capped = normalized_guidance(c, u, 3.0, {}, momentum=0.0, eta=1.0, norm_threshold=0.5)
    assert torch.allclose(((capped - c) / 2).flatten(1).norm(dim=1), torch.full((3,), 0.5), atol=1e-5)
    # momentum: the running average d_t + m d_(t-1) is kept before the norm cap
    d1, d2, d3 = c - u, torch.full_like(c, 1.0), torch.full_like(c, -2.0)
    state: dict = {}
    normalized_guidance(c, c - d1, 3.0, state, eta=1.0, norm_threshold=0.0)
    second = normalized_guidance(c, c - d2, 3.0, state, eta=1.0, norm_threshold=0.0)
    assert torch.allclose(second, c + 2.0 * (d2 - 0.5 * d1), atol=1e-5)
    third = normalized_guidance(c, c - d3, 3.0, {"average": d2 - 0.5 * d1}, eta=1.0, norm_threshold=0.5)
    expect = d3 - 0.5 * (d2 - 0.5 * d1)
    expect = expect * (0.5 / expect.flatten(1).norm(dim=1)).clamp(max=1.0).view(-1, 1, 1, 1)
    assert torch.allclose(third, c + 2.0 * expect, atol=1e-5)
    state = {}
    normalized_guidance(c, c - d1, 3.0, state, eta=1.0, norm_threshold=0.5)  # capped, but stored whole
    assert torch.allclose(state["average"], d1)
    # in the decoder: the conditional velocity first, one running average over the steps; deterministic,
    # and an image's decoding does not depend on its batch
    from mmtoken.tokenizers import flextok as ft

    tok = _condition_decoder(_tiny())
    ids = tok.encode(torch.rand(3, 3, 16, 16))
    apg = tok.decode(ids, steps=3, guidance=4.0, norm_guidance=True)
    assert not torch.allclose(apg, tok.decode(ids, steps=3, guidance=4.0))
    assert torch.equal(apg, tok.decode(ids, steps=3, guidance=4.0, norm_guidance=True))
    assert torch.allclose(tok.decode(ids[:1], steps=3, guidance=4.0, norm_guidance=True), apg[:1], atol=1e-5)
    codes = tok.fsq.indices_to_codes(ids)
    keep = torch.full((3,), ids.shape[1])
    x = torch.randn(3, tok.in_ch, tok.side, tok.side, generator=torch.Generator().manual_seed(0))
    ts, state = torch.linspace(1.0, 0.0, 4), {}
    with torch.no_grad():
        for i in range(3):
            t = ts[i].expand(3)
            v = ft.normalized_guidance(tok.velocity(x, t, codes, keep), tok.velocity(x, t, codes, 0 * keep), 4.0, state)
            x = x - (ts[i] - ts[i + 1]) * v
    assert torch.allclose(apg, (tok.from_flow(x).clamp(-1, 1) + 1) / 2, atol=1e-5)
    with pytest.raises(ValueError, match="guidance scale other than 1"):
        tok.decode(ids, norm_guidance=True)


def test_tokbench_norm_guidance_flag():
    from mmtoken.cli import main
    from mmtoken.tokenizers import evaluate as tev

    tok = _condition_decoder(_tiny())
    res = tev.evaluate(tok, None, limit=4, steps=2, batch=2, progress=False, guidance=3.0, norm_guidance=True)
    plain = tev.evaluate(tok, None, limit=4, steps=2, batch=2, progress=False, guidance=3.0)
    assert res["norm_guidance"] and not plain["norm_guidance"]
    assert all(a["psnr"] != b["psnr"] for a, b in zip(plain["rows"][2:], res["rows"][2:]))  # it reaches the decoder
    with pytest.raises(SystemExit, match="guidance scale other than 1"):
        main(["tokbench", "--tokenizer", "tiny-flextok", "--model", "", "--limit", "2", "--norm-guidance"])


def _tiny_seed(gen_grid=0):
    from mmtoken.tokenizers import Seed, SeedConfig

    torch.manual_seed(0)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 4}
    return Seed(SeedConfig(image_size=16, vision=vision, dim=32, heads=2, qformer_layers=2, decoder_layers=1, queries=6,
                           code_dim=8, codes=16, pixel_base=4, gen_grid=gen_grid)).eval()


def test_seed_query_mask_is_strictly_causal():
    tok = _tiny_seed()
    feats, _ = tok.vit_features(torch.rand(2, 3, 16, 16))
    ref = tok.qformer_out(feats)
    with torch.no_grad():
        tok.queries[:, 3] += 1.0  # change query 3
    got = tok.qformer_out(feats)
    assert torch.equal(got[:, :3], ref[:, :3]) and not torch.allclose(got[:, 3:], ref[:, 3:])


@pytest.mark.parametrize("gen_grid", [0, 2])
def test_seed_encode_decode_save_load_and_training_losses(tmp_path, gen_grid):
    tok = _tiny_seed(gen_grid)
    x = torch.rand(3, 3, 16, 16)
    ids = tok.encode(x)
    assert ids.shape == (3, 6) and ids.dtype == torch.long and ids.max() < 16
    img = tok.decode(ids)
    assert img.shape == (3, 3, 16, 16) and img.min() >= 0 and img.max() <= 1
    tok.train()
    losses = tok.losses(x)
    losses["loss"].backward()
    assert all(p.grad is None for p in tok.vit.parameters())  # the ViT stays frozen
    assert tok.queries.grad is not None and tok.vq.usage.sum() == 18
    tok.eval()
    tok.save_pretrained(str(tmp_path / "s"))
    back = load(str(tmp_path / "s"))
    assert torch.equal(back.encode(x), ids) and torch.allclose(back.decode(ids), img)


def test_seed_dead_code_restart_moves_only_unused_codes():
    tok = _tiny_seed().train()
    before = tok.vq.usage.clone()
    feats = tok.to_code(tok.qformer_out(tok.vit_features(torch.rand(2, 3, 16, 16))[0]))
    _, ids, _ = tok.vq(feats)
    book = tok.vq.embedding.detach().clone()
    used = torch.unique(ids)
    moved = tok.vq.restart_dead(before, torch.Generator().manual_seed(0))
    assert moved == 16 - used.numel() > 0
    assert torch.equal(tok.vq.embedding[used], book[used])  # codes in use stay where they are
    dead = torch.tensor([i for i in range(16) if i not in used.tolist()])
    z = torch.nn.functional.normalize(feats.detach().reshape(-1, 8), dim=-1)
    nearest = (torch.nn.functional.normalize(tok.vq.embedding[dead].detach(), dim=-1) @ z.t()).max(-1).values
    assert (nearest > 0.99).all()  # each restarted code sits on an encoder output of the batch
    assert tok.vq.restart_dead(tok.vq.usage.clone() - 1) == 0  # every code used since the snapshot: none move


def test_seed_training_script_quick_mode(tmp_path):
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "scripts", "train_seed.py"), "--quick", "--out", str(tmp_path), "--threads", "1"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=root), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    tok = load(str(tmp_path / "tokenizer"))
    assert tok.encode(torch.rand(1, 3, 96, 96)).shape == (1, 32)


def test_builtin_names_are_image_tokenizers_only():
    from mmtoken.tokenizers import builtin_tokenizers

    assert "tiny-llava" not in builtin_tokenizers()  # a model folder (with a text tokenizer) is not one


def test_half_precision_storage_loads_back_as_float32(tmp_path):
    import os

    from safetensors import safe_open

    tok = _tiny_seed()
    tok.vq.usage[:] = 70001  # beyond float16's range: counts must stay integers
    tok.save_pretrained(str(tmp_path / "full"))
    tok.save_pretrained(str(tmp_path / "half"), dtype=torch.float16)
    assert os.path.getsize(tmp_path / "half" / "model.safetensors") < 0.6 * os.path.getsize(tmp_path / "full" / "model.safetensors")
    with safe_open(str(tmp_path / "half" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("vq.usage").dtype == torch.int64 and f.get_tensor("to_code.weight").dtype == torch.float16
    back = load(str(tmp_path / "half"))
    assert back.to_code.weight.dtype == torch.float32 and torch.equal(back.vq.usage, tok.vq.usage)
    for (name, a), b in zip(tok.state_dict().items(), back.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-2, rtol=1e-3), name
