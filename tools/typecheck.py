"""Run ``mypy --strict`` on the package as it is installed (see ``tools/_tree.py``)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from _tree import ROOT, build_tree


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="slidestream-typecheck-") as tmp:
        build_tree(Path(tmp))
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
