"""Weight searchers behind one interface, looked up by the type of their config.

A searcher turns a planned weight (`WeightQuant`: tensor, axis, bits) into `WeightParams`
(scales, zero points, integer codes). Some need calibration data first: `observers()` names
the tensors they watch during the single calibration pass (COMQ's Gram matrices of layer
inputs). `params(spec)` may be asked for the same layer at several bit-widths (the bit
allocator probes each), so searchers cache by spec.

A new searcher is one file: a frozen config dataclass and a class registered for it,

    @register(MyConfig)
    class MySearcher:
        def __init__(self, config: MyConfig, index: ModelIndex, specs: Sequence[WeightQuant]): ...
        def observers(self) -> Observers: ...
        def params(self, spec: WeightQuant) -> WeightParams: ...
        searched_layers: frozenset[str]

imported from `onnxq/weights/__init__.py`, and a `WeightMethod` member in onnxq.config that
selects it (`QuantConfig.weight_searcher`). Copy onnxq/weights/rtn.py.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from onnxq.calibration.calibrate import Observer
from onnxq.index import ModelIndex
from onnxq.plan import WeightQuant
from onnxq.qparams import WeightParams

# Tensor name -> the observers that watch it during calibration.
Observers = Mapping[str, Sequence[Observer]]


class WeightSearcher(Protocol):
    searched_layers: frozenset[str]

    def observers(self) -> Observers: ...

    def params(self, spec: WeightQuant) -> WeightParams: ...


SearcherFactory = Callable[[object, ModelIndex, Sequence[WeightQuant]], WeightSearcher]
_SEARCHERS: dict[type, SearcherFactory] = {}


def register(config_type: type) -> Callable[[SearcherFactory], SearcherFactory]:
    """Class decorator: the searcher built for configs of `config_type`."""

    def decorate(factory: SearcherFactory) -> SearcherFactory:
        if config_type in _SEARCHERS:
            raise ValueError(f"a weight searcher is already registered for {config_type.__name__}")
        _SEARCHERS[config_type] = factory
        return factory

    return decorate


def searcher_for(config: object, index: ModelIndex, specs: Sequence[WeightQuant]) -> WeightSearcher:
    """The searcher registered for the type of `config`, over the planned weights `specs`."""
    try:
        factory = _SEARCHERS[type(config)]
    except KeyError:
        raise TypeError(f"no weight searcher is registered for {type(config).__name__}") from None
    return factory(config, index, specs)
