"""Sub-byte weight containers: codes written by the emitter's dtypes survive serialization,
take ceil(n * bits / 8) bytes, and ONNX Runtime's DequantizeLinear reads them back as
(codes - zero point) * scale."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxq.numerics import IntRange, dequantize
from onnxq.passes.insert_qdq import (
    EmitOptions,
    Storage,
    pack_nbits,
    pack_zero_point_rows,
    storage_dtype,
    weight_storage,
)


def _dequantize_model(codes: np.ndarray, scale: np.ndarray, zero_point: np.ndarray,
                      axis: int | None, opset: int) -> ir.Model:
    inputs = [ir.Value(name=name, const_value=ir.tensor(array, name=name))
              for name, array in (("codes", codes), ("scale", scale), ("zp", zero_point))]
    attributes = [ir.AttrInt64("axis", axis)] if axis is not None else []
    node = ir.Node("", "DequantizeLinear", inputs, attributes, num_outputs=1, name="dq")
    output = node.outputs[0]
    output.name, output.dtype, output.shape = "y", ir.DataType.FLOAT, ir.Shape(codes.shape)
    graph = ir.Graph([], [output], nodes=[node], initializers=inputs, name="g",
                     opset_imports={"": opset})
    return ir.Model(graph, ir_version=10 if opset <= 21 else 11)


def _round_trip(tmp_path, grid: IntRange, storage: Storage, shape: tuple[int, ...],
                axis: int | None, seed: int) -> None:
    rng = np.random.default_rng(seed)
    dtype = storage_dtype(grid, storage)
    codes = rng.integers(grid.qmin, grid.qmax + 1, shape)
    channels = shape[axis] if axis is not None else 1
    scale = rng.uniform(0.01, 1.0, channels).astype(np.float32)
    zero_point = rng.integers(grid.qmin, grid.qmax + 1, channels)
    if axis is None:
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    opset = 25 if storage is Storage.INT2 else 21
    model = _dequantize_model(codes.astype(dtype), scale, zero_point.astype(dtype), axis, opset)
    path = tmp_path / "dq.onnx"
    onnx.save(ir.to_proto(model), path)
    reloaded = onnx.load(path)
    tensor = next(t for t in reloaded.graph.initializer if t.name == "codes")
    assert len(tensor.raw_data) == math.ceil(codes.size * storage.bits / 8)
    assert np.array_equal(onnx.numpy_helper.to_array(tensor).astype(np.int64), codes)
    session = ort.InferenceSession(path.read_bytes(), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {})
    np.testing.assert_array_equal(result, dequantize(codes, scale, zero_point, axis))


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize(("shape", "axis"), [((1,), None), ((7,), None), ((101,), None),
                                             ((5, 7), 0), ((5, 7), 1), ((3, 5, 3), 1)])
def test_int4_container_round_trip(tmp_path, bits, signed, shape, axis):
    grid = IntRange(bits, signed)
    storage = weight_storage("Conv", shape, axis, grid, EmitOptions(int2=False))
    assert storage is Storage.INT4
    _round_trip(tmp_path, grid, storage, shape, axis, seed=bits * 10 + len(shape))


@pytest.mark.parametrize(("shape", "axis"), [((1,), None), ((7,), None), ((5, 7), 1),
                                             ((3, 5, 3), 0)])
@pytest.mark.parametrize("signed", [True, False])
def test_int2_container_round_trip(tmp_path, shape, axis, signed):
    """int2 (opset 25, the default for 2-bit Conv codes): four codes per byte, read back by
    ORT's DequantizeLinear."""
    grid = IntRange(2, signed)
    storage = weight_storage("Conv", shape, axis, grid, EmitOptions())
    assert storage is Storage.INT2
    _round_trip(tmp_path, grid, storage, shape, axis, seed=len(shape))


