"""Round to nearest: symmetric min-max scales per channel (or tensor), codes rounded to nearest.

    s = max |w| / qmax (per output channel),   c = clip(round(w / s), qmin, qmax)

The baseline every other searcher starts from or is compared with; needs no calibration data.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxq.config import RtnConfig
from onnxq.index import ModelIndex
from onnxq.plan import WeightQuant
from onnxq.qparams import WeightParams, round_to_nearest_weight
from onnxq.weights.registry import Observers, register


@register(RtnConfig)
class RoundToNearest:
    """Round-to-nearest parameters of each weight, computed once per (layer, bits)."""

    searched_layers: frozenset[str] = frozenset()

    def __init__(self, config: RtnConfig, index: ModelIndex, specs: Sequence[WeightQuant]) -> None:
        self._index = index
        self._cache: dict[WeightQuant, WeightParams] = {}

    def observers(self) -> Observers:
        return {}

    def params(self, spec: WeightQuant) -> WeightParams:
        if spec not in self._cache:
            weight = self._index.constant(spec.node, spec.input_index)
            self._cache[spec] = round_to_nearest_weight(weight, spec)
        return self._cache[spec]
