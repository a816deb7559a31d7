"""A synthetic transformer-like model whose weights pass protobuf's 2 GB limit, with
calibration feeds: the test bed for quantizing big models (external data, bounded memory).

    python -m onnxq.zoo.large_transformer OUT_DIR [--layers 11] [--hidden 2048] [--n-calib 8]

    from onnxq.zoo import large_transformer
    built = large_transformer.build(out_dir)        # LargeModel(onnx_path, data_path, calib_dir)

No hub model of that size is reachable offline, so the weights are random (seeded normal,
scaled by 1/sqrt(fan_in) so activations stay in range through the residual stream). The ops
are those of a real pre-LN encoder, opset 17 like the rest of the zoo, IR version 10:

    x [batch, seq, hidden] -> layers x (
        h = x + Wo · Attention(LayerNorm(x))        Q, K, V: MatMul + Add, 16 heads,
                                                    Softmax(Q K^T / sqrt(d_head)) V
        x = h + W2 · Gelu(W1 · LayerNorm(h) + b1) + b2    Gelu as its Erf decomposition
    ) -> LayerNorm -> y [batch, seq, hidden]

Batch and sequence are dynamic. The default size (hidden 2048, FFN 8192, 11 layers) holds
553M parameters, 2.21 GB of float32 weights: just past 2 GB, so a quantization run stays
within minutes. Each weight matrix is generated and written straight into
``<name>.onnx.data`` (offsets aligned to 64 KiB so ONNX Runtime can map them), one at a time:
building never holds more than one matrix in memory, and the model file itself is small.

Calibration feeds (``calib/feed_NNN.npz``, one ``x`` each, batch 1, sequence lengths 8-32) are
seeded normal vectors: the model has no vocabulary, and LayerNorm comes first, so their scale
does not matter.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import write_feeds

logger = logging.getLogger(__name__)

NAME = "large_transformer"
INPUT_NAME = "x"
OUTPUT_NAME = "y"
OPSET = 17
IR_VERSION = 10
DATA_ALIGNMENT = 64 * 1024


@dataclass(frozen=True)
class TransformerShape:
    """Sizes of the synthetic encoder; the default passes 2 GB of float32 weights."""

    hidden: int = 2048
    ffn: int = 8192
    heads: int = 16
    layers: int = 11
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.hidden, self.ffn, self.heads, self.layers) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden {self.hidden} is not a multiple of heads {self.heads}")

    @property
    def parameters(self) -> int:
        per_layer = 4 * self.hidden * self.hidden + 2 * self.hidden * self.ffn  # matrices
        per_layer += 4 * self.hidden + self.ffn + self.hidden  # biases
        per_layer += 4 * self.hidden  # two LayerNorms
        return self.layers * per_layer + 2 * self.hidden


@dataclass(frozen=True)
class LargeModel:
    """Where a built model lies: the model file, its external-data file, its feeds."""

    onnx_path: Path
    data_path: Path
    calib_dir: Path


class _WeightWriter:
    """Appends tensors to one external-data file and returns their TensorProtos."""

    def __init__(self, handle, location: str) -> None:
        self.handle = handle
        self.location = location

    def external(self, name: str, array: np.ndarray):
        import onnx

        offset = -self.handle.tell() % DATA_ALIGNMENT
        self.handle.write(b"\0" * offset)
        start = self.handle.tell()
        self.handle.write(np.ascontiguousarray(array).tobytes())
        tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=array.shape)
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(start)),
                           ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor


def _layer(index: int, x: str, shape: TransformerShape, rng: np.random.Generator,
           weights: _WeightWriter) -> tuple[list, list, str]:
    """Nodes and initializers of encoder layer `index` reading `x`; returns its output name."""
    from onnx import helper, numpy_helper

    d, p = shape.hidden, f"layer{index}"
    nodes, inits = [], []

    def matrix(name: str, rows: int, cols: int) -> str:
        array = rng.standard_normal((rows, cols), dtype=np.float32) / np.float32(math.sqrt(rows))
        inits.append(weights.external(f"{p}.{name}", array))
        return f"{p}.{name}"

    def vector(name: str, size: int, scale: float, center: float = 0.0) -> str:
        array = center + scale * rng.standard_normal(size, dtype=np.float32)
        inits.append(numpy_helper.from_array(array.astype(np.float32), f"{p}.{name}"))
        return f"{p}.{name}"

    def node(op: str, inputs: list[str], name: str, **attributes) -> str:
        nodes.append(helper.make_node(op, inputs, [f"{p}.{name}"], name=f"{p}.{name}", **attributes))
        return f"{p}.{name}"

    def dense(source: str, name: str, rows: int, cols: int) -> str:
        product = node("MatMul", [source, matrix(f"{name}.weight", rows, cols)], f"{name}.matmul")
        return node("Add", [product, vector(f"{name}.bias", cols, 0.02)], f"{name}.out")

    def heads_of(source: str, name: str, perm: list[int]) -> str:
        split = node("Reshape", [source, "heads_shape"], f"{name}.split")
        return node("Transpose", [split], f"{name}.heads", perm=perm)

    normed = node("LayerNormalization", [x, vector("ln1.scale", d, 0.1, 1.0), vector("ln1.bias", d, 0.1)],
                  "ln1", axis=-1, epsilon=1e-5)
    q = heads_of(dense(normed, "q", d, d), "q", [0, 2, 1, 3])
    k = heads_of(dense(normed, "k", d, d), "k", [0, 2, 3, 1])
    v = heads_of(dense(normed, "v", d, d), "v", [0, 2, 1, 3])
    scores = node("Mul", [node("MatMul", [q, k], "scores.raw"), "attention_scale"], "scores")
    context = node("MatMul", [node("Softmax", [scores], "probs", axis=-1), v], "context.heads")
    merged = node("Reshape", [node("Transpose", [context], "context.t", perm=[0, 2, 1, 3]), "merge_shape"],
                  "context")
    h = node("Add", [x, dense(merged, "o", d, d)], "attention.residual")
    normed = node("LayerNormalization", [h, vector("ln2.scale", d, 0.1, 1.0), vector("ln2.bias", d, 0.1)],
                  "ln2", axis=-1, epsilon=1e-5)
    up = dense(normed, "ffn1", d, shape.ffn)
    erf = node("Erf", [node("Mul", [up, "inv_sqrt2"], "gelu.scaled")], "gelu.erf")
    gelu = node("Mul", [node("Mul", [up, "half"], "gelu.half"), node("Add", [erf, "one"], "gelu.shift")],
                "gelu")
    out = node("Add", [h, dense(gelu, "ffn2", shape.ffn, d)], "ffn.residual")
    return nodes, inits, out


def _shared_constants(shape: TransformerShape) -> list:
    from onnx import numpy_helper

    d_head = shape.hidden // shape.heads
    values = {"heads_shape": np.array([0, 0, shape.heads, d_head], np.int64),
              "merge_shape": np.array([0, 0, shape.hidden], np.int64),
              "attention_scale": np.array(1 / math.sqrt(d_head), np.float32),
              "inv_sqrt2": np.array(1 / math.sqrt(2), np.float32),
              "half": np.array(0.5, np.float32), "one": np.array(1.0, np.float32)}
    return [numpy_helper.from_array(array, name) for name, array in values.items()]


def write_model(onnx_path: Path | str, shape: TransformerShape = TransformerShape()) -> Path:
    """Write the model to `onnx_path` and its weights to `onnx_path`.data; returns the model path."""
    import onnx
    from onnx import helper

    onnx_path = Path(onnx_path)
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    data_path = onnx_path.with_name(onnx_path.name + ".data")
    rng = np.random.default_rng(shape.seed)
    nodes, inits = [], _shared_constants(shape)
    with open(data_path, "wb") as handle:
        weights = _WeightWriter(handle, data_path.name)
        x = INPUT_NAME
        for index in range(shape.layers):
            layer_nodes, layer_inits, x = _layer(index, x, shape, rng, weights)
            nodes += layer_nodes
            inits += layer_inits
            logger.info("layer %d of %d written", index + 1, shape.layers)
    d = shape.hidden
    final = [helper.make_tensor("final.scale", onnx.TensorProto.FLOAT, [d], np.ones(d, np.float32)),
             helper.make_tensor("final.bias", onnx.TensorProto.FLOAT, [d], np.zeros(d, np.float32))]
    nodes.append(helper.make_node("LayerNormalization", [x, "final.scale", "final.bias"], [OUTPUT_NAME],
                                  name="final.ln", axis=-1, epsilon=1e-5))
    dims = ["batch", "sequence", d]
    graph = helper.make_graph(nodes, NAME,
                              [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, dims)],
                              inits + final)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="onnxq.zoo.large_transformer")
    onnx.save_model(model, str(onnx_path))
    onnx.checker.check_model(str(onnx_path))  # by path: the checker reads the external data itself
    return onnx_path


def calibration_feeds(shape: TransformerShape, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless seeded feeds {x: [1, seq, hidden]} with seq in 8..32."""
    rng = np.random.default_rng(seed)
    while True:
        sequence = int(rng.integers(8, 33))
        yield {INPUT_NAME: rng.standard_normal((1, sequence, shape.hidden), dtype=np.float32)}