def test_storage_choice():
    options = EmitOptions()
    assert weight_storage("Conv", (8, 3, 3, 3), 0, IntRange(8, True), options) is Storage.INT8
    assert weight_storage("Conv", (8, 3, 3, 3), 0, IntRange(3, True), options) is Storage.INT4
    assert weight_storage("Conv", (8, 3, 3, 3), 0, IntRange(2, True), options) is Storage.INT2
    assert weight_storage("Gemm", (32, 64), 0, IntRange(2, False), options) is Storage.INT2
    no_int2 = EmitOptions(int2=False)
    assert weight_storage("Conv", (8, 3, 3, 3), 0, IntRange(2, True), no_int2) is Storage.INT4
    nbits = EmitOptions(matmul_nbits=True)
    assert weight_storage("MatMul", (64, 32), 1, IntRange(3, True), nbits) is Storage.NBITS
    assert weight_storage("MatMul", (64, 30), 1, IntRange(2, True), nbits) is Storage.NBITS_2
    assert weight_storage("MatMul", (64, 32), 1, IntRange(8, True), nbits) is Storage.INT8
    assert weight_storage("Gemm", (32, 64), 0, IntRange(4, True), nbits) is Storage.INT4
    assert Storage.NBITS.bits == 4 and Storage.NBITS_2.bits == 2
    # a 2-bit MatMul outside MatMulNBits keeps int4, whose DQ -> MatMul is an integer kernel
    assert weight_storage("MatMul", (64, 32), 1, IntRange(2, True), options) is Storage.INT4


@pytest.mark.parametrize(("k", "block"), [(16, 16), (37, 16), (100, 32), (64, 64)])
def test_pack_nbits_layout(k, block):
    """B[n, b, j] holds codes k = b * block + 2j (low nibble) and 2j + 1 (high), plus 8."""
    rng = np.random.default_rng(k)
    n = 5
    codes = rng.integers(-8, 8, (k, n))
    packed = pack_nbits(codes, np.zeros(n, np.int64), block)
    blocks = math.ceil(k / block)
    assert packed.shape == (n, blocks, block // 2) and packed.dtype == np.uint8
    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks * block)
    np.testing.assert_array_equal(nibbles[:, :k].astype(np.int64) - 8, codes.T)
    assert np.all(nibbles[:, k:] == 8)  # padding dequantizes to zero


@pytest.mark.parametrize(("k", "block"), [(16, 16), (37, 16), (100, 32), (129, 64)])
def test_pack_nbits_2bit_layout(k, block):
    """bits=2: B[n, b, j] holds codes k = b * block + 4j + i in bits 2i..2i+1, plus 2."""
    rng = np.random.default_rng(k)
    n = 3
    codes = rng.integers(-2, 2, (k, n))
    packed = pack_nbits(codes, np.zeros(n, np.int64), block, bits=2)
    blocks = math.ceil(k / block)
    assert packed.shape == (n, blocks, block // 4) and packed.dtype == np.uint8
    crumbs = np.stack([(packed >> shift) & 0b11 for shift in (0, 2, 4, 6)], axis=-1)
    crumbs = crumbs.reshape(n, blocks * block).astype(np.int64)
    np.testing.assert_array_equal(crumbs[:, :k] - 2, codes.T)
    assert np.all(crumbs[:, k:] == 2)  # padding dequantizes to zero
    with pytest.raises(ValueError, match="bits=2"):
        pack_nbits(codes + 2, np.zeros(n, np.int64), block, bits=2)


def test_pack_zero_point_rows():
    """Zero points: 8 / bits per byte, lowest bits first, each row padded to whole bytes."""
    values = np.array([[1, 2, 3, 0, 1], [3, 3, 0, 0, 2]], np.uint8)
    assert list(pack_zero_point_rows(values, bits=2)) == [
        1 | 2 << 2 | 3 << 4, 1, 3 | 3 << 2, 2]
    assert list(pack_zero_point_rows(values, bits=4)) == [
        1 | 2 << 4, 3, 1, 3 | 3 << 4, 0, 2]
