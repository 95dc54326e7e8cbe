"""Make the editable install visible to type checkers (mypy cannot follow setuptools' import hook).

    python tools/typing_tree.py        (make does it after ``pip install -e``)

setuptools installs this project in editable mode through an import hook
(``__editable___villagemesh_*_finder``), because three of its packages live
outside ``villagemesh/`` (``package_dir`` maps ``villagemesh.actors`` to
``actors/`` and so on). Python follows the hook; mypy does not, so a user
program type-checked against the editable install found no ``villagemesh``.

This builds ``<venv>/villagemesh-typing/villagemesh/``: a link to each file of
``villagemesh/`` and a link to each mapped folder (so files added there are seen
at once), and puts that directory in a ``.pth`` file of the venv's
site-packages, which mypy reads. Python finds the same files through it (the
links resolve to the working tree), so nothing runs twice or differently.
Run it again after adding a top-level module to ``villagemesh/``.
"""

from __future__ import annotations

import configparser
import shutil
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PTH_NAME = "villagemesh-typing.pth"


def mapping() -> dict[str, Path]:
    """setup.cfg's package_dir: package name -> folder."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = [line.split("=") for line in cfg["options"]["package_dir"].strip().splitlines() if "=" in line]
    return {name.strip(): ROOT / folder.strip() for name, folder in lines}


def build(prefix: Path) -> Path:
    """The link tree under ``prefix``; returns the directory to put on the path."""
    tree = prefix / "villagemesh-typing"
    if tree.exists():
        shutil.rmtree(tree)
    package = tree / "villagemesh"
    package.mkdir(parents=True)
    folders = mapping()
    for item in folders["villagemesh"].iterdir():
        if item.name != "__pycache__":
            (package / item.name).symlink_to(item)
    for name, folder in folders.items():
        if name.count(".") == 1:  # villagemesh.actors, ...: one link for the whole folder
            link = package / name.split(".")[1]
            if not link.exists():
                link.symlink_to(folder, target_is_directory=True)
    return tree


def main() -> int:
    tree = build(Path(sys.prefix))
    site = Path(sysconfig.get_paths()["purelib"])
    (site / PTH_NAME).write_text(f"{tree}\n")
    print(f"type checkers find villagemesh in {tree} (through {site / PTH_NAME})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
