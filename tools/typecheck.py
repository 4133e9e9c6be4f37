"""Run ``mypy --strict`` on the package as it is installed.

The repository maps its top-level folders (``wsi/``, ``tiling/``, ...) onto one import package
with setuptools ``package-dir``; mypy cannot follow that mapping, so this script builds a tree of
symbolic links shaped like the installed package and checks that.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUBPACKAGES = {
    "wsi": "wsi",
    "tiling": "tiling",
    "models": "models",
    "overlays": "overlays",
    "db": "db",
    "migrations": "alembic",
}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="slidestream-typecheck-") as tmp:
        pkg = Path(tmp) / "slidestream"
        pkg.mkdir()
        for entry in (ROOT / "slidestream").iterdir():
            if entry.name != "__pycache__":
                (pkg / entry.name).symlink_to(entry)
        for name, folder in SUBPACKAGES.items():
            (pkg / name).symlink_to(ROOT / folder)
        cmd = [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "-p",
            "slidestream",
        ]
        return subprocess.call(cmd, cwd=tmp)


if __name__ == "__main__":
    raise SystemExit(main())
