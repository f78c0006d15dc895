"""The report DataFrame (schema), its writers (CSV, Markdown, PNG plots), the environment header,
and the conversion of pytest-benchmark JSON into the same DataFrame."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .metrics import NOISE_MEDIAN_CI, NOISE_TAIL, ceiling_share, floor_ms, floor_ratio
from .timing import HOST_CLOCKS
from .workloads import ceiling_backend_id

__all__ = [
    "COLUMNS",
    "EXTRA_COLUMNS",
    "make_frame",
    "error_status",
    "add_speedup",
    "add_quant_floor",
    "add_ceiling_share",
    "add_derived",
    "speedup_pivot",
    "environment_info",
    "write_csv",
    "read_csv",
    "to_markdown",
    "write_markdown",
    "write_plots",
    "speedup_figure",
    "write_report",
    "from_pytest_benchmark_json",
]

logger = logging.getLogger(__name__)

#: Columns every report row has, in order (M, N, K numeric; status "ok" or why the row did not run).
COLUMNS: tuple[str, ...] = (
    "workload",
    "backend",
    "dtype",
    "M",
    "N",
    "K",
    "runs",
    "latency_ms_median",
    "latency_ms_p90",
    "latency_ms_p99",
    "latency_ms_mean",
    "latency_ms_std",
    "tflops",
    "gbps",
    "speedup_vs_baseline",
    "rel_error",
    "sqnr_db",
    "peak_mem_mb",
    "weight_bytes",
    "status",
)

#: Further columns, after COLUMNS: context, setup costs, LM accuracy, then (added for the speed
#: suites; empty in older reports, which `read_csv` still reads):
#: target: the suite part a row serves ("quant", "prefill", "decode"; "" outside suites);
#: impl: what computes the activation quantization ("triton", "torch", "torch.compile", "copy", ...);
#: bytes_moved: the bytes per call that `gbps` counts (linear: fewest bytes; quant: the algorithm's,
#:   3 B/element for one pass over bf16, 5 for the two-pass dynamic per-tensor; copy: 4);
#: copy_gbps / floor_ms / floor_ratio (quant rows): the copy bandwidth measured in the same run for
#:   the same M x K and timing mode, bytes_moved at that bandwidth, and latency / floor;
#: ceiling_backend / ceiling_ms / ceiling_share (fp8 linear rows): the bare `_scaled_mm` row of the
#:   same shape and timing mode, its latency, and ceiling_ms / latency (1.0 = no overhead);
#: latency_spread / noisy: (p90 - p10) / median of the row's calls, and whether its median cannot be
#:   trusted (`metrics.latency_stats`); noisy rows are marked in the Markdown and the plots.
EXTRA_COLUMNS: tuple[str, ...] = (
    "shape",
    "device",
    "compiled",
    "weight_copies",
    "setup_s",
    "first_call_s",
    "top1_agreement",
    "perplexity",
    "ppl_tokens",
    "target",
    "impl",
    "bytes_moved",
    "copy_gbps",
    "floor_ms",
    "floor_ratio",
    "ceiling_backend",
    "ceiling_ms",
    "ceiling_share",
    "latency_spread",
    "noisy",
)

_INT_COLUMNS = ("M", "N", "K", "runs", "weight_bytes", "weight_copies", "ppl_tokens", "bytes_moved")
_STR_COLUMNS = (
    "workload", "backend", "dtype", "status", "shape", "device", "target", "impl", "ceiling_backend", "attention"
)
_BOOL_COLUMNS = ("compiled", "noisy")


def error_status(exc: BaseException) -> str:
    """A report `status` for a failed row: "error: <type>: <message>" on one line, at most ~300 characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return "error: " + (text[:300] + "..." if len(text) > 300 else text)


