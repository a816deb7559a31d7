"""`onnxq bench`: time models under ONNX Runtime and compare them side by side.

    onnxq bench float.onnx int8.onnx --threads 1 --runs 100

Every model gets the same feed (made from the first model's inputs, or read with --data) and
the same session settings, so the table's ratio columns (against the first model) compare
models, not set-ups. Exit codes as in every onnxq command: 0 measured; 2 bad input (a missing
or broken model, a feed that does not fit, models with different inputs, a malformed flag),
always as one line on stderr; 1 an internal error.

Under the table, each model's float islands (a float op between a DequantizeLinear and a
QuantizeLinear in ORT's optimized graph: a fusion ORT missed) are listed by op type and node.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from onnxq.cli.support import OneLineCommand, reports_errors
from onnxq.errors import ConfigError
from onnxq.report.bench import (
    BenchResult,
    BenchSettings,
    benchmark_model,
    check_same_inputs,
    make_feed,
    ratios,
)

logger = logging.getLogger(__name__)


@click.command("bench", cls=OneLineCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("models", metavar="MODEL [MODEL ...]", nargs=-1, required=True,
                type=click.Path(path_type=Path))
@click.option("--threads", type=int, metavar="N", default=1, show_default=True,
              help="Intra-op threads of ONNX Runtime (inter-op threads: 1).")
@click.option("--provider", metavar="cpu|cuda", default="cpu", show_default=True,
              help="Execution provider; cuda needs an onnxruntime build with CUDAExecutionProvider "
                   "(times then include copies to and from the GPU).")
@click.option("--batch", type=int, metavar="N", default=None,
              help="Samples per run: the size of every symbolic axis 0 [default: 1].")
@click.option("--shape", "shapes", metavar="NAME=D1,D2,...", multiple=True,
              help="Full shape of one input (repeatable), for symbolic dims other than the batch "
                   "[default: 128 for sequence dims, 224 for image dims].")
@click.option("--data", type=click.Path(path_type=Path), default=None, metavar="FEED.npz",
              help="Feed from a .npz, one array per input: the first --batch samples on axis 0 "
                   "are used [default: random normal floats, token ids in [0, 100), masks of ones].")
@click.option("--runs", type=int, metavar="N", default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=int, metavar="N", default=5, show_default=True,
              help="Untimed runs before timing, per model.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list on stdout, one object per model (with ratios to the first).")
@reports_errors
def bench(models: tuple[Path, ...], threads: int, provider: str, batch: int | None,
          shapes: tuple[str, ...], data: Path | None, runs: int, warmup: int, as_json: bool) -> None:
    """Measure latency (p50, p90), throughput, session load time, file size and the integer
    kernels ONNX Runtime runs, for one MODEL or several side by side.

    Several models are compared against the first: size ratio, p50 ratio and speed-up (first
    p50 / this p50). They must take the same inputs: all are given one feed, made from the
    first model's declared input shapes and dtypes, or read with --data. Latency is wall time
    of session.run; on a shared machine run enough --runs and compare p50s.

    \b
    Examples:
      onnxq bench model.onnx model.int8.onnx --runs 200
      onnxq bench minilm.onnx --batch 8 --shape input_ids=8,64 --shape attention_mask=8,64
      onnxq bench model.int8.onnx --data calib.npz --batch 16 --threads 2 --json

    Exit codes: 0 measured; 2 bad input (one line on stderr); 1 internal error.
    """
    settings = BenchSettings(threads=threads, provider=provider, warmup=warmup, runs=runs, batch=batch,
                             shapes=tuple(parse_shape(text) for text in shapes))
    check_same_inputs(models)
    feed = make_feed(models[0], settings, data)
    results = []
    with _status(not as_json) as show:
        for index, model in enumerate(models, start=1):
            show(f"timing {model} ({index}/{len(models)}): {settings.runs} runs")
            results.append(benchmark_model(model, feed, settings))
    if as_json:
        click.echo(json.dumps(report_rows(results), indent=2))
    else:
        _print_table(results, settings, data)


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """'input_ids=1,128' -> ('input_ids', (1, 128))."""
    name, equals, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        shape = ()
    if not equals or not name.strip() or not shape or min(shape) < 1:
        raise ConfigError(f"bad --shape {text!r}: expected NAME=D1,D2,... with positive integers, "
                          f"e.g. input_ids=1,128")
    return name.strip(), shape


def report_rows(results: Sequence[BenchResult]) -> list[dict[str, object]]:
    """JSON-ready rows: every BenchResult field plus its ratios to the first model."""
    return [result.to_dict() | ratio for result, ratio in zip(results, ratios(results), strict=True)]


@contextlib.contextmanager
def _status(wanted: bool) -> Iterator:
    """A status line on stderr while models are timed (only on a terminal)."""
    console = Console(stderr=True)
    if not wanted or not console.is_terminal:
        yield lambda message: None
        return
    with console.status("") as status:
        yield lambda message: status.update(message)


def _kernels_text(kernels: dict[str, int]) -> str:
    return ", ".join(f"{op} x{n}" for op, n in kernels.items()) or "none"


def _islands_text(islands: Sequence[str]) -> str:
    counts = collections.Counter(island.split(" ", 1)[0] for island in islands)
    return ", ".join(f"{op} x{n}" for op, n in counts.items()) or "none"


def _print_table(results: Sequence[BenchResult], settings: BenchSettings, data: Path | None) -> None:
    first = results[0]
    feed = f"data {data}" if data is not None else "random feed"
    table = Table(title=f"{first.provider}, {first.threads} thread(s), batch {first.batch}, {feed}; "
                        f"{settings.runs} runs after {settings.warmup} warm-up")
    for column in ("model", "file MB", "load s", "p50 ms", "p90 ms", "throughput/s",
                   "integer kernels", "float islands", "size x", "p50 x", "speed-up"):
        table.add_column(column, justify="left" if column in ("model", "integer kernels", "float islands")
                         else "right")
    names = [Path(result.model).name for result in results]
    labels = names if len(set(names)) == len(names) else [result.model for result in results]
    for label, result, ratio in zip(labels, results, ratios(results), strict=True):
        table.add_row(label, f"{result.file_bytes / 1e6:.2f}", f"{result.load_seconds:.3f}",
                      f"{result.p50_ms:.3f}", f"{result.p90_ms:.3f}", f"{result.throughput_per_s:,.0f}",
                      _kernels_text(result.integer_kernels), _islands_text(result.float_islands),
                      f"{ratio['size_ratio']:.3f}",
                      f"{ratio['p50_ratio']:.3f}", f"{ratio['speedup']:.2f}")
    console = Console()
    if not console.is_terminal:  # a pipe or a file: no 80-column wrap of a wide table
        console = Console(width=max(console.width, 160))
    console.print(table)
    for label, result in zip(labels, results, strict=True):
        if result.float_islands:
            console.print(f"{label}: float islands (DequantizeLinear -> float op -> QuantizeLinear): "
                          f"{', '.join(result.float_islands)}", markup=False, highlight=False)
