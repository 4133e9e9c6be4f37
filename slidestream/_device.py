"""The one torch device resolver: ``--device auto | cpu | cuda[:N]`` to a device string.

A bottom layer (like :mod:`slidestream.errors`): every package may import it. torch is imported
inside the function, so importing this module stays cheap.
"""

from __future__ import annotations

import re

from slidestream.errors import ConfigError

__all__ = ["DEVICE_CHOICES", "check_device_spec", "resolve_device"]

DEVICE_CHOICES = "auto, cpu or cuda[:N]"
"""What a device option accepts, for messages and help texts."""

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def check_device_spec(spec: str) -> str:
    """Validate the form of a device option without importing torch; returns ``spec``.

    Raises
    ------
    ConfigError
        ``spec`` is not ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    if not isinstance(spec, str) or not _DEVICE_RE.match(spec):
        raise ConfigError(f"--device {spec!r}: expected {DEVICE_CHOICES}")
    return spec


def resolve_device(spec: str) -> str:
    """The torch device string of a device option.

    Parameters
    ----------
    spec
        ``"auto"`` (the first CUDA device when one is available, else the CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises
    ------
    ConfigError
        A malformed spec, or CUDA asked for where none is available (or ``N`` is out of range).

    Examples
    --------
    >>> resolve_device("cpu")
    'cpu'
    """
    check_device_spec(spec)
    if spec == "cpu":
        return spec
    import torch

    available = torch.cuda.is_available()
    if spec == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise ConfigError(f"--device {spec}: no CUDA device is available; use --device cpu")
    index = int(spec.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s); use --device cuda:0"
        )
    return spec
