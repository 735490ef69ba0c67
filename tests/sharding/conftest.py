"""The ``on_8_devices`` fixture: runs a checks module in a process of its own with 8 simulated
CPU devices (JAX reads ``XLA_FLAGS`` once, at start-up, so multi-device checks cannot run in the
test process)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest


def run_on_8_devices(checks: pathlib.Path, timeout: int) -> str:
    """Run ``pytest checks`` on 8 simulated CPU devices; its output (stdout and stderr), with
    an assertion error showing it when anything failed."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(checks), "-q", "-s", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the 8-device checks of {checks.name} failed:\n{output}"
    assert " passed" in output and "failed" not in output, output
    return output


@pytest.fixture
def on_8_devices() -> Callable[[pathlib.Path, int], str]:
    """``run_on_8_devices``."""
    return run_on_8_devices