def make_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Rows (dicts) -> DataFrame with COLUMNS then EXTRA_COLUMNS (then any others), typed.

    Integer columns are nullable `Int64` (<NA> where a row has no value, e.g. N/K of a model row),
    float columns float64 (NaN where not measured), text columns `object` strings.
    """
    frame = pd.DataFrame(list(rows))
    for column in COLUMNS + EXTRA_COLUMNS:
        if column not in frame.columns:
            frame[column] = None
    others = [c for c in frame.columns if c not in COLUMNS + EXTRA_COLUMNS]
    frame = frame[list(COLUMNS + EXTRA_COLUMNS) + others]
    return _apply_dtypes(frame)


def _apply_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    for column in frame.columns:
        if column in _INT_COLUMNS:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
        elif column in _STR_COLUMNS:
            frame[column] = frame[column].astype(object).where(frame[column].notna(), "")
            frame[column] = frame[column].astype(str).astype(object)
        elif column in _BOOL_COLUMNS:
            frame[column] = frame[column].map(lambda v: bool(v) if v is not None and v == v else False).astype(bool)
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("float64")
    return frame


def environment_info(clock: str | None = None) -> dict[str, str]:
    """GPU name, driver, torch / CUDA / TensorRT / ONNX Runtime versions, host, date (UTC), torch's
    intra-op CPU thread count (what CPU rows ran with; the CLI pins 1 on a CPU run) and, given the
    run's `TimingConfig.clock`, how CPU rows were timed."""
    import importlib.metadata as md

    import torch

    info: dict[str, str] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none",
        "platform": platform.platform(),
        "torch_threads": str(torch.get_num_threads()),
    }
    if clock is not None:
        info["cpu_timer"] = f"{clock} (time.{HOST_CLOCKS[clock]})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs)"
        info["driver"] = _nvidia_driver()
    else:
        info["gpu"] = "none (CPU run)"
        info["cpu"] = platform.processor() or platform.machine()
    for label, dist in (
        ("triton", "triton"),
        ("tensorrt", "tensorrt"),
        ("onnxruntime", "onnxruntime"),
        ("transformers", "transformers"),
    ):
        try:
            info[label] = md.version(dist)
        except md.PackageNotFoundError:
            info[label] = "not installed"
    return info


def _nvidia_driver() -> str:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_csv(frame: pd.DataFrame, path: str | Path) -> Path:
    """Write the report as CSV (no index; NaN / <NA> as empty fields), atomically."""
    return _write_text_atomic(Path(path), frame.to_csv(index=False))


def read_csv(path: str | Path) -> pd.DataFrame:
    """Read a report CSV back with the report's dtypes (the inverse of `write_csv`).

    Reports written before a column was added read back with that column empty, in the
    COLUMNS + EXTRA_COLUMNS order.
    """
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: not an fp8kit.bench report, missing columns {missing}")
    return make_frame(frame.to_dict("records"))


