"""Runs ``_multidevice_checks.py`` in a process of its own with 8 simulated CPU devices (JAX reads
``XLA_FLAGS`` once, at start-up, so the checks cannot run in this process), and shows what it
printed when it fails."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

CHECKS = pathlib.Path(__file__).with_name("_multidevice_checks.py")


def test_sharded_caches_and_models_on_8_devices():
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        [env.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(CHECKS), "-q", "-s", "-p", "no:cacheprovider"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the 8-device checks failed:\n{output}"
    assert " passed" in output and "failed" not in output, output
