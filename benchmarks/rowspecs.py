"""The rows of the benchmark: one `RowSpec` per quantizer configuration, in table order.

A row names a quantizer (a key of `quantizers.QUANTIZERS`), the options it is called with, and
the models it applies to. Adding an onnxq mode (COMQ W4/W3, mixed bits, Evol-Q) or a peer is
adding a row here; `run.py` and the report pick it up unchanged. onnxq rows take `QuantConfig`
fields as options, by their TOML names and values (`onnxq.config.config_from_dict`).

A row that does not apply to a model (a transformer-only peer on a CNN, a padded-feed fallback
where all calibration feeds have one shape) is left out of that model's table. A row that
applies and fails is kept, with its error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxq import CalibrationMethod

TRANSFORMERS = frozenset({"minilm_l6"})
FAMILIES = ("onnxq", "ORT", "NNCF")  # plot colours and --tools family names


@dataclass(frozen=True)
class RowSpec:
    """One quantizer configuration.

    Attributes:
        label: the row's name in tables, plots and `--tools`; unique.
        quantizer: key of `quantizers.QUANTIZERS`.
        family: which tool the row belongs to (one of FAMILIES).
        options: keyword options of the quantizer, as (name, value) pairs.
        models: the zoo models the row applies to; None: all.
        only_varying_shapes: a fallback for calibration feeds of different shapes; left out of
            models whose feeds all have one shape.
    """

    label: str
    quantizer: str
    family: str
    options: tuple[tuple[str, Any], ...] = ()
    models: frozenset[str] | None = None
    only_varying_shapes: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"row {self.label!r}: family must be one of {FAMILIES}, got {self.family!r}")

    def applies(self, model: str, shapes_vary: bool) -> bool:
        if self.models is not None and model not in self.models:
            return False
        return shapes_vary or not self.only_varying_shapes


def _options(**values: Any) -> tuple[tuple[str, Any], ...]:
    return tuple(values.items())


_ORT_HISTOGRAM = ("Entropy", "Percentile")
PPOCR_EXCLUDE = ("p2o.Conv.1", "p2o.Conv.0", "p2o.Conv.7")  # onnxq compare --per-layer --top 3
ABLATION_MODELS = frozenset({"ppocr_rec", "efficientnet_lite0", "digits"})  # digits: evaluation at float
MIXED_AVG_BITS = 4.0  # mean weight bits
MIXED_SIZE_RATIOS = (0.15, 0.17, 0.20, 0.23)  # file size / float

ROWS: tuple[RowSpec, ...] = (
    # onnxq: its default config, then each calibration method on the otherwise default config.
    RowSpec("onnxq default", "onnxq", "onnxq"),
    *(RowSpec(f"onnxq {method.value}", "onnxq", "onnxq", _options(method=method.value))
      for method in CalibrationMethod),
    # onnxq sub-8-bit weights (8-bit activations): round to nearest against COMQ's search.
    *(RowSpec(f"onnxq W{bits}A8 {method}", "onnxq", "onnxq",
              _options(weight_bits=bits, weight_method=method))
      for bits in (4, 3) for method in ("rtn", "comq")),
    # COMQ's first search alone, without the sequential one toward the float outputs (on by
    # default since 2026-12-06), at W4 and W3.
    *(RowSpec(f"onnxq W{bits}A8 comq one pass", "onnxq", "onnxq",
              _options(weight_bits=bits, weight_method="comq", comq_sequential=False))
      for bits in (4, 3)),
    # Evol-Q's scale search (default settings) on the default W8A8 model and on COMQ's W4A8.
    RowSpec("onnxq evolq", "onnxq", "onnxq", _options(search="evolq")),
    RowSpec("onnxq W4A8 comq + evolq", "onnxq", "onnxq",
            _options(weight_bits=4, weight_method="comq", search="evolq")),
    # Evol-Q ablations, each one setting changed from the default search: random search with the
    # same evaluations, the infoNCE and KL losses, the local (block output) loss.
    *(RowSpec(f"onnxq evolq {label}", "onnxq", "onnxq", _options(search="evolq", evolq=table),
              models=ABLATION_MODELS)
      for label, table in (("random", {"strategy": "random"}), ("infonce", {"loss": "infonce"}),
                           ("kl", {"loss": "kl"}), ("local", {"scope": "local"}))),
    # Each feed's own loss weighed equally in the search (pooled by default), at W8A8 and W4A8
    # COMQ, on the ablation models and EfficientNet-Lite0 (whose W8A8 search lost to its base).
    *(RowSpec(f"onnxq {base}evolq equal feeds", "onnxq", "onnxq",
              _options(**options, search="evolq", evolq={"feed_weighting": "equal"}),
              models=ABLATION_MODELS | {"efficientnet_lite0"})
      for base, options in (("", {}), ("W4A8 comq + ", {"weight_bits": 4, "weight_method": "comq"}))),
    # What the search moves: activation scales (default), a multiplier per weight (codes kept),
    # or both; at W8A8 and on COMQ's W4A8.
    *(RowSpec(f"onnxq {base}evolq {scales} scales", "onnxq", "onnxq",
              _options(**options, search="evolq", evolq={"scales": scales}))
      for scales in ("weights", "both")
      for base, options in (("", {}), ("W4A8 comq + ", {"weight_bits": 4, "weight_method": "comq"}))),
    # Candidates scored on the lifted graph (scales as inputs of one unfused session) instead of
    # the fused one (each candidate emitted and run as ORT optimizes it), at W8A8 and on W4A8.
    *(RowSpec(f"onnxq {base}evolq lifted", "onnxq", "onnxq",
              _options(**options, search="evolq", evolq={"graph": "lifted"}))
      for base, options in (("", {}), ("W4A8 comq + ", {"weight_bits": 4, "weight_method": "comq"}))),
    # Channel equalization of Conv activations (on by default) switched off, and without the
    # dense Convs' share: what each part of it does.
    RowSpec("onnxq no equalize", "onnxq", "onnxq", _options(equalize=False)),
    RowSpec("onnxq equalize alpha 0", "onnxq", "onnxq", _options(equalize_alpha=0.0)),
    # PP-OCR loses most of its accuracy to 8-bit activations in three early Convs (found by
    # `onnxq compare --per-layer` on the W8A8 model); with those kept float, both weight
    # quantizers again, so their difference is the weights' alone.
    *(RowSpec(f"onnxq W4A8 {method} (3 Convs float)", "onnxq", "onnxq",
              _options(weight_bits=4, weight_method=method, exclude=list(PPOCR_EXCLUDE)),
              models=frozenset({"ppocr_rec"}))
      for method in ("rtn", "comq")),
    # Mixed per-layer weight bits (2, 3, 4 or 8 per layer, 8-bit activations) chosen by measured
    # sensitivity, under a mean-bits budget and under file-size budgets (fractions of the float
    # file); then the mean-bits budget allocated at random (several seeds), the baseline that
    # shows whether the sensitivity signal is real.
    *(RowSpec(f"onnxq mixed {MIXED_AVG_BITS:g}b {method}", "onnxq", "onnxq",
              _options(avg_bits=MIXED_AVG_BITS, weight_method=method))
      for method in ("rtn", "comq")),
    *(RowSpec(f"onnxq mixed {ratio:g}x {method}", "onnxq", "onnxq",
              _options(max_size_ratio=ratio, weight_method=method))
      for method, ratios in (("rtn", MIXED_SIZE_RATIOS), ("comq", MIXED_SIZE_RATIOS[1:3]))
      for ratio in ratios),
    # Storage and latency (issue 11): 4-bit Convs in an int8 container (QLinearConv speed,
    # 8-bit bytes), and the allocator under a latency budget alone and with a size budget.
    RowSpec("onnxq W4A8 comq fast convs", "onnxq", "onnxq",
            _options(weight_bits=4, weight_method="comq", conv_storage="fast")),
    RowSpec("onnxq mixed latency 1x comq", "onnxq", "onnxq",
            _options(max_latency=1.0, weight_method="comq")),
    RowSpec(f"onnxq mixed {MIXED_SIZE_RATIOS[-1]:g}x + latency 1x comq", "onnxq", "onnxq",
            _options(max_size_ratio=MIXED_SIZE_RATIOS[-1], max_latency=1.0, weight_method="comq")),
    *(RowSpec(f"onnxq mixed {MIXED_AVG_BITS:g}b random s{seed}", "onnxq", "onnxq",
              _options(avg_bits=MIXED_AVG_BITS, allocator="random", seed=seed))
      for seed in range(3)),
    # Activation modes (issue 13): activations quantized per batch at run time in every MatMul /
    # Gemm with a constant weight (the rest static), with calibration data (SmoothQuant, bias
    # correction, the held-out check) and without any (the rest float: ORT quantize_dynamic's
    # setting); and static or dynamic chosen per layer by measured damage on calibration feeds.
    RowSpec("onnxq dynamic", "onnxq", "onnxq", _options(activations="dynamic")),
    RowSpec("onnxq dynamic (no data)", "onnxq_no_data", "onnxq"),
    RowSpec("onnxq auto", "onnxq", "onnxq", _options(activations="auto")),
    # ORT quantize_static: QDQ, per-channel int8 weights, uint8 activations.
    *(RowSpec(f"ORT {method}", "ort_static", "ORT", _options(method=method))
      for method in ("MinMax", *_ORT_HISTOGRAM)),
    # ORT's histogram calibrators stack all feeds: on feeds of different shapes they fail. Two
    # fallbacks where shapes vary: feeds zero-padded to one shape (padding moves the activation
    # ranges, and stacking wide padded feeds takes a lot of memory), and ORT's own strided
    # collection, one feed at a time, histograms merged as they come (CalibStridedMinMax=1).
    *(RowSpec(f"ORT {method} (padded feeds)", "ort_static", "ORT",
              _options(method=method, pad=True), only_varying_shapes=True)
      for method in _ORT_HISTOGRAM),
    *(RowSpec(f"ORT {method} (stride 1)", "ort_static", "ORT",
              _options(method=method, stride=1), only_varying_shapes=True)
      for method in _ORT_HISTOGRAM),
    # ORT W4A8: QInt4 per-channel weights (native INT4 QDQ needs opset 21), uint8 activations.
    RowSpec("ORT W4A8 MinMax", "ort_static", "ORT",
            _options(method="MinMax", weight_type="QInt4", opset=21)),
    # Weight-only / dynamic peers for the transformer.
    RowSpec("ORT dynamic int8", "ort_dynamic", "ORT"),
    RowSpec("ORT MatMulNBits 4-bit", "ort_nbits", "ORT",
            _options(bits=4, block_size=32, is_symmetric=True, accuracy_level=4), models=TRANSFORMERS),
    # NNCF post-training quantization on its ONNX backend (its defaults; transformer model type
    # for the transformer).
    RowSpec("NNCF", "nncf", "NNCF"),
)

ROW_BY_LABEL: dict[str, RowSpec] = {row.label: row for row in ROWS}
if len(ROW_BY_LABEL) != len(ROWS):
    raise ValueError("row labels must be unique")