def _fmt(value: Any, column: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if column == "noisy":
        return "noisy" if bool(value) else ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if column == "speedup_vs_baseline":
            return f"{value:.2f}x" if value >= 0.1 else f"{value:.3g}x"
        if column == "rel_error":
            return f"{value:.2e}"
        if column.startswith("latency_ms"):
            return f"{value:.4f}" if value < 1 else f"{value:.3f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def to_markdown(frame: pd.DataFrame, columns: Iterable[str] | None = None) -> str:
    """A GitHub Markdown table of `frame` (all COLUMNS by default)."""
    cols = [c for c in (columns or COLUMNS) if c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for record in frame[cols].itertuples(index=False):
        lines.append("| " + " | ".join(_fmt(v, c) for v, c in zip(record, cols)) + " |")
    return "\n".join(lines) + "\n"


_SUMMARY_COLUMNS = (
    "workload",
    "backend",
    "M",
    "N",
    "K",
    "latency_ms_median",
    "latency_ms_p90",
    "noisy",
    "tflops",
    "gbps",
    "speedup_vs_baseline",
    "sqnr_db",
    "rel_error",
    "top1_agreement",
    "perplexity",
    "status",
)


def write_markdown(
    frame: pd.DataFrame, path: str | Path, *, env: Mapping[str, str] | None = None, title: str = "fp8kit.bench report",
    command: str | None = None,
) -> Path:
    """Write `report.md`: environment header, the speedup pivot per shape, then every row.

    Rows that did not run are listed with their reason; speedups below 1.00x (FP8 slower than the
    baseline) are marked in bold.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(env) if env is not None else environment_info()
    parts = [f"# {title}\n"]
    parts.append("| environment | value |\n|---|---|\n" + "".join(f"| {k} | {_fmt(v, k)} |\n" for k, v in env.items()))
    if command:
        parts.append(f"Reproduce: `{command}`\n")
    baseline = frame.attrs.get("baseline")
    if baseline:
        parts.append(
            f"Speedup is `{baseline}` median latency / the backend's median latency, measured in the same run; "
            "**bold** marks rows where the backend is slower than the baseline.\n"
        )
    noisy = int(frame["noisy"].sum()) if "noisy" in frame.columns else 0
    if noisy:
        parts.append(
            f"**{noisy} of {len(frame)} rows are noisy**: the 95% confidence interval of their median is wider "
            f"than +-{NOISE_MEDIAN_CI:.0%}, or their p90 is over {NOISE_TAIL:g}x the median (a busy machine), so "
            "their medians and ratios cannot be trusted; they are marked `noisy` below and drawn hollow in the "
            "plots. Rerun on an idle machine, with `--threads 1` on a CPU, or with a larger `--min-runs` / "
            "`--budget-ms`.\n"
        )
    pivot = speedup_pivot(frame)
    if not pivot.empty:
        parts.append("## Speedup vs baseline (median latency)\n")
        parts.append(_pivot_markdown(pivot, _pivot(frame, "noisy").eq(True)))
    parts.extend(_target_sections(frame))
    not_run = frame[frame["status"] != "ok"]
    if not not_run.empty:
        reasons = not_run.groupby(["backend", "status"]).size().reset_index(name="rows")
        parts.append("## Rows that did not run\n")
        parts.append(to_markdown(reasons, ["backend", "status", "rows"]))
    parts.append("## All rows\n")
    cols = [c for c in _SUMMARY_COLUMNS if c in frame.columns and (c in COLUMNS or _shown(frame[c]))]
    parts.append(to_markdown(frame, cols))
    return _write_text_atomic(path, "\n".join(parts))


_TARGET_COLUMNS: dict[str, tuple[str, ...]] = {
    "quant": (
        "workload", "backend", "impl", "M", "K", "latency_ms_median", "gbps", "bytes_moved", "copy_gbps", "floor_ms",
        "floor_ratio", "sqnr_db", "noisy", "status",
    ),
    "linear": (
        "workload", "backend", "M", "N", "K", "latency_ms_median", "tflops", "gbps", "speedup_vs_baseline",
        "ceiling_backend", "ceiling_share", "sqnr_db", "noisy", "status",
    ),
}
_TARGET_TITLES = {
    "quant": "Quantization kernels (floor = bytes_moved at the copy bandwidth of the same M x K and timing mode)",
    "prefill": "Prefill linears (ceiling_share = bare _scaled_mm latency / row latency)",
    "decode": "Decode linears (-graph rows: CUDA-graph replay, speedup vs torch-bf16-graph)",
}


def _target_sections(frame: pd.DataFrame) -> list[str]:
    """One Markdown table per `target` label present (rows of suites), in the suites' order."""
    if "target" not in frame.columns:
        return []
    parts: list[str] = []
    targets = [t for t in dict.fromkeys(frame["target"]) if t]
    for target in targets:
        rows = frame[frame["target"] == target]
        columns = _TARGET_COLUMNS["quant" if rows["workload"].str.startswith("quant:").all() else "linear"]
        parts.append(f"## Target `{target}`: {_TARGET_TITLES.get(target, target)}\n")
        parts.append(to_markdown(rows, columns))
    return parts


def _shown(column: pd.Series) -> bool:
    """Whether a summary column has anything to show (a value, or a True flag)."""
    return bool(column.any()) if column.dtype == bool else bool(column.notna().any())


def speedup_pivot(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows (workload, N, K, M) x columns backend -> speedup_vs_baseline, for rows that ran."""
    return _pivot(frame, "speedup_vs_baseline")


def _pivot(frame: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows (workload, N, K, M) x columns backend -> `column`, for rows that ran and have a speedup."""
    ok = frame[(frame["status"] == "ok") & frame["speedup_vs_baseline"].notna()]
    if ok.empty:
        return pd.DataFrame()
    ok = ok.assign(N=ok["N"].astype("float64"), K=ok["K"].astype("float64"), M=ok["M"].astype("int64"))
    pivot = ok.set_index(["workload", "N", "K", "M", "backend"])[column]
    pivot = pivot[~pivot.index.duplicated()].unstack("backend")
    order = [b for b in dict.fromkeys(frame["backend"]) if b in pivot.columns]
    return pivot[order]


def _pivot_markdown(pivot: pd.DataFrame, noisy: pd.DataFrame | None = None) -> str:
    """The speedup pivot as Markdown: **bold** below 1.00x, "(noisy)" where `noisy` (same index) is True."""
    head = ["workload", "N", "K", "M"] + list(pivot.columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for index, values in pivot.iterrows():
        workload, n, k, m = index
        cells = [str(workload), _int_or_blank(n), _int_or_blank(k), _int_or_blank(m)]
        for backend, v in values.items():
            if v is None or (isinstance(v, float) and math.isnan(v)):
                cells.append("")
                continue
            text = f"{v:.2f}x" if v >= 0.1 else f"{v:.3g}x"
            text = f"**{text}**" if v < 1 else text
            if noisy is not None and bool(noisy.at[index, backend]):
                text += " (noisy)"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _int_or_blank(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(int(value))


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def write_plots(frame: pd.DataFrame, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """PNG plots: speedup vs M per (N, K) shape (one file per shape, one line per backend, see
    `speedup_figure`), and accuracy (SQNR in dB, median over M) per backend; file names start with
    `prefix`. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    ok = frame[(frame["status"] == "ok")]
    linear = ok[ok["workload"].str.startswith("linear:") & ok["speedup_vs_baseline"].notna()]
    backends = list(dict.fromkeys(frame["backend"]))
    for (n, k), shape_rows in linear.groupby(["N", "K"]):
        fig = speedup_figure(shape_rows, backends, str(frame.attrs.get("baseline", "baseline")))
        path = _savefig(fig, out_dir / f"{prefix}speedup_{int(n)}x{int(k)}.png")
        plt.close(fig)
        written.append(path)

    acc = ok[ok["sqnr_db"].notna() & ok["sqnr_db"].apply(lambda v: math.isfinite(v))]
    if not acc.empty:
        per_backend = acc.groupby(["backend", acc["workload"].str.startswith("model:")])["sqnr_db"].median().unstack()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        per_backend = per_backend.rename(columns={False: "linear layers", True: "whole model (logits)"})
        per_backend.plot.barh(ax=ax)
        ax.set_xlabel("SQNR vs float64 / fp32 reference (dB, median over shapes; higher is better)")
        ax.set_ylabel("")
        ax.grid(True, axis="x", alpha=0.3)
        fig.tight_layout()
        path = _savefig(fig, out_dir / f"{prefix}accuracy_sqnr.png")
        plt.close(fig)
        written.append(path)
    return written


_TIMING_STYLES = {"eager": "-", "compiled": "--", "CUDA graph": ":"}
_LINESTYLE_NAMES = {"-": "solid", "--": "dashed", ":": "dotted"}
_MARKERS = "osD^vPX*hp<>"


def _timing_mode(backend: str) -> str:
    return "CUDA graph" if backend.endswith("-graph") else ("compiled" if "-compiled" in backend else "eager")


def _backend_style(backend: str, backends: list[str]) -> tuple[Any, str]:
    """(colour, marker) of a backend: tab20's ten dark hues first, then their light partners, so
    neighbours in the backend order (a scheme and its -fastacc twin) never share a hue; the marker
    cycles independently, so even same-hue pairs differ in shape."""
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20").colors
    palette = tab20[0::2] + tab20[1::2]
    i = backends.index(backend) if backend in backends else len(backends)
    return palette[i % len(palette)], _MARKERS[i % len(_MARKERS)]


def speedup_figure(rows: pd.DataFrame, backends: list[str], baseline: str) -> Any:
    """The speedup-vs-M figure of one (N, K) shape: one line per backend in `rows`, log-log axes
    (speedups range over 0.02x..3x), the 1x line, and a legend naming only what is drawn: the
    backends, the line styles (eager / compiled / CUDA graph) present, and "noisy" (hollow markers)
    when a drawn point is noisy. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(10, 5))
    modes: set[str] = set()
    any_noisy = False
    for backend, group in rows.groupby("backend", sort=False):
        group = group.sort_values("M")
        mode = _timing_mode(str(backend))
        modes.add(mode)
        color, marker = _backend_style(str(backend), backends)
        m = group["M"].astype(float).to_numpy()
        y = group["speedup_vs_baseline"].to_numpy(dtype=float)
        noisy = group["noisy"].to_numpy(dtype=bool) if "noisy" in group.columns else np.zeros(len(group), dtype=bool)
        any_noisy |= bool(noisy.any())
        ax.plot(m, y, linestyle=_TIMING_STYLES[mode], color=color, label=str(backend), marker=marker, markersize=5,
                markevery=[i for i in range(len(m)) if not noisy[i]])
        if noisy.any():
            ax.plot(m[noisy], y[noisy], linestyle="none", marker=marker, markersize=7, markerfacecolor="none",
                    markeredgecolor=color)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("M (rows of activation)")
    ax.set_ylabel(f"speedup vs {baseline} (median latency, log scale)")
    n, k = int(rows["N"].iloc[0]), int(rows["K"].iloc[0])
    names = ", ".join(sorted(set(rows["workload"].str.removeprefix("linear:"))))
    ax.set_title(f"N x K = {n} x {k} ({names})", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any_noisy:
        handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none", markeredgecolor="gray"))
        labels.append("noisy (median not trusted)")
    title = ", ".join(
        f"{_LINESTYLE_NAMES[style]} {mode}" for mode, style in _TIMING_STYLES.items() if mode in modes
    ) if modes - {"eager"} else None
    ax.legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=title, title_fontsize=7)
    fig.tight_layout()
    return fig


def _savefig(fig: Any, path: Path) -> Path:
    tmp = _tmp_path(path)
    try:
        fig.savefig(tmp, dpi=110, format="png")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_report(
    frame: pd.DataFrame, out_dir: str | Path, *, env: Mapping[str, str] | None = None, command: str | None = None,
    title: str = "fp8kit.bench report", stem: str = "report",
) -> dict[str, Path | list[Path]]:
    """<stem>.csv, <stem>.md, env.json and the PNG plots under `out_dir` (each written atomically).

    With a `stem` other than "report" (a suite's name) the environment goes to <stem>.env.json and
    the plots are prefixed "<stem>_", so a suite can share a directory with the default report.
    """
    out_dir = Path(out_dir)
    env = dict(env) if env is not None else environment_info()
    out_dir.mkdir(parents=True, exist_ok=True)
    default = stem == "report"
    env_path = out_dir / ("env.json" if default else f"{stem}.env.json")
    _write_text_atomic(env_path, json.dumps({**env, "command": command or ""}, indent=2) + "\n")
    return {
        "csv": write_csv(frame, out_dir / f"{stem}.csv"),
        "markdown": write_markdown(frame, out_dir / f"{stem}.md", env=env, command=command, title=title),
        "env": env_path,
        "plots": write_plots(frame, out_dir, prefix="" if default else f"{stem}_"),
    }


def from_pytest_benchmark_json(source: str | Path | Mapping[str, Any]) -> pd.DataFrame:
    """pytest-benchmark's `--benchmark-json` output -> the report DataFrame.

    Each benchmark's `extra_info` supplies workload, backend, dtype, M, N, K, tflops, rel_error,
    sqnr_db, ... (as the fp8kit suite in tests/benchmarks records them); `stats` supplies the
    latencies (seconds in the JSON, ms here). p90 / p99 come from the raw `data` when the run kept
    it (`--benchmark-save-data`), else NaN. Speedup is computed against the `torch-*` backend of
    the same shape, when the JSON has one.
    """
    if isinstance(source, Mapping):
        doc = source
    else:
        doc = json.loads(Path(source).read_text())
    if "benchmarks" not in doc:
        raise ValueError("not a pytest-benchmark JSON document: no 'benchmarks' key")
    import numpy as np

    rows: list[dict[str, Any]] = []
    for bench in doc["benchmarks"]:
        stats = bench.get("stats") or {}
        extra = dict(bench.get("extra_info") or {})
        data = stats.get("data")
        row: dict[str, Any] = {
            "workload": extra.pop("workload", bench.get("group") or bench.get("name", "")),
            "backend": extra.pop("backend", bench.get("name", "")),
            "runs": stats.get("rounds"),
            "latency_ms_median": _s_to_ms(stats.get("median")),
            "latency_ms_mean": _s_to_ms(stats.get("mean")),
            "latency_ms_std": _s_to_ms(stats.get("stddev")),
            "latency_ms_p90": _s_to_ms(float(np.percentile(data, 90))) if data else float("nan"),
            "latency_ms_p99": _s_to_ms(float(np.percentile(data, 99))) if data else float("nan"),
            "status": extra.pop("status", "ok"),
            "pytest_name": bench.get("fullname", bench.get("name", "")),
        }
        m, n, k = extra.get("M"), extra.get("N"), extra.get("K")
        flops = extra.pop("flops", None)
        if flops is None and None not in (m, n, k):
            flops = 2 * int(m) * int(n) * int(k)
        for key, value in extra.items():
            row.setdefault(key, value)
        if row.get("tflops") is None and flops is not None:
            row["tflops"] = flops / (row["latency_ms_median"] * 1e-3) / 1e12 if row["latency_ms_median"] else float("nan")
        rows.append(row)
    frame = make_frame(rows)
    baseline = next((b for b in frame["backend"] if str(b).startswith("torch-") and not str(b).endswith("-graph")), None)
    return add_speedup(frame, baseline)  # "-graph" rows compare with the baseline's "-graph" row


def _s_to_ms(value: Any) -> float:
    return float(value) * 1e3 if value is not None else float("nan")


def add_speedup(frame: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """speedup_vs_baseline = baseline median / row median within the same (workload, M, N, K, device).

    Rows computed on another device than the baseline (ort-cpu in a GPU run) get NaN.

    Rows of CUDA-graph-timed backends (ids ending in "-graph") compare with `<baseline>-graph`
    when the frame has it, so both sides are timed the same way.
    """
    frame["speedup_vs_baseline"] = float("nan")
    if baseline is None or frame.empty:
        return frame
    if "device" not in frame.columns:
        frame["device"] = ""
    keys = ["workload", "M", "N", "K", "device"] + (["target"] if "target" in frame.columns else [])
    graph_baseline = f"{baseline}-graph"
    has_graph_baseline = bool((frame["backend"] == graph_baseline).any())
    ref_backend = frame["backend"].map(
        lambda b: graph_baseline if has_graph_baseline and str(b).endswith("-graph") else baseline
    )
    base = frame[(frame["status"] == "ok")][keys + ["backend", "latency_ms_median"]]
    base = base.rename(columns={"latency_ms_median": "_baseline_ms", "backend": "_ref_backend"})
    merged = frame[keys].assign(_ref_backend=ref_backend.to_numpy()).merge(base, on=keys + ["_ref_backend"], how="left")
    frame["speedup_vs_baseline"] = (merged["_baseline_ms"].to_numpy() / frame["latency_ms_median"].to_numpy())
    frame.attrs["baseline"] = baseline
    return frame


def _key(row: Any, columns: Iterable[str]) -> tuple[Any, ...]:
    return tuple(None if (v is pd.NA or (isinstance(v, float) and math.isnan(v))) else v for v in (row[c] for c in columns))


def add_quant_floor(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill copy_gbps, floor_ms and floor_ratio of quantization rows (workload "quant:...").

    The reference is the `copy` row (`copy-graph` for `-graph` rows) of the same workload, M, K,
    device and target that ran: floor_ms = bytes_moved at its GB/s; floor_ratio = latency / floor_ms.
    Rows without such a copy row, or that did not run, get NaN.
    """
    for column in ("copy_gbps", "floor_ms", "floor_ratio"):
        frame[column] = float("nan")
    if frame.empty or "bytes_moved" not in frame.columns:
        return frame
    keys = [c for c in ("workload", "M", "K", "device", "target") if c in frame.columns]
    quant = frame["workload"].astype(str).str.startswith("quant:")
    copies: dict[tuple[Any, ...], float] = {}
    for _, row in frame[quant & (frame["status"] == "ok") & frame["backend"].isin(["copy", "copy-graph"])].iterrows():
        copies[(*_key(row, keys), row["backend"] == "copy-graph")] = float(row["gbps"])
    for index, row in frame[quant & (frame["status"] == "ok")].iterrows():
        copy_gbps = copies.get((*_key(row, keys), str(row["backend"]).endswith("-graph")))
        if copy_gbps is None or row["bytes_moved"] is pd.NA:
            continue
        floor = floor_ms(float(row["bytes_moved"]), copy_gbps)
        frame.at[index, "copy_gbps"] = copy_gbps
        frame.at[index, "floor_ms"] = floor
        frame.at[index, "floor_ratio"] = floor_ratio(float(row["latency_ms_median"]), floor)
    return frame


def add_ceiling_share(frame: pd.DataFrame) -> pd.DataFrame:
    """Fill ceiling_backend, ceiling_ms and ceiling_share of ``fp8-*`` linear rows.

    The ceiling is the `scaled-mm-*` row named by `workloads.ceiling_backend_id` (same scaling,
    `-fastacc` and `-graph`) of the same workload, M, N, K, device and target; if that one is absent,
    the fastest `scaled-mm-*` row of the same timing mode (eager or graph). ceiling_share =
    ceiling_ms / latency (1.0: the FP8 linear costs no more than its bare GEMM).
    """
    frame["ceiling_backend"] = ""
    frame["ceiling_ms"] = float("nan")
    frame["ceiling_share"] = float("nan")
    if frame.empty:
        return frame
    keys = [c for c in ("workload", "M", "N", "K", "device", "target") if c in frame.columns]
    ok = frame[frame["status"] == "ok"]
    ceilings: dict[tuple[Any, ...], dict[str, float]] = {}
    for _, row in ok[ok["backend"].astype(str).str.startswith("scaled-mm-")].iterrows():
        ceilings.setdefault(_key(row, keys), {})[str(row["backend"])] = float(row["latency_ms_median"])
    for index, row in ok[ok["backend"].astype(str).str.startswith("fp8-")].iterrows():
        wanted = ceiling_backend_id(str(row["backend"]))
        found = ceilings.get(_key(row, keys), {})
        if wanted in found:
            chosen = wanted
        else:
            graph = str(row["backend"]).endswith("-graph")
            same_mode = {b: ms for b, ms in found.items() if b.endswith("-graph") == graph}
            if not same_mode:
                continue
            chosen = min(same_mode, key=same_mode.__getitem__)
        frame.at[index, "ceiling_backend"] = chosen
        frame.at[index, "ceiling_ms"] = found[chosen]
        frame.at[index, "ceiling_share"] = ceiling_share(found[chosen], float(row["latency_ms_median"]))
    return frame


def add_derived(frame: pd.DataFrame, baseline: str | None) -> pd.DataFrame:
    """Every column computed across rows of the same run: speedup, quantization floor, GEMM ceiling."""
    frame = add_speedup(frame, baseline)
    frame = add_quant_floor(frame)
    return add_ceiling_share(frame)
