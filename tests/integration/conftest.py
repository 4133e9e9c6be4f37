"""Fixtures of the integration tests: a real ``slidestream run`` for the viewer tests."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner

from slidestream.cli import cli
from slidestream.demo_slide import DemoSlideSpec, write_demo_slide

#: A small demo slide (1.3 s to generate, ~5 s to analyse on 2 cores) with a name that needs
#: percent-encoding in URLs (a space and a non-ASCII letter).
VIEWER_SLIDE = DemoSlideSpec(width_px=1792, height_px=1408, mpp=0.5, seed=11)
VIEWER_SLIDE_NAME = "demo slide é"


@pytest.fixture(scope="session")
def viewer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUT of ``slidestream run`` on a generated slide (with its SQLite database)."""
    slides = tmp_path_factory.mktemp("viewer-slides")
    slide = write_demo_slide(slides / f"{VIEWER_SLIDE_NAME}.svs", VIEWER_SLIDE)
    out = tmp_path_factory.mktemp("viewer-out")
    result = CliRunner().invoke(
        cli, ["run", str(slide), "--out", str(out), "--no-progress", "--workers", "0"]
    )
    assert result.exit_code == 0, result.output
    assert (out / VIEWER_SLIDE_NAME / "summary.json").is_file()
    return out


@pytest.fixture(scope="session")
def test_output_dir() -> Path:
    """Where tests keep artefacts to look at (screenshots): ``test-output/`` of the checkout."""
    root = Path(
        os.environ.get(
            "SLIDESTREAM_TEST_OUTPUT", Path(__file__).resolve().parents[2] / "test-output"
        )
    )
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextmanager
def _live_server(app: object) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on 127.0.0.1 (a free port) in a thread; yield its URL."""
    import uvicorn

    from slidestream.viewer._server import _free_port

    port = _free_port("127.0.0.1", 0)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, name="viewer-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("viewer test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server() -> Callable[[object], AbstractContextManager[str]]:
    """``with live_server(app) as url:`` serves ``app`` on a real uvicorn server."""
    return _live_server
