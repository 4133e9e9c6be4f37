"""What produced a result: software and library versions, the git commit of a checkout."""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from slidestream._version import __version__

__all__ = ["git_commit", "library_versions", "software_version"]

#: Distributions whose versions shape results (pixels, models, geometry, outputs).
_DISTRIBUTIONS = (
    "numpy",
    "torch",
    "openslide-python",
    "openslide-bin",
    "tifffile",
    "imagecodecs",
    "pillow",
    "scikit-image",
    "opencv-python-headless",
    "scipy",
    "shapely",
    "monai",
)


def software_version() -> str:
    """slidestream's version."""
    return __version__


@functools.cache
def git_commit() -> str | None:
    """The commit of the checkout slidestream runs from (``+dirty`` when files are modified),
    or ``None`` for an installed package or without git."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists() or not (root / "pyproject.toml").is_file():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


@functools.cache
def library_versions() -> dict[str, str]:
    """Versions of Python, the libraries that shape results and the OpenSlide C library."""
    out = {"python": platform.python_version()}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    from slidestream.wsi import reader_versions

    out.update(reader_versions())
    return out
