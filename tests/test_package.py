"""The package as users install it: compatible ranges in its metadata, exact pins in the
constraints file ``make`` installs from, a license, type information and both entry points."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import tomllib

import jaxkv

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_the_library_declares_ranges_and_the_constraints_pin_them():
    requirements = list(PROJECT["dependencies"])
    for extra in PROJECT["optional-dependencies"].values():
        requirements += [r for r in extra if not r.startswith("jaxkv")]
    assert not [r for r in requirements if "==" in r], "exact pins belong in constraints.txt"
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    missing = {_name(r) for r in requirements} - pins.keys()
    assert not missing, f"no exact version in constraints.txt for {sorted(missing)}"


def test_license_type_information_and_classifiers():
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (pathlib.Path(jaxkv.__file__).parent / "py.typed").exists()
    assert "Typing :: Typed" in PROJECT["classifiers"]


def test_python_dash_m_and_version():
    done = subprocess.run(
        [sys.executable, "-m", "jaxkv", "--version"], capture_output=True, text=True, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"jaxkv {jaxkv.__version__}")
