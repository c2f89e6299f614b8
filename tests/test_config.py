"""Strict, validated config loading."""

from pathlib import Path

import pytest

from dvg_dist.config import ConfigError, load_config
from dvg_dist.dvg import Grid, Mode

# serve-*.yaml are Ray Serve config files (their dvg settings are checked in tests/test_serve.py).
CONFIGS = sorted(
    p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml") if not p.name.startswith("serve-")
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_give_legal_latents(path):
    cfg = load_config(path)
    grid = cfg.latent_grid()
    assert grid.h % cfg.model.spatial_multiple == 0 and grid.w % cfg.model.spatial_multiple == 0


def test_wan_720p_latent_and_defaults():
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "wan2.1-t2v-14b.yaml")
    assert cfg.latent_grid() == Grid(21, 90, 160)
    assert cfg.sampling.mode is Mode.DVG
    assert cfg.dvg.stage_shifts == (None, 9.0, 11.0, 11.0)
    assert cfg.model.shift == 5.0


def test_unknown_key_names_its_path():
    with pytest.raises(ConfigError, match=r"unknown config key dvg\.alhpa"):
        load_config(None, ["dvg.alhpa=3.0"])
    with pytest.raises(ConfigError, match=r"unknown config key bogus"):
        load_config(None, ["bogus.x=1"])


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("sampling.budget=1.5", r"sampling\.budget must be in \(0, 1\]"),
        ("sampling.mode=fast", r"sampling\.mode must be one of"),
        ("dvg.resize=cubic", r"resize must be one of area-anchor"),
        ("sampling.size=1280", r"sampling\.size must be WxH"),
        ("model.cost_model=gpt", r"model\.cost_model must be one of"),
        ("sampling.steps=ten", r"sampling\.steps must be int"),
        ("dvg.boundary_fractions=[0.5, 0.3, 0.7]", r"boundary_fractions must be 3 increasing"),
        ("nonsense", r"override must be key=value"),
    ],
)
def test_bad_values_are_one_line_errors(override, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        load_config(None, [override])
    assert "\n" not in str(info.value)


def test_overrides_parse_yaml_values_and_lists_become_tuples():
    cfg = load_config(None, ["dvg.fixed=[0.7, 0.5]", "sampling.mode=fixed", "dvg.stage_shifts=[5, 9, 11, 11]"])
    assert cfg.dvg.fixed == (0.7, 0.5)
    assert cfg.dvg.stage_shifts == (5.0, 9.0, 11.0, 11.0)
    assert cfg.sampling.mode is Mode.FIXED


def test_frame_rule_and_size_divisibility_are_refused_not_rounded():
    with pytest.raises(ConfigError, match=r"frame_num must be 4k\+1"):
        load_config(None, ["sampling.frame_num=80"]).latent_grid()
    with pytest.raises(ConfigError, match=r"multiple of 16"):
        load_config(None, ["sampling.size=1280x721"]).latent_grid()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
