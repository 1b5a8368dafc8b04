from dataclasses import dataclass

import torch

import mmtoken
from mmtoken import cli, plugin
from mmtoken.tokens import Selection


def test_cli_list_and_demo(capsys):
    assert cli.main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    assert "fastv" in out and "LlavaNextForConditionalGeneration" in out and "keep:" in out
    assert cli.main(["demo", "--batch-size", "1", "--new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "fastv:k=2,keep=0.25" in out and "196/196/49/49/49/49" in out


def test_cli_prefill_small(capsys):
    assert cli.main(["prefill", "--size", "test", "--warmup", "0", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "`fastv:k=2,keep=0.25` | 16 " in out and "`visionzip:keep=0.25` | 16 " in out


def test_entry_point_plugins_are_registered(monkeypatch, llava):
    @dataclass
    class FirstHalfConfig(mmtoken.BudgetConfig):
        pass

    class FirstHalf(mmtoken.Plugin):
        name = "first-half-test"
        stages = ("visual",)
        Config = FirstHalfConfig

        def select(self, tokens):
            return Selection(keep=torch.arange(len(tokens) // 2))

    class EP:
        def load(self):
            return FirstHalf

    monkeypatch.setattr(plugin, "_ENTRY_POINTS_LOADED", False)
    monkeypatch.setattr(plugin.metadata, "entry_points", lambda group: [EP()] if group == plugin.ENTRY_POINT_GROUP else [])
    try:
        assert "first-half-test" in mmtoken.list_plugins()
        from mmtoken.testing import make_batch

        with mmtoken.apply(llava, "first-half-test") as h, torch.no_grad():
            llava(**make_batch(llava, 1))
            assert h.stats.image_tokens_out == [32]
    finally:
        plugin._REGISTRY.pop("first-half-test", None)
