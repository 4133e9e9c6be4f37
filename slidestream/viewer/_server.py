"""Serve the viewer with uvicorn on this machine (127.0.0.1 unless told otherwise)."""

from __future__ import annotations

import errno
import logging
import socket
import threading
import time
import webbrowser
from collections.abc import Callable
from typing import Final

import uvicorn
from sqlalchemy import Engine

from slidestream.errors import ConfigError

from ._app import create_app
from ._config import ViewerConfig

__all__ = ["LOOPBACK_HOSTS", "is_loopback", "serve"]

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS: Final = ("127.0.0.1", "localhost", "::1")
"""Hosts that keep the server private to this machine."""


def is_loopback(host: str) -> bool:
    """True when ``host`` is a loopback address or ``localhost``."""
    return host in LOOPBACK_HOSTS or host.startswith("127.")


def _free_port(host: str, port: int) -> int:
    """``port`` if it can be bound on ``host`` (any free port for 0); else a one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise ConfigError(
                    f"port {port} on {host} is in use; pass another --port (or --port 0 for any)"
                ) from exc
            raise ConfigError(
                f"cannot listen on {host}:{port} ({exc.strerror}); check --host"
            ) from exc
        return int(sock.getsockname()[1])


def serve(
    config: ViewerConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    engine: Engine | None = None,
    open_browser: bool = False,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Run the viewer until interrupted.

    Parameters
    ----------
    config
        What to serve.
    host
        Interface to listen on; anything but loopback makes the results visible to the
        network (a warning is logged).
    port
        TCP port (0: any free port).
    engine
        The statistics database opened read-only, or ``None``.
    open_browser
        Open the slide list in the default web browser once the server listens.
    on_ready
        Called with the base URL once the server listens.

    Raises
    ------
    ConfigError
        The port is in use or the host cannot be bound.
    """
    port = _free_port(host, port)
    loopback = is_loopback(host)
    if not loopback:
        logger.warning(
            "serving on %s: anyone who can reach this machine can see these slides and results; "
            "bind --host 127.0.0.1 (the default) to keep them on this machine",
            host,
        )
    allowed = ["127.0.0.1", "localhost", "::1", "[::1]", host] if loopback else None
    app = create_app(config, engine=engine, allowed_hosts=allowed)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False)
    )

    def announce() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        if server.started:
            if on_ready is not None:
                on_ready(url)
            if open_browser:
                webbrowser.open(url)

    threading.Thread(target=announce, name="viewer-ready", daemon=True).start()
    server.run()
