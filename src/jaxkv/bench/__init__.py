"""Reproducible serving benchmarks: seeded workloads (``workload``), runs against the engine, a
server or HF transformers (``runner``), and their metrics, tables, JSON and plots (``report``).
The ``jaxkv bench`` command is ``jaxkv.bench.cli``."""

from jaxkv.bench.report import (
    format_table,
    median_run,
    percentile,
    plot,
    report_dict,
    summarize,
    write_json,
)
from jaxkv.bench.runner import (
    PrefixProbe,
    ProgressBar,
    RequestRecord,
    RunResult,
    measure_prefix_ttft,
    run_engine,
    run_hf,
    run_server,
    warm_run,
)
from jaxkv.bench.workload import (
    BenchRequest,
    Workload,
    WorkloadSpec,
    make_workload,
    prefix_probe,
    sampleable_token_ids,
    tokenizer_token_ids,
)

__all__ = [
    "BenchRequest",
    "PrefixProbe",
    "ProgressBar",
    "RequestRecord",
    "RunResult",
    "Workload",
    "WorkloadSpec",
    "format_table",
    "make_workload",
    "measure_prefix_ttft",
    "median_run",
    "percentile",
    "plot",
    "prefix_probe",
    "report_dict",
    "run_engine",
    "run_hf",
    "run_server",
    "sampleable_token_ids",
    "summarize",
    "tokenizer_token_ids",
    "warm_run",
    "write_json",
]
