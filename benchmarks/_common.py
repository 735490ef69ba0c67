"""Small pieces shared by the benchmark scripts: a median-of-runs timer, process memory
figures and plain-text tables.

Standard library only, so a benchmark can import it from an interpreter that has neither JAX
nor NumPy (for example one that runs only a peer library).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``fn`` must block until its work is done (``block_until_ready`` for JAX results).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"median_seconds: repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"median_seconds: warmup must be an int >= 0, got {warmup!r}")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def reset_peak_rss() -> bool:
    """Start a new peak: on Linux a process resets its resident high-water mark (``VmHWM``) to
    its current size by writing ``5`` to ``/proc/self/clear_refs``. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def peak_rss_since_reset_mib() -> float | None:
    """``VmHWM`` in MiB: the peak resident size since the last ``reset_peak_rss`` (or since the
    process started), or ``None`` where ``/proc`` is absent."""
    return _status_mib("VmHWM:")


def current_rss_mib() -> float | None:
    """Resident set size of this process now, in MiB, or ``None`` where ``/proc`` is absent."""
    return _status_mib("VmRSS:")


def _status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 2**10
    except OSError:
        return None
    return None


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Right-aligned plain-text table; the first column is left-aligned. Cells are ``str()``-ed."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    if any(len(row) != len(headers) for row in cells):
        raise ValueError(f"format_table: every row needs {len(headers)} cells")
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(row[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def run_json_worker(
    command: Sequence[str], spec: object, timeout: float, prefix: str, label: str
) -> dict:
    """Run a benchmark worker process: ``spec`` goes to its stdin as JSON, and the answer is the
    JSON object on the last stdout line that starts with ``prefix``.

    A timeout, a crash or a missing answer becomes ``{"error": "..."}`` (the last stderr line
    says why). Progress (``label`` and the seconds taken) goes to stderr.
    """
    print(f"  {label} ...", end="", flush=True, file=sys.stderr)
    start = time.perf_counter()
    try:
        done = subprocess.run(
            list(command), input=json.dumps(spec), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        print(" timed out", file=sys.stderr)
        return {"error": f"worker timed out after {timeout:.0f} s"}
    print(f" {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(prefix):
            return json.loads(line.removeprefix(prefix))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    return {"error": f"worker exited {done.returncode}: {lines[-1] if lines else 'no output'}"}
