"""Build a tree of symbolic links shaped like the installed ``slidestream`` package.

The repository maps its top-level folders (``wsi/``, ``tiling/``, ...) onto one import package
with setuptools ``package-dir``. Static tools (mypy, import-linter) walk the file system from the
package's folder and cannot follow that mapping, so they are run on this tree instead.
"""

from __future__ import annotations

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


def build_tree(tmp: Path) -> Path:
    """Create ``tmp/slidestream`` mirroring the installed package; return ``tmp``."""
    pkg = tmp / "slidestream"
    pkg.mkdir()
    for entry in (ROOT / "slidestream").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for name, folder in SUBPACKAGES.items():
        (pkg / name).symlink_to(ROOT / folder)
    return tmp
