"""Sequential COMQ: each layer searched again, in graph order, on the inputs it sees in the
quantized model and toward the float model's outputs (onnxq.weights.float_targets).

The weights stage searches every layer on the float model's inputs. Here the layers are taken
again in waves, in graph order: a wave is a run of layers none of which reads another's output
(a transformer's Q, K and V projections share one; a chain of Convs has one layer per wave).
For each wave the model quantized so far (every earlier wave already searched again) and the
float model run on the calibration feeds side by side; each layer's paired inputs give
H = X_q^T X_q and C = X_q^T X (onnxq.weights.gram), COMQ searches toward the float target
t = (H + lambda m I)^-1 (C w + lambda m w), and a Conv or Gemm bias absorbs the mean shift,
b - (W_q E[x_q] - W E[x]) (onnxq.stages.bias). A layer makes up for what the earlier layers
and the activations' quantization left, once, since a wave never sees a change that it also
makes.

Layers in one wave never depend on each other, so searching them from one run is exact; one
wave per layer of a chain costs one run of both models per layer (EfficientNet-Lite0: 50
waves, about 3 minutes on 2 cores). Each wave's quantized model is pruned to the nodes its
layers' inputs need (`values_only`); dynamic layers, which quantize their input inside their
kernel, keep the first search's weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxq.calibration.calibrate import calibration_settings, values_only
from onnxq.config import ComqConfig, WeightMethod
from onnxq.emit import emit, emit_options
from onnxq.plan import WeightQuant
from onnxq.scoring.sessions import open_session, run
from onnxq.stages.bias import fit_weight_scales_to_biases
from onnxq.state import Observers, QuantState
from onnxq.weights.float_targets import float_target_rows
from onnxq.weights.gram import PairedGramAccumulator, weight_rows
from onnxq.weights.search_comq import comq_layers, comq_weight_params


class SequentialComq:
    """COMQ again, wave by wave, on the quantized model's inputs toward the float outputs."""

    name = "sequential comq"

    @staticmethod
    def wanted(state: QuantState) -> bool:
        return state.config.weight_method is WeightMethod.COMQ and state.config.comq_sequential

    def observe(self, state: QuantState) -> Observers:
        return {}

    def run(self, state: QuantState) -> None:
        # the final plan's layers (bits allocated); a dynamic layer quantizes its input per
        # batch inside its integer kernel, so it has no quantized input to observe
        layers = {spec: node for spec, node in comq_layers(state.index, state.plan.weights).items()
                  if spec.node not in state.plan.dynamic_layers}
        if all(spec.grid.bits >= 8 for spec in layers):
            return  # at W8A8 it did not help (EfficientNet-Lite0 held-out 0.99920 -> 0.99906)
        by_name = {spec.node: spec for spec in layers}
        order = [node.name for node in state.model.graph if node.name in by_name]
        waves = layer_waves(state.model.graph, order)
        progress = state.stage_progress(self.name, len(waves))
        quantized_means: dict[WeightQuant, np.ndarray] = {}
        for wave in waves:
            wave_layers = {by_name[name]: layers[by_name[name]] for name in wave}
            quantized_means.update(_search_wave(state, wave_layers, state.config.comq))
            if progress is not None:
                progress(1)
        if fit_weight_scales_to_biases(state):  # a dead channel's scale rose: its codes changed
            for spec, mean in quantized_means.items():
                _correct_bias(state, spec, mean)


def _search_wave(state: QuantState, layers: dict[WeightQuant, ir.Node],
                 settings: ComqConfig) -> dict[WeightQuant, np.ndarray]:
    """Search the wave's layers toward their float targets; their quantized input means."""
    grams = _paired_grams(state, layers)
    targets = {spec: float_target_rows(_rows(layers[spec], spec, gram), gram.hessian, gram.cross,
                                       settings.float_target_ridge)
               for spec, gram in grams.items() if gram.hessian is not None}
    found = comq_weight_params({spec: layers[spec] for spec in targets}, grams, settings, targets)
    state.qparams.weights.update(found)
    means = {spec: grams[spec].quantized_mean.mean for spec in found}
    for spec, mean in means.items():
        _correct_bias(state, spec, mean)
    return means


def layer_waves(graph: ir.Graph, layers: Sequence[str]) -> list[list[str]]:
    """`layers` (node names in graph order) cut into runs in which no layer reads, through any
    path, the output of another layer of its run."""
    waves: list[list[str]] = []
    downstream: set[str] = set()  # nodes fed by the current wave
    nodes = {node.name: node for node in graph}
    for name in layers:
        if not waves or name in downstream:
            waves.append([])
            downstream = set()
        waves[-1].append(name)
        downstream |= _downstream(nodes[name])
    return waves


def _downstream(node: ir.Node) -> set[str]:
    """Names of the nodes that read `node`'s outputs, directly or not."""
    seen: set[str] = set()
    stack = [node]
    while stack:
        for value in stack.pop().outputs:
            for usage in value.uses():
                if usage.node.name not in seen:
                    seen.add(usage.node.name)
                    stack.append(usage.node)
    return seen


def _paired_grams(state: QuantState,
                  layers: dict[WeightQuant, ir.Node]) -> dict[WeightQuant, PairedGramAccumulator]:
    """Each layer's inputs in the model quantized so far beside the float model's, streamed
    over the calibration feeds; both models pruned to the nodes those inputs need."""
    # laid out as it will be written (a MatMulNBits reads the float activation), so each layer
    # sees the inputs it will run on; every layer keeps its node's name
    quantized = emit(state.model, state.plan, state.qparams, emit_options(state.config))
    quantized_nodes = {node.name: node for node in quantized.graph}
    pairs = {spec: (quantized_nodes[spec.node].inputs[0].name, node.inputs[0].name)
             for spec, node in layers.items()}
    quantized_names = sorted({names[0] for names in pairs.values()})
    float_names = sorted({names[1] for names in pairs.values()})
    session = open_session(values_only(quantized, quantized_names), "the quantized model",
                           calibration_settings(state.scorer.settings, quantized))
    reference = open_session(values_only(state.model, float_names), "the float model",
                             calibration_settings(state.scorer.settings, state.model))
    grams = {spec: PairedGramAccumulator(node, node.inputs[spec.input_index].const_value.numpy())
             for spec, node in layers.items()}
    for feed in state.calibration:
        seen = dict(zip(quantized_names, run(session, quantized_names, feed, "the quantized model"),
                        strict=True))
        wanted = dict(zip(float_names, run(reference, float_names, feed, "the float model"), strict=True))
        for spec, (quantized_name, float_name) in pairs.items():
            grams[spec].update_pair(seen[quantized_name], wanted[float_name])
    return grams


def _rows(node: ir.Node, spec: WeightQuant, gram: PairedGramAccumulator) -> np.ndarray:
    group = gram.geometry.group if gram.geometry is not None else 1
    return weight_rows(node, node.inputs[spec.input_index].const_value.numpy(), group)


def _correct_bias(state: QuantState, spec: WeightQuant, quantized_mean: np.ndarray) -> None:
    bias = state.biases.by_layer.get(spec.node)
    if bias is not None:
        state.qparams.bias_values[bias] = state.biases.for_layer(spec, state.qparams.weights[spec],
                                                                 quantized_mean)
