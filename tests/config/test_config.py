"""The experiment config: every shipped file loads, errors name field and fix, hashes are stable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from peftflow.config.experiment import ExperimentConfig
from peftflow.config.loading import load_config, parse_config
from peftflow.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
# Study files (configs/studies/) are sweeps, not experiments: tests/pipeline/test_study.py
# loads them.
SHIPPED = sorted(path for path in (ROOT / "configs").rglob("*.yaml") if "studies" not in path.parts)


def test_configs_are_shipped():
    assert any(path.name == "demo.yaml" for path in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.name


def test_unknown_field_names_field_and_fix(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.epoch: unknown field; did you mean 'epochs'? valid fields here:" in str(err.value)


def test_bad_value_names_field_and_value():
    with pytest.raises(ConfigError) as err:
        parse_config({"name": "x", "train": {"lr": -1}})
    assert "train.lr" in str(err.value) and "-1" in str(err.value)


def test_missing_name_is_reported():
    with pytest.raises(ConfigError, match="name: required field is missing"):
        parse_config({})


def test_positive_label_must_be_a_label():
    with pytest.raises(ConfigError, match="positive_label 'junk' is not one of labels"):
        parse_config({"name": "x", "data": {"positive_label": "junk"}})


def test_table_source_needs_path():
    with pytest.raises(ConfigError, match="source 'table' needs `path`"):
        parse_config({"name": "x", "data": {"source": "table"}})


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_config_is_frozen():
    cfg = parse_config({"name": "x"})
    with pytest.raises(ValidationError, match="frozen"):
        cfg.seed = 1  # type: ignore[misc]


def test_hash_is_canonical_and_sensitive():
    a = parse_config({"name": "x", "train": {"epochs": 2, "lr": 1e-4}})
    b = parse_config({"train": {"lr": 1e-4, "epochs": 2}, "name": "x"})
    c = parse_config({"name": "x", "train": {"epochs": 3, "lr": 1e-4}})
    assert a.config_hash() == b.config_hash()
    assert a.config_hash() != c.config_hash()
    assert a.run_key("abc") == f"{a.config_hash()}-abc"
    assert a.run_key("abc") != a.run_key("abd")


def test_overrides_apply_dotted_keys(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\n")
    cfg = load_config(path, {"train.epochs": 7, "method.name": "full"})
    assert cfg.train.epochs == 7 and cfg.method.name == "full"


def test_flat_params_are_dotted_strings():
    params = parse_config({"name": "x"}).flat_params()
    assert params["train.lr"] == "5e-05"
    assert params["method.name"] == "lora" and params["method.r"] == "8"
    assert all(isinstance(v, str) for v in params.values())


def test_adalora_schedule_must_leave_room_to_reallocate_ranks():
    from peftflow.config.loading import parse_config
    from peftflow.errors import ConfigError

    base = {"name": "a", "method": {"name": "adalora"}}
    with pytest.raises(ConfigError, match="tinit_ratio \\+ tfinal_ratio = 1"):
        parse_config(
            {
                **base,
                "method": {"name": "adalora", "tinit_ratio": 0.5, "tfinal_ratio": 0.5},
            }
        )
    with pytest.raises(ConfigError, match="target_r=8 exceeds init_r=4"):
        parse_config({**base, "method": {"name": "adalora", "init_r": 4, "target_r": 8}})
    assert parse_config(base).method.tinit_ratio == 0.1
