"""`onnxq compare`: overall fidelity, per-layer damage on real QDQ models, the exclude
suggestion, and one-line errors from the command.

Models are small real graphs quantized by onnxq (and ONNX Runtime's quantize_static), run
through ONNX Runtime; one is wrecked on purpose (one activation scale 50x too large) so that
the analysis must find the layer that reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxq
from graphs import small_cnn, small_cnn_feeds
from onnxq.cli.compare import compare
from onnxq.errors import OnnxqError
from onnxq.report.compare import WeightSource, compare_models, exclude_suggestion, rank_layers

BUNDLED = Path(__file__).resolve().parent.parent / "models" / "bundled"


def conv_chain(seed: int = 0) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Relu -> Conv -> GAP -> Flatten -> Gemm: each Conv reads its own
    quantized input."""
    rng = np.random.default_rng(seed)
    inits, nodes, source = [], [], "x"
    channels = [3, 8, 8, 8]
    for i in range(3):
        inits += [numpy_helper.from_array(rng.normal(0, 0.3, (channels[i + 1], channels[i], 3, 3))
                                          .astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(rng.normal(0, 0.1, channels[i + 1]).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Conv", [source, f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}",
                                      pads=[1, 1, 1, 1]))
        source = f"c{i}"
        if i < 2:
            nodes.append(helper.make_node("Relu", [source], [f"r{i}"], name=f"relu{i}"))
            source = f"r{i}"
    inits += [numpy_helper.from_array(rng.normal(0, 0.3, (10, 8)).astype(np.float32), "fc_w")]
    nodes += [helper.make_node("GlobalAveragePool", [source], ["g"], name="gap"),
              helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc_w"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 12, 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def chain_feeds(count: int, seed: int = 3) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(0, 1, (1, 3, 12, 12)).astype(np.float32)} for _ in range(count)]


def wreck_input_scale(quantized: onnx.ModelProto, node_name: str, factor: float) -> onnx.ModelProto:
    """Give the Q/DQ pair on input 0 of `node_name` its own scale, `factor` times too large."""
    wrecked = onnx.ModelProto()
    wrecked.CopyFrom(quantized)
    graph = wrecked.graph
    producers = {out: node for node in graph.node for out in node.output}
    layer = next(node for node in graph.node if node.name == node_name)
    dequantize = producers[layer.input[0]]
    quantize = producers[dequantize.input[0]]
    assert (dequantize.op_type, quantize.op_type) == ("DequantizeLinear", "QuantizeLinear")
    scale = next(t for t in graph.initializer if t.name == dequantize.input[1])
    graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(scale) * np.float32(factor),
                                                     "wrecked_scale"))
    dequantize.input[1] = quantize.input[1] = "wrecked_scale"
    return wrecked


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """(float path, quantized path, wrecked path, feeds) for the conv chain."""
    folder = tmp_path_factory.mktemp("chain")
    float_path, quant_path, wrecked_path = (folder / n for n in ("f.onnx", "q.onnx", "w.onnx"))
    onnx.save(conv_chain(), float_path)
    result = onnxq.quantize(float_path, chain_feeds(32))
    result.save(quant_path)
    onnx.save(wreck_input_scale(result.model, "conv2", 50.0), wrecked_path)
    return float_path, quant_path, wrecked_path, chain_feeds(8, seed=5)


def test_model_against_itself_is_exact(chain):
    float_path, _, _, feeds = chain
    report = compare_models(float_path, float_path, feeds)
    assert report.feeds == len(feeds)
    (output,) = report.outputs
    assert output.cosine == pytest.approx(1.0) and output.min_cosine == pytest.approx(1.0)
    assert output.top1_agreement == 1.0 and output.max_abs_error == 0.0


def test_quantized_model_is_close_and_max_feeds_applies(chain):
    float_path, quant_path, _, feeds = chain
    report = compare_models(float_path, quant_path, feeds, max_feeds=3)
    assert report.feeds == 3
    assert 0.99 < report.outputs[0].cosine < 1.0 and report.outputs[0].sqnr_db > 15


def test_wrecked_layer_ranks_first_and_restoring_it_recovers(chain):
    float_path, quant_path, wrecked_path, feeds = chain
    ranked = rank_layers(float_path, wrecked_path, feeds)
    worst = ranked[0]
    assert worst.node == "conv2" and worst.op_type == "Conv"
    assert worst.weights is WeightSource.FLOAT and worst.quantized_inputs == (0, 1, 2)
    assert worst.damage > 10 * ranked[1].damage
    wrecked_report = compare_models(float_path, wrecked_path, feeds)
    healthy = compare_models(float_path, quant_path, feeds)
    assert wrecked_report.outputs[0].sqnr_db < healthy.outputs[0].sqnr_db - 10
    # Restoring conv2 alone gives back most of the loss (1 - cosine) the wreck caused.
    loss = 1 - wrecked_report.outputs[0].cosine
    assert 1 - worst.restored.outputs[0].cosine < 0.2 * loss
    assert worst.recovery == max(layer.recovery for layer in ranked)
    # With only conv2 quantized the model is as bad as the wrecked one, give or take.
    assert worst.only_quantized.outputs[0].sqnr_db < healthy.outputs[0].sqnr_db - 10


