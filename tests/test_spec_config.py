import json

import pytest

import mmtoken
from mmtoken.errors import ConfigError, SpecError
from mmtoken.plugin import build_plugins, get_plugin_class, parse_spec


def test_parse_spec_forms():
    assert parse_spec("fastv") == [("fastv", {})]
    assert parse_spec("fastv:k=2,keep=0.5") == [("fastv", {"k": "2", "keep": "0.5"})]
    assert parse_spec("tome:r=8+fastv:k=2") == [("tome", {"r": "8"}), ("fastv", {"k": "2"})]


@pytest.mark.parametrize("bad", ["", "fastv:", "fastv:k", "fastv:k=2,0.5", "Fast V", "fastv:k=1,k=2", "+fastv"])
def test_malformed_specs(bad):
    with pytest.raises(SpecError):
        parse_spec(bad)


def test_unknown_plugin_names_the_available_ones():
    with pytest.raises(SpecError, match="available: .*fastv"):
        build_plugins("nosuch:keep=0.5")


@pytest.mark.parametrize(
    "spec",
    ["fastv:keep=1.5", "fastv:keep=0", "fastv:k=0", "fastv:k=1.5", "fastv:nope=1", "fastv:keep=0.5,tokens=3",
     "fastv:r=0.5,keep=0.5", "pool:stride=0", "tome:r=-1", "fastv:queries=first", "random:keep=abc"],
)
def test_bad_parameters(spec):
    with pytest.raises(ConfigError):
        build_plugins(spec)


def test_list_plugins_has_the_baselines():
    names = mmtoken.list_plugins()
    for n in ["random", "pool", "visionzip", "fastv", "tome", "oracle", "oracle-llm"]:
        assert n in names


@pytest.mark.parametrize("name", ["random", "pool", "visionzip", "fastv", "tome", "oracle", "oracle-llm"])
def test_config_json_round_trip(name):
    cls = get_plugin_class(name)
    cfg = cls.Config.from_params({"keep": "0.25"})
    again = cls.Config.from_json(cfg.to_json())
    assert again == cfg
    assert json.loads(cfg.to_json())["keep"] == 0.25
    assert build_plugins(cfg.to_spec())[0].config == cfg


def test_keyword_params_override_and_are_single_plugin_only():
    (p,) = build_plugins("fastv:k=2", k=3)
    assert p.config.k == 3
    with pytest.raises(SpecError):
        build_plugins("tome+fastv", k=3)


def test_budget_mapping():
    (p,) = build_plugins("fastv:keep=0.25")
    assert p.config.n_keep(576) == 144
    (p,) = build_plugins("fastv:tokens=64")
    assert p.config.n_keep(576) == 64
    (p,) = build_plugins("fastv:r=0.75")
    assert p.config.n_keep(576) == 144
