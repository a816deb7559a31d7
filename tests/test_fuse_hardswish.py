"""HardSwish written out (Add 3, Clip 0..6, Mul, Div 6; or HardSigmoid times x) becomes one
HardSwish node in prepare: the same outputs in float, fewer float ops between Q/DQ in ORT."""

import numpy as np
import onnxruntime as ort
import pytest

import onnxq
from graphs import hardswish_cnn
from onnxq import model_io
from onnxq.config import QuantConfig
from onnxq.passes import prepare
from onnxq.report.kernels import optimized_op_counts

RNG = np.random.default_rng(5)
FEEDS = [{"x": RNG.normal(0, 2, (1, 3, 16, 16)).astype(np.float32)} for _ in range(10)]


def _outputs(proto, feed):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)


@pytest.mark.parametrize("form, opset", [("clip", 12), ("clip", 17), ("hardsigmoid", 13)])
def test_written_out_hardswish_fuses_and_keeps_the_outputs(form, opset):
    proto = hardswish_cnn(form=form, opset=opset)
    prepared = model_io.to_proto(prepare(model_io.to_ir(proto)))
    ops = [node.op_type for node in prepared.graph.node]
    assert ops.count("HardSwish") == 1 and not {"Clip", "Div", "Mul", "HardSigmoid"} & set(ops), ops
    assert model_io.to_ir(prepared).opset_imports[""] >= 14
    for feed in FEEDS[:3]:
        np.testing.assert_allclose(_outputs(prepared, feed)[0], _outputs(proto, feed)[0],
                                   rtol=1e-5, atol=1e-5)


def test_hardswish_whose_gate_is_read_elsewhere_stays():
    proto = hardswish_cnn(shared=True)
    prepared = model_io.to_proto(prepare(model_io.to_ir(proto)))
    ops = [node.op_type for node in prepared.graph.node]
    assert "HardSwish" not in ops and "Clip" in ops


def test_quantized_hardswish_leaves_no_clip_or_div_in_ort():
    """After quantization ORT's optimized graph runs the first Conv as QLinearConv and the
    activation as ORT's own HardSwish form (HardSigmoid and Mul), no Add / Clip / Div chain;
    fidelity stays close to float."""
    result = onnxq.quantize(hardswish_cnn(), FEEDS, QuantConfig(holdout=2, measure_latency=False))
    counts = optimized_op_counts(result.model)
    assert counts.get("QLinearConv") == 1 and counts.get("HardSigmoid") == 1, counts
    assert not counts.get("Clip") and not counts.get("Div") and not counts.get("Add"), counts
    assert result.fidelity.outputs[0].cosine > 0.99
