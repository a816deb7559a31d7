"""QuantConfig: validation, and TOML files that load into the dataclass and save back unchanged."""

import pytest

from onnxq.config import (
    ActivationType,
    CalibrationMethod,
    PerTensor,
    QuantConfig,
    config_from_dict,
    dump_config,
    load_config,
)
from onnxq.errors import ConfigError


def test_toml_round_trip(tmp_path):
    config = QuantConfig(method=CalibrationMethod.ENTROPY, activation_type=ActivationType.INT8,
                         weight_granularity=PerTensor(), exclude=("Softmax", "*attn*"), seed=7,
                         min_cosine=0.98, max_feeds=100)
    path = tmp_path / "onnxq.toml"
    path.write_text(dump_config(config))
    loaded = load_config(path)
    assert loaded == config
    assert dump_config(loaded) == path.read_text()


def test_defaults_round_trip(tmp_path):
    path = tmp_path / "default.toml"
    path.write_text(dump_config(QuantConfig()))
    assert load_config(path) == QuantConfig()


@pytest.mark.parametrize("values, message", [
    ({"methd": "mse"}, "unknown config key"),
    ({"method": "best"}, "not one of"),
    ({"weight_granularity": "per_row"}, "not one of"),
    ({"percentile": 20.0}, "percentile"),
    ({"holdout": -1}, "holdout"),
    ({"exclude": "Softmax"}, "exclude"),
])
def test_invalid_values_are_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(values)


def test_bad_toml_is_one_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("method = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_config_is_frozen():
    with pytest.raises(AttributeError):
        QuantConfig().seed = 3  # type: ignore[misc]
