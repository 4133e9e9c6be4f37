"""The built wheel holds the whole package (weights, migrations) and imports from elsewhere."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1:]}")
    (whl,) = out.glob("slidestream-*.whl")
    return whl


def test_wheel_contents(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in (
        "slidestream/py.typed",
        "slidestream/wsi/__init__.py",
        "slidestream/migrations/env.py",
        "slidestream/models/weights/nuclei-unet.safetensors",
        "slidestream/models/weights/nuclei-unet.json",
        "slidestream/models/weights/tissue-tumour-pan/weights.safetensors",
        "slidestream/models/weights/tissue-tumour-pan/config.json",
        "slidestream/viewer/templates/slide.html",
        "slidestream/viewer/static/slide.js",
        "slidestream/viewer/static/viewer.css",
        "slidestream/viewer/static/openseadragon/openseadragon.min.js",
        "slidestream/viewer/static/openseadragon/LICENSE.txt",
        "slidestream/viewer/static/openseadragon/images/zoomin_rest.png",
    ):
        assert required in names, required
    assert not any(n.startswith(("models/", "db/", "wsi/", "alembic/")) for n in names)


def test_wheel_imports_and_loads_models_from_another_directory(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys\n"
        f"sys.path = [{str(site)!r}] + [p for p in sys.path if p.rstrip('/') != {str(REPO)!r}]\n"
        "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        "import slidestream, slidestream.models as m\n"
        f"assert slidestream.__file__.startswith({str(site)!r}), slidestream.__file__\n"
        "assert m.load_tissue_model('default').spec.class_names\n"
        "assert m.load_nuclei_model('default').mpp > 0\n"
        "from slidestream.db import connect\n"
        f"connect('sqlite:///{tmp_path / 'w.db'}', create=True).dispose()\n"
        "from slidestream.viewer._app import _static_dir, _templates\n"
        f"assert str(_static_dir()).startswith({str(site)!r})\n"
        "assert (_static_dir() / 'openseadragon' / 'openseadragon.min.js').is_file()\n"
        "assert _templates().get_template('slide.html')\n"
        "print('ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