def test_exclude_suggestion_is_accepted_by_quantize(chain):
    float_path, _, wrecked_path, feeds = chain
    ranked = rank_layers(float_path, wrecked_path, feeds, layers=["conv*", "Relu"])
    assert {layer.op_type for layer in ranked} == {"Conv", "Relu"}
    suggestion = exclude_suggestion(ranked, 1)
    # conv2's input pair is also wanted by relu1, which chains conv1's output scale into it.
    assert suggestion.split(",")[0] == "conv2" and set(suggestion.split(",")) <= {"conv2", "relu1"}
    result = onnxq.quantize(float_path, chain_feeds(16),
                            onnxq.QuantConfig(exclude=tuple(suggestion.split(","))))
    assert "conv2" in result.plan.float_nodes
    assert exclude_suggestion(ranked, 0) == ""
    with pytest.raises(OnnxqError, match="matches no quantized layer"):
        rank_layers(float_path, wrecked_path, feeds, layers=["no_such_layer"])


def test_ort_quantize_static_model(tmp_path):
    """A QDQ model written by ONNX Runtime's quantizer: BatchNorm kept, its float constants come
    from the float model as written, and the analysis runs on it."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    float_path, quant_path = tmp_path / "f.onnx", tmp_path / "ort.onnx"
    onnx.save(small_cnn(), float_path)
    feeds = small_cnn_feeds(8)

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    quantization.quantize_static(str(float_path), str(quant_path), Reader(),
                                 quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                                 extra_options={"QDQKeepRemovableActivations": True})
    ranked = rank_layers(float_path, quant_path, feeds)
    by_name = {layer.node: layer for layer in ranked}
    assert {"conv1", "conv2", "fc"} <= set(by_name)
    assert all(by_name[n].weights is WeightSource.FLOAT for n in ("conv1", "conv2", "fc"))
    names = exclude_suggestion(ranked, len(ranked)).split(",")
    assert "bn1" not in names  # folded away when onnxq prepares the float model
    onnxq.quantize(float_path, feeds, onnxq.QuantConfig(exclude=tuple(names)))


def test_cli_on_bundled_digits(tmp_path):
    float_path = BUNDLED / "digit_cnn.onnx"
    calib = BUNDLED / "digit_cnn_calib.npz"
    quant_path = tmp_path / "digits.int8.onnx"
    onnxq.quantize(float_path, calib).save(quant_path)
    runner = CliRunner()
    run = runner.invoke(compare, [str(float_path), str(quant_path), "--data", str(calib),
                                  "--max-feeds", "6", "--per-layer", "--top", "3", "--json"])
    assert run.exit_code == 0, run.output
    summary = json.loads(run.stdout)
    assert summary["fidelity"]["feeds"] == 6
    assert summary["fidelity"]["outputs"][0]["cosine"] > 0.98
    layers = summary["layers"]
    # equalized Convs hold rescaled weights that match no float constant: they stay dequantized
    assert layers and all(layer["weights"] in ("float", "none", "dequantized") for layer in layers)
    assert all(layer["weights"] == "float" for layer in layers if "fc_layers" in layer["node"])
    assert [layer["damage"] for layer in layers] == sorted((layer["damage"] for layer in layers),
                                                           reverse=True)
    onnxq.quantize(float_path, calib, onnxq.QuantConfig(exclude=tuple(summary["suggestion"].split(","))))

    text = runner.invoke(compare, [str(float_path), str(quant_path), "--data", str(calib),
                                   "--max-feeds", "4", "--per-layer", "--top", "2"])
    assert text.exit_code == 0, text.output
    assert "cosine" in text.stdout and "worst 2 of" in text.stdout
    assert text.stdout.strip().splitlines()[-1].startswith("suggestion: --exclude ")


def test_cli_self_compare_json_has_no_infinity(chain):
    float_path, _, _, _ = chain
    data = chain_feeds(2)
    npz = float_path.parent / "self.npz"
    np.savez(npz, x=np.concatenate([f["x"] for f in data]))
    run = CliRunner().invoke(compare, [str(float_path), str(float_path), "--data", str(npz), "--json"])
    assert run.exit_code == 0, run.output
    output = json.loads(run.stdout)["fidelity"]["outputs"][0]
    assert output["cosine"] == pytest.approx(1.0) and output["sqnr_db"] is None


def _other_inputs(path: Path) -> None:
    model = conv_chain()
    model.graph.input[0].name = "image"
    model.graph.node[0].input[0] = "image"
    onnx.save(model, path)


@pytest.mark.parametrize("case, message", [
    ("missing", "not found"),
    ("not_onnx", "not a readable ONNX model"),
    ("wrong_feeds", "missing input(s) x"),
    ("other_inputs", "different inputs"),
    ("no_layer", "matches no quantized layer"),
])
def test_cli_bad_input_is_one_line(chain, tmp_path, case, message):
    float_path, quant_path, _, _ = chain
    data = tmp_path / "data.npz"
    np.savez(data, x=np.zeros((2, 3, 12, 12), np.float32))
    args = [str(float_path), str(quant_path), "--data", str(data)]
    if case == "missing":
        args[1] = str(tmp_path / "absent.onnx")
    elif case == "not_onnx":
        args[1] = str(tmp_path / "junk.onnx")
        Path(args[1]).write_bytes(b"this is not a model")
    elif case == "wrong_feeds":
        np.savez(data, image=np.zeros((2, 3, 12, 12), np.float32))
    elif case == "other_inputs":
        args[1] = str(tmp_path / "other.onnx")
        _other_inputs(Path(args[1]))
    elif case == "no_layer":
        args += ["--per-layer", "--layers", "nothing*"]
    run = CliRunner().invoke(compare, args)
    assert run.exit_code == 2, run.output
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("onnxq: error:") and message in lines[0]
    assert run.stdout == ""
