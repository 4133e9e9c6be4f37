"""Check the import-linter contracts of ``pyproject.toml`` on the installed package shape."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _tree import ROOT, build_tree


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="slidestream-imports-") as tmp:
        build_tree(Path(tmp))
        shutil.copy(ROOT / "pyproject.toml", Path(tmp) / "pyproject.toml")
        env = {**os.environ, "PYTHONPATH": tmp}
        exe = Path(sys.executable).with_name("lint-imports")
        return subprocess.call([str(exe), "--no-cache"], cwd=tmp, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
