"""QuantConfig: validation, and TOML files that load into the dataclass and save back unchanged."""

import pytest

from onnxq.config import (
    ActivationType,
    Allocator,
    CalibrationMethod,
    ComqConfig,
    DamageMeasure,
    PerTensor,
    QuantConfig,
    RtnConfig,
    SensitivityBase,
    WeightMethod,
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
    ({"equalize_alpha": 1.5}, "equalize_alpha must be in"),
    ({"equalize": "yes"}, "equalize"),
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


def test_toml_strings_with_newlines_and_control_characters_round_trip(tmp_path):
    config = QuantConfig(exclude=("line\nbreak", 'quote"and\\slash', "tab\there\x7f\x01"))
    path = tmp_path / "strings.toml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_comq_table_round_trips_and_reaches_the_searcher_config(tmp_path):
    config = QuantConfig(comq=ComqConfig(damping=0.1, sweeps=2, asymmetric_ops=("Conv",)),
                         weight_method=WeightMethod.COMQ)
    path = tmp_path / "comq.toml"
    path.write_text(dump_config(config))
    assert "[comq]" in path.read_text()
    loaded = load_config(path)
    assert loaded == config
    assert loaded.weight_searcher == ComqConfig(damping=0.1, sweeps=2, asymmetric_ops=("Conv",))
    assert QuantConfig().weight_searcher == RtnConfig()


@pytest.mark.parametrize("table, message", [
    ({"comq": {"dampin": 0.1}}, "unknown [comq] key"),
    ({"comq": {"damping": -1.0}}, "comq damping must be >= 0"),
    ({"comq": {"block": 0}}, "comq block must be >= 1"),
    ({"comq": 3}, "comq must be a table"),
])
def test_bad_comq_tables_are_config_errors(table, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        config_from_dict(table)


def test_enum_options_accept_their_values_and_stay_enums():
    config = QuantConfig(sensitivity="kl", sensitivity_base="quantized", allocator="random")
    assert config.sensitivity is DamageMeasure.KL
    assert config.sensitivity_base is SensitivityBase.QUANTIZED
    assert config.allocator is Allocator.RANDOM
    with pytest.raises(ConfigError, match="sensitivity = 'l2' is not one of: mse, kl, infonce"):
        QuantConfig(sensitivity="l2")
    with pytest.raises(ConfigError, match="allocator = 'greedy'"):
        config_from_dict({"allocator": "greedy"})
