"""The package as users install it: compatible ranges in its metadata, exact pins in the
constraints file ``make`` installs from, a license, type information and both entry points."""

from __future__ import annotations

import os
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


def test_a_built_wheel_installs_and_runs_in_a_fresh_virtualenv(tmp_path):
    """``pip install .`` into a new virtualenv (the dependencies reached through a ``.pth`` of
    this environment's site-packages, so nothing is downloaded), then the installed ``jaxkv``
    command generates with the bundled model."""
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = wheels.glob("jaxkv-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python*/site-packages")
    here = [p for p in sys.path if p.endswith("site-packages")]
    (site / "dependencies.pth").write_text("\n".join(here) + "\n")
    subprocess.run(
        [*pip, "install", "--no-deps", "--target", str(site), str(wheel)],
        check=True,
        capture_output=True,
    )
    # pip --target installs no console scripts; the wheel's entry point is what we check.
    entry = next(site.glob("jaxkv-*.dist-info")) / "entry_points.txt"
    assert "jaxkv = jaxkv.cli:main" in entry.read_text()
    assert (site / "jaxkv" / "py.typed").exists()
    python = venv / "bin" / "python"
    done = subprocess.run(
        [str(python), "-m", "jaxkv", "generate", "Hi", "--raw", "--max-new-tokens", "2"],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()
    located = subprocess.run(
        [str(python), "-c", "import jaxkv; print(jaxkv.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert located.startswith(str(site)), located  # the installed copy, not the checkout
