"""Runs ``_multidevice_checks.py`` in a process of its own with 8 simulated CPU devices (see
``conftest.on_8_devices``), and shows what it printed when it fails."""

from __future__ import annotations

import pathlib

CHECKS = pathlib.Path(__file__).with_name("_multidevice_checks.py")


def test_sharded_caches_and_models_on_8_devices(on_8_devices):
    on_8_devices(CHECKS, timeout=600)