def build(out_dir: Path | str, shape: TransformerShape = TransformerShape(), n_calib: int = 8) -> LargeModel:
    """The model, its data file and `n_calib` calibration feeds in `out_dir`."""
    out_dir = Path(out_dir)
    onnx_path = write_model(out_dir / f"{NAME}.onnx", shape)
    calib_dir = out_dir / "calib"
    write_feeds(calib_dir, calibration_feeds(shape, shape.seed + 1), n_calib)
    return LargeModel(onnx_path, onnx_path.with_name(onnx_path.name + ".data"), calib_dir)


def main(argv: list[str] | None = None) -> int:
    defaults = TransformerShape()
    parser = argparse.ArgumentParser(prog="python -m onnxq.zoo.large_transformer",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the model, its data file and calib/")
    parser.add_argument("--layers", type=int, default=defaults.layers)
    parser.add_argument("--hidden", type=int, default=defaults.hidden)
    parser.add_argument("--ffn", type=int, default=defaults.ffn)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--n-calib", type=int, default=8, help="calibration feeds (default 8)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    shape = TransformerShape(args.hidden, args.ffn, args.heads, args.layers, args.seed)
    built = build(args.out_dir, shape, args.n_calib)
    print(f"wrote {built.onnx_path} ({shape.parameters / 1e6:.0f}M parameters, "
          f"{built.data_path.stat().st_size / 1e9:.2f} GB of data) and {args.n_calib} feeds in "
          f"{built.calib_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
