"""Tables and plots of a benchmark report (the dict `run.py` writes to results.json).

- results.md: one table per model, every column;
- summary.md: one compact table, a row per tool and a column per model (primary metric, size
  ratio, latency ratios, quantization time), the table the project README quotes;
- accuracy_vs_size.png: per model, primary metric against file size ratio, one marker per row;
- quant_time.png: per model, quantization wall time per row (log scale), peak memory beside it.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

FAMILY_COLOURS = {"float": "black", "onnxq": "tab:blue", "ORT": "tab:orange", "NNCF": "tab:green"}
MARKERS = "osD^vP*X<>hp"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _kernels(counts: dict[str, int] | None) -> str:
    if counts is None:
        return "-"
    return ", ".join(f"{op} {n}" for op, n in counts.items()) or "none"


def _islands(islands: list[str] | None) -> str:
    """'; float islands: Mul 2, Concat 1' (DequantizeLinear -> float op -> QuantizeLinear in
    ORT's optimized graph), or nothing when there are none or they were not recorded."""
    if not islands:
        return ""
    counts: dict[str, int] = {}
    for island in islands:
        op = island.split(" ", 1)[0]
        counts[op] = counts.get(op, 0) + 1
    return "; float islands: " + ", ".join(f"{op} {n}" for op, n in counts.items())


def _ratio(row: dict[str, Any], threads: int) -> str:
    entry = row.get(str(threads))
    return f"{entry['ratio']:.2f}" if entry else "-"


def _number(row: dict[str, Any], key: str, pattern: str) -> str:
    return pattern.format(row[key]) if key in row else "-"


def _metric_names(model: dict[str, Any]) -> list[str]:
    names = list(model["rows"][0]["metrics"])
    primary = model["primary_metric"]
    return [primary] + [n for n in names if n != primary]


def _header(report: dict[str, Any]) -> str:
    machine = report["machine"]
    latency = report["latency"]
    versions = ", ".join(f"{k} {machine[k]}" for k in ("onnxruntime", "onnx", "nncf") if machine.get(k))
    isa = f", {' '.join(machine['isa'])}" if machine.get("isa") else ""
    return (f"Run {report['date']} on {machine['cpu']} ({machine['cores']} cores{isa}), {versions}, "
            f"onnxq {machine.get('onnxq')}. Calibration: the first {report['feeds']} zoo feeds, the "
            f"same for every tool. Latency: ONNX Runtime CPU EP, batch 1, {latency['rounds']} "
            f"interleaved round(s) of {latency['runs']} timed runs after {latency['warmup']} warm-up; "
            f"ratio = p50 / float p50 (below 1 is faster). Shared VM: quote ratios, not milliseconds.")


def _float_latency(model: dict[str, Any]) -> str:
    row = model["rows"][0]
    parts = [f"{row[str(t)]['p50_ms']:.2f} ms at {t} thread{'s' if t > 1 else ''}"
             for t in (1, 2) if str(t) in row]
    return "float p50 " + ", ".join(parts) if parts else "float latency not measured"


def _model_intro(name: str, model: dict[str, Any]) -> str:
    feed = model["latency_feed"]
    shapes = ", ".join(f"{k} {v}" for k, v in feed["shapes"].items())
    return (f"### {name}\n\nPrimary metric: **{model['primary_metric']}**. {model['feeds']} calibration "
            f"feeds ({'of varying shapes' if model['shapes_vary'] else 'one shape'}). Latency feed "
            f"{feed['file']} ({shapes}); {_float_latency(model)}.\n")


def markdown(report: dict[str, Any]) -> str:
    lines = ["# onnxq benchmark", "", _header(report), ""]
    for name, model in report["models"].items():
        metrics = _metric_names(model)
        lines += [_model_intro(name, model)]
        lines.append("| tool | " + " | ".join(metrics) + " | calib. cosine | size | latency 1T | latency 2T "
                     "| quant s | peak MB | integer kernels (ORT, optimized graph) |")
        lines.append("|---|" + "---:|" * (len(metrics) + 6) + "---|")
        for row in model["rows"]:
            if "metrics" not in row:
                failed = f"| {row['label']} | failed: {_cell(row['error'])} |"
                lines.append(failed + " |" * (len(metrics) + 6))
                continue
            values = " | ".join(f"{row['metrics'][m]:.4f}" for m in metrics)
            kernels = _kernels(row.get("integer_kernels")) + _islands(row.get("float_islands"))
            if "error" in row:  # quantized and evaluated, but latency failed
                kernels = f"{kernels}; {_cell(row['error'])}"
            lines.append(f"| {_label(row['label'], {name: model})} | {values} | "
                         f"{_number(row, 'heldout_cosine', '{:.5f}')} | "
                         f"{row['size_ratio']:.3f} | {_ratio(row, 1)} | "
                         f"{_ratio(row, 2)} | {_number(row, 'seconds', '{:.1f}')} | "
                         f"{_number(row, 'peak_rss_mb', '{:.0f}')} | {kernels} |")
        lines.append(_earlier_note({name: model}))
    return "\n".join(lines)


def _short_error(error: str) -> str:
    if "inhomogeneous shape" in error:
        return "failed: feeds of different shapes"
    if "memory limit" in error:
        reached = error.split(" resident")[0].removeprefix("stopped at ")
        return f"failed: over the memory limit ({reached})"
    return "failed: " + (error if len(error) <= 40 else error[:37] + "...")


def summary(report: dict[str, Any]) -> str:
    """One compact table, a row per tool and a column per model; each cell: primary metric,
    size ratio, latency ratio at 1 / 2 threads, quantization seconds."""
    models = report["models"]
    labels: list[str] = []  # every model's rows, in each model's order
    for model in models.values():
        position = 0
        for row in model["rows"]:
            if row["label"] in labels:
                position = labels.index(row["label"]) + 1
            else:
                labels.insert(position, row["label"])
                position += 1
    header = " | ".join(f"{name} ({model['primary_metric']})" for name, model in models.items())
    lines = [f"| tool | {header} |", "|---|" + "---|" * len(models)]
    for label in labels:
        cells = []
        for model in models.values():
            row = next((r for r in model["rows"] if r["label"] == label), None)
            if row is None:
                cells.append("")
            elif "metrics" not in row:
                cells.append(_cell(_short_error(row["error"])))
            elif row["family"] == "float":
                cells.append(f"{row['metrics'][model['primary_metric']]:.3f}")
            else:
                cells.append(f"{row['metrics'][model['primary_metric']]:.3f} · {row['size_ratio']:.2f} · "
                             f"{_ratio(row, 1)} / {_ratio(row, 2)} · {_number(row, 'seconds', '{:.1f}')} s")
        lines.append(f"| {_label(label, models)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + _earlier_note(models)


def _earlier_runs(models: dict[str, Any]) -> dict[str, set[str]]:
    """label -> dates of the earlier runs its rows come from (rows kept by --merge)."""
    runs: dict[str, set[str]] = {}
    for model in models.values():
        for row in model["rows"]:
            if row.get("earlier_run"):
                runs.setdefault(row["label"], set()).add(row["earlier_run"][:10])
    return runs


def _label(label: str, models: dict[str, Any]) -> str:
    return f"{label} ‡" if label in _earlier_runs(models) else label


def _earlier_note(models: dict[str, Any]) -> str:
    runs = _earlier_runs(models)
    if not runs:
        return ""
    dates = ", ".join(sorted(set().union(*runs.values())))
    return (f"\n‡ kept from an earlier run ({dates}; see that run's machine and code in git history): "
            f"not re-run with this run's code, and its latency ratios are from that run.\n")


def _styles(report: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """label -> (colour, marker), the same in every subplot."""
    styles: dict[str, tuple[str, str]] = {}
    used: dict[str, int] = {}
    for model in report["models"].values():
        for row in model["rows"]:
            if row["label"] not in styles:
                index = used.get(row["family"], 0)
                used[row["family"]] = index + 1
                colour = FAMILY_COLOURS.get(row["family"], "gray")
                styles[row["label"]] = (colour, MARKERS[index % len(MARKERS)])
    return styles


def plot_accuracy_vs_size(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    styles = _styles(report)
    height = 4.4 + 0.25 * (len(styles) // max(2, min(6, len(models) * 2)) + 1)
    figure, axes = plt.subplots(1, len(models), figsize=(max(9.0, 4.6 * len(models)), height),
                                squeeze=False)
    for axis, (name, model) in zip(axes[0], models.items(), strict=True):
        primary = model["primary_metric"]
        failed = []
        for row in model["rows"]:
            if "metrics" not in row:
                failed.append(row["label"])
                continue
            colour, marker = styles[row["label"]]
            # hollow markers: rows at the same point (same size, same metric) stay visible
            axis.scatter(row["size_ratio"], row["metrics"][primary], marker=marker, s=70,
                         facecolors="none", edgecolors=colour, linewidths=1.5, label=row["label"])
        note = f"\n{len(failed)} row(s) failed, not shown (results.md)" if failed else ""
        axis.set_title(name + note, fontsize=10)
        axis.set_xlabel("file size / float")
        axis.set_ylabel(primary)
        axis.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker=m, markerfacecolor="none", markeredgewidth=1.5,
                          linestyle="", markersize=8, label=label) for label, (c, m) in styles.items()]
    columns = max(2, min(6, len(models) * 2))
    legend_rows = (len(handles) - 1) // columns + 1
    figure.legend(handles=handles, loc="lower center", ncol=columns, fontsize=8, frameon=False)
    figure.suptitle("Primary metric against file size (higher is better)")
    figure.tight_layout(rect=(0, 0.03 + 0.045 * legend_rows * 4.4 / height, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


MIXED_CURVES = (  # (legend, label pattern of the rows on the curve, style)
    ("uniform bits, round to nearest", ("onnxq default", "onnxq W?A8 rtn"), "o-"),
    ("uniform bits, COMQ", ("onnxq default", "onnxq W?A8 comq"), "s-"),
    ("mixed bits (allocator), round to nearest", ("onnxq mixed * rtn",), "^--"),
    ("mixed bits (allocator), COMQ", ("onnxq mixed * comq",), "v--"),
    ("mixed bits, random allocation", ("onnxq mixed *b random s*",), "x"),
)


def mixed_points(model: dict[str, Any], patterns: tuple[str, ...]) -> list[tuple[float, float, str]]:
    """(size ratio, primary metric, label) of the rows matching the patterns, by size."""
    primary = model["primary_metric"]
    return sorted((row["size_ratio"], row["metrics"][primary], row["label"]) for row in model["rows"]
                  if "metrics" in row and any(fnmatch.fnmatchcase(row["label"], p) for p in patterns))


def plot_mixed_bits(report: dict[str, Any], path: Path) -> None:
    """Per model, the primary metric against file size: uniform weight bits (8, 4, 3) against
    mixed per-layer bits at several mean-bits budgets, and random allocations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {name: model for name, model in report["models"].items()
              if mixed_points(model, MIXED_CURVES[2][1])}
    if not models:
        return
    figure, axes = plt.subplots(1, len(models), figsize=(max(9.0, 4.6 * len(models)), 4.8), squeeze=False)
    for axis, (name, model) in zip(axes[0], models.items(), strict=True):
        for legend, patterns, style in MIXED_CURVES:
            points = mixed_points(model, patterns)
            if points:
                axis.plot([p[0] for p in points], [p[1] for p in points], style, label=legend,
                          markerfacecolor="none")
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("file size / float")
        axis.set_ylabel(model["primary_metric"])
        axis.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    figure.suptitle("Mixed against uniform weight bits (8-bit activations; higher is better)")
    figure.tight_layout(rect=(0, 0.1, 1, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_quant_time(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    height = max(len(m["rows"]) for m in models.values()) * 0.32 + 1.2
    figure, axes = plt.subplots(1, len(models), figsize=(max(9.0, 5.2 * len(models)), height),
                                squeeze=False)
    for axis, (name, model) in zip(axes[0], models.items(), strict=True):
        rows = [row for row in model["rows"] if row["family"] != "float"]
        labels = [row["label"] for row in rows]
        seconds = [row.get("seconds", 0.0) if "metrics" in row else 0.0 for row in rows]
        colours = [FAMILY_COLOURS.get(row["family"], "gray") for row in rows]
        positions = range(len(rows))
        axis.barh(positions, seconds, color=colours)
        axis.set_yticks(list(positions), labels, fontsize=8)
        axis.invert_yaxis()
        axis.set_xscale("log")
        smallest = min([s for s in seconds if s > 0] or [1.0])
        for position, row, value in zip(positions, rows, seconds, strict=True):
            if "metrics" not in row:
                axis.text(smallest, position, " failed", va="center", fontsize=7, color="firebrick")
            else:
                axis.text(value, position, f" {value:.1f} s, {row.get('peak_rss_mb', float('nan')):.0f} MB",
                          va="center", fontsize=7)
        axis.set_xlim(smallest / 2, max(seconds + [1.0]) * 8)
        axis.set_title(name)
        axis.set_xlabel("quantization wall time, s (log)")
        axis.grid(axis="x", alpha=0.3)
    figure.suptitle("Quantization wall time and peak memory of the quantizing process")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_reports(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "results.md").write_text(markdown(report))
    (out / "summary.md").write_text(summary(report))
    plot_accuracy_vs_size(report, out / "accuracy_vs_size.png")
    plot_quant_time(report, out / "quant_time.png")
    plot_mixed_bits(report, out / "mixed_bits.png")


if __name__ == "__main__":  # redraw the tables and plots of an existing results.json
    import sys

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
    write_reports(json.loads((folder / "results.json").read_text()), folder)
