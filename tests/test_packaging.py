"""The three code folders install under villagemesh.*, from a wheel as from an editable install."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "villagemesh": "villagemesh",
    "actors": "villagemesh.actors",
    "supervision": "villagemesh.supervision",
    "protocols": "villagemesh.protocols",
}


def declared_packages() -> set[str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return {line.strip() for line in cfg["options"]["packages"].splitlines() if line.strip()}


def test_every_package_folder_is_listed_in_setup_cfg():
    """A sub-package missing from setup.cfg would be missing from the wheel: every folder is listed."""
    found = set()
    for folder, name in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == declared_packages()


@pytest.mark.slow
def test_a_wheel_installs_the_folders_under_villagemesh_and_nothing_top_level(tmp_path):
    """Build a wheel, check its names, install it into a bare folder and import from outside the repo."""
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheel_dir), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("villagemesh-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"villagemesh"}
    for sub in ("actors", "supervision", "protocols"):
        assert f"villagemesh/{sub}/__init__.py" in names
    assert any(n.endswith("entry_points.txt") for n in names)
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    code = (
        "import villagemesh.supervision, villagemesh.protocols, villagemesh.actors; "
        "print(villagemesh.supervision.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    # From a folder outside the repository, the wheel's copy is the one imported.
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path, env=env
    )
    assert out.stdout.strip().startswith(str(target))
