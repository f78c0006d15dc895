"""``python -m fp8kit.bench``: run a benchmark grid and write report.csv, report.md and PNG plots.

With no options it picks a preset from the machine: on a GPU the Llama-3-8B layer grid
(M in 1..8192) over every FP8 scheme, eager and compiled; on a CPU a small grid that finishes
in under 2 minutes.

``--suite NAME`` runs a named suite instead (`workloads.SUITES`) and writes <NAME>.csv / <NAME>.md /
<NAME>.env.json / <NAME>_*.png under --out, e.g. issue 5's targets 1-3 on an H100 (about 5 minutes):

    python -m fp8kit.bench --suite h100-speed --out docs/benchmarks/h100

``--targets quant,prefill,decode`` keeps only some of a suite's parts; ``--suite cpu-speed`` is the
same structure on tiny shapes for a CPU. ``--suite moe`` times an MoE block (Mixtral-8x7B and
Qwen3-30B-A3B shapes), FP8 experts vs transformers' bf16 grouped_mm (`moe_speed`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence

import torch

from fp8kit.core.errors import ConfigError

from .backends import BACKEND_PRESETS, parse_backends
from .report import environment_info, write_report
from .runner import default_dtype, run_benchmarks, run_suite
from .timing import HOST_CLOCKS, TimingConfig
from .workloads import M_PRESETS, SHAPE_PRESETS, SUITES, TARGETS, ModelWorkload, linear_grid, parse_m_values, suite_parts

__all__ = ["main", "build_parser"]

logger = logging.getLogger("fp8kit.bench")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: Default --min-runs: CPU calls of a few microseconds jitter more than CUDA events.
_MIN_RUNS = {"gpu": 10, "cpu": 30}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fp8kit.bench",
        description="Latency and accuracy of FP8 linears and models: eager torch vs torch._scaled_mm vs TensorRT.",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="whole-model prefill workload: 'default' (embedded SmolLM2-135M), a Hugging Face directory, "
        "or 'smollm2-arch' (SmolLM2-135M architecture, random weights); none by default",
    )
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"linear shapes: presets ({', '.join(SHAPE_PRESETS)}) and/or MxNxK entries, comma-separated, "
        "or 'none'; default llama3-8b on GPU, cpu-small on CPU",
    )
    parser.add_argument("--m", default=None, help="M values for preset shapes, e.g. 1,16,128 (default: gpu or cpu preset)")
    parser.add_argument(
        "--backends",
        default=None,
        help=f"backend ids and/or presets ({', '.join(BACKEND_PRESETS)}), comma-separated; default gpu or cpu preset",
    )
    parser.add_argument("--baseline", default=None, help="backend id for speedup (default: the first torch-* backend)")
    parser.add_argument(
        "--suite",
        default=None,
        help=f"run a named suite ({', '.join(SUITES)}, moe) instead of --shapes/--m/--backends/--model; "
        "files are named after the suite (moe: an MoE block, FP8 experts vs bf16 grouped_mm; default: none, "
        "the --shapes grid)",
    )
    parser.add_argument(
        "--targets", default=None,
        help=f"with --suite: only these parts ({', '.join(TARGETS)}), comma-separated (default: all of the suite's)"
    )
    parser.add_argument("--out", default="out/bench", help="output directory (default: out/bench)")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=sorted(_DTYPES), help="high-precision dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--batch", default="1", help="model workload batch sizes, e.g. 1,8 (default 1)")
    parser.add_argument("--seq-len", default="512", help="model workload sequence lengths, e.g. 512,2048 (default 512)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; 3 on CPU; --models on CPU 1)")
    parser.add_argument(
        "--min-runs", type=int, default=None,
        help=f"fewest timed calls (default {_MIN_RUNS['gpu']}; {_MIN_RUNS['cpu']} on CPU, where calls are jittery; "
        "--models on CPU 2)",
    )
    parser.add_argument("--max-runs", type=int, default=200, help="most timed calls (default 200)")
    parser.add_argument("--budget-ms", type=float, default=None, help="time per row past min-runs (default 200; --models on CPU 50)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads (torch.set_num_threads); default 1 on a CPU run (more threads on a shared or "
        "busy machine make medians jump by scheduler ticks), torch's choice on a GPU run; recorded in the report",
    )
    parser.add_argument(
        "--clock", default=None, choices=sorted(HOST_CLOCKS),
        help="how CPU rows are timed: wall (time.perf_counter) or cpu (time.process_time: the process's CPU time, "
        "immune to other processes taking the core); default cpu when the run uses one thread, else wall",
    )
    parser.add_argument("--no-perplexity", action="store_true", help="skip perplexity of real-weight models (default: measured)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar, warnings only (default: progress and fp8kit's INFO lines)")
    from .model_speed import add_cli_arguments as _add_model_speed_arguments  # --models (whole-model speed)

    _add_model_speed_arguments(parser)
    return parser


def _device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise ConfigError(f"--device: {text!r} is not a device ({exc}); use cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {text}: no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", 0)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type != "cpu":
        raise ConfigError(f"--device {text}: only cpu and cuda are supported")
    return device


def _pin_threads(threads: int | None, device: torch.device) -> None:
    """torch.set_num_threads: `threads` if given, else 1 on a CPU run (intra-op threads that wait for
    a descheduled sibling turn a microsecond GEMM into a scheduler tick), else torch's choice.
    `environment_info` records the count in the report."""
    if threads is None and device.type == "cpu":
        threads = 1
    if threads is not None:
        torch.set_num_threads(threads)
        logger.info("torch CPU threads: %d%s", threads, " (CPU default; --threads N to change)" if threads == 1 else "")


def _positive_ints(text: str, option: str) -> list[int]:
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ConfigError(f"{option}: {item!r} is not a positive integer; give e.g. {option} 1,8")
        values.append(int(item))
    return values


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Other libraries' loggers stay at WARNING: only fp8kit's own say what they are doing.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("fp8kit").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        device = _device(args.device)
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give a positive number of threads")
    except ConfigError as exc:
        parser.error(str(exc))  # exits with status 2, usage + message on stderr, no traceback
    _pin_threads(args.threads, device)
    args.clock = clock = args.clock or ("cpu" if torch.get_num_threads() == 1 else "wall")
    env = environment_info(clock)
    if args.suite == "moe":  # MoE block speed (fp8kit.bench.moe_speed): its own workloads and report
        from .moe_speed import run_cli as _run_moe_speed

        try:
            _device(args.device)
            given = argv if argv is not None else sys.argv[1:]
            return _run_moe_speed(args, "python -m fp8kit.bench " + " ".join(shlex.quote(a) for a in given))
        except (ConfigError, ValueError) as exc:
            parser.error(str(exc))
    if args.models:  # whole-model speed (fp8kit.bench.model_speed): its own workloads and report
        from .model_speed import run_cli as _run_model_speed

        try:
            given = argv if argv is not None else sys.argv[1:]
            return _run_model_speed(args, "python -m fp8kit.bench " + " ".join(shlex.quote(a) for a in given))
        except (ConfigError, ValueError) as exc:
            parser.error(str(exc))
    try:
        gpu = device.type == "cuda"
        dtype = _DTYPES[args.dtype] if args.dtype else default_dtype(device)
        if args.suite is not None:
            given = [opt for opt, value in (("--shapes", args.shapes), ("--m", args.m), ("--backends", args.backends),
                                            ("--model", args.model), ("--baseline", args.baseline)) if value is not None]
            if given:
                raise ConfigError(f"--suite {args.suite} sets the workloads and backends itself; drop {', '.join(given)}")
            targets = args.targets.split(",") if args.targets is not None else None
            parts = suite_parts(args.suite, targets)
        elif args.targets is not None:
            raise ConfigError("--targets needs --suite")
        if args.suite is not None:
            workloads: list = [w for part in parts for w in part.workloads]
        else:
            shapes = args.shapes if args.shapes is not None else ("llama3-8b" if gpu else "cpu-small")
            m_values = parse_m_values(args.m) if args.m else M_PRESETS["gpu" if gpu else "cpu"]
            backends = parse_backends(args.backends or ("gpu" if gpu else "cpu"))
            if args.baseline and args.baseline not in {b.id for b in backends}:
                raise ConfigError(
                    f"--baseline {args.baseline!r} is not among --backends ({', '.join(b.id for b in backends)})"
                )
            workloads = [] if shapes.strip().lower() == "none" else linear_grid(shapes, m_values)
        if args.model:
            batches = _positive_ints(args.batch, "--batch")
            seq_lens = _positive_ints(args.seq_len, "--seq-len")
            workloads += [ModelWorkload(args.model, b, s) for b in batches for s in seq_lens]
        if not workloads:
            raise ConfigError("nothing to run: --shapes none and no --model")
        timing = TimingConfig(
            warmup=args.warmup if args.warmup is not None else (5 if gpu else 3),
            min_runs=args.min_runs if args.min_runs is not None else _MIN_RUNS["gpu" if gpu else "cpu"],
            max_runs=max(args.max_runs, args.min_runs or 1),
            budget_ms=args.budget_ms if args.budget_ms is not None else 200.0,
            clock=clock,
        )
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))  # exits with status 2, usage + message on stderr, no traceback

    texts = None
    if args.model and not args.no_perplexity:
        try:
            from fp8kit.core.data import default_texts

            texts = default_texts()[1]
        except Exception:  # noqa: BLE001 - perplexity is optional
            logger.warning("fp8kit.core.data.default_texts unavailable: no perplexity column", exc_info=True)

    command = "python -m fp8kit.bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    if args.suite is not None:
        logger.info("running suite %s (%s) on %s", args.suite, ", ".join(p.target for p in parts), device)
        frame = run_suite(
            args.suite, targets=[p.target for p in parts], device=device, dtype=dtype, timing=timing,
            progress=not args.quiet,
        )
        written = write_report(frame, args.out, env=env, command=command.strip(), stem=args.suite,
                               title=f"fp8kit.bench suite {args.suite}")
    else:
        logger.info(
            "running %d workloads x %d backends on %s (%s)", len(workloads), len(backends), device,
            str(dtype).split(".")[-1],
        )
        frame = run_benchmarks(
            workloads,
            backends,
            device=device,
            dtype=dtype,
            timing=timing,
            baseline=args.baseline,
            perplexity_texts=texts,
            progress=not args.quiet,
        )
        written = write_report(frame, args.out, env=env, command=command.strip())
    ok = int((frame["status"] == "ok").sum())
    noisy = int(frame["noisy"].sum())
    print(f"{ok}/{len(frame)} rows ran; report: {written['markdown']} {written['csv']} (+{len(written['plots'])} plots)")
    if noisy:
        print(f"{noisy} rows are noisy (marked in the report): rerun on an idle machine or raise --min-runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
