"""Vectorised JSON text: build many similar JSON records with numpy, no Python object per value.

Every record is a row of a ``uint8`` matrix made by concatenating fixed-width byte *blocks*
horizontally (constants, formatted numbers, looked-up strings); unused bytes are NUL. Compacting the
matrix (``m[m != 0]``) drops the padding and yields the records back to back in row order. JSON text
never contains a raw NUL byte, so the padding is unambiguous.

This is what lets the nucleus writer reach >100,000 features/s: the per-value work (rounding,
digit extraction) runs in numpy loops instead of creating Python floats, lists and dicts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["compact", "constant", "format_fixed", "lookup", "scatter_rows"]

U8 = npt.NDArray[np.uint8]
_ZERO, _DOT, _MINUS = 48, 46, 45


def constant(text: bytes, n: int) -> U8:
    """Return ``text`` repeated on ``n`` rows, shape (n, len(text))."""
    return np.broadcast_to(np.frombuffer(text, np.uint8), (n, len(text)))


def lookup(texts: Sequence[bytes], index: npt.NDArray[np.intp]) -> U8:
    """Return ``texts[index[i]]`` on row ``i`` (NUL-padded to the longest text)."""
    width = max((len(t) for t in texts), default=0)
    if width == 0:
        return np.zeros((len(index), 0), np.uint8)
    table = np.array(list(texts), dtype=f"S{width}").view(np.uint8).reshape(len(texts), width)
    return table[index]


def format_fixed(values: npt.NDArray[np.floating], decimals: int) -> U8:
    """Format numbers as JSON with at most ``decimals`` decimals, trailing zeros dropped.

    ``1008.5857 -> b"1008.59"``, ``152.0 -> b"152"``, ``-0.5 -> b"-0.5"``. Values must be finite
    and below 9e18 / 10**decimals in magnitude; callers mask non-finite values themselves (they
    are written as ``0`` here). Digits are right-aligned in their block (leading NULs).

    Returns
    -------
    ndarray of uint8, shape (m, w)
        One NUL-padded number per row.
    """
    x = np.asarray(values, np.float64).ravel()
    x = np.where(np.isfinite(x), x, 0.0)
    scale = 10**decimals
    v = np.rint(np.abs(x) * scale)
    dtype = np.int32 if v.size == 0 or v.max() < 2**31 - 1 else np.int64
    v = v.astype(dtype)
    ip, fp = np.divmod(v, dtype(scale))
    top = int(ip.max(initial=0))
    width = len(str(top))
    out = np.zeros((len(x), 1 + width + (decimals + 1 if decimals else 0)), np.uint8)
    out[:, 0] = np.where((x < 0) & (v > 0), _MINUS, 0)
    rest = ip
    for k in range(width, 0, -1):  # units digit first; leading zeros stay NUL
        rest, d = np.divmod(rest, dtype(10))
        if k == width:
            out[:, k] = d + _ZERO
        else:
            out[:, k] = np.where((d > 0) | (rest > 0), d + _ZERO, 0)
    if decimals:
        out[:, width + 1] = np.where(fp > 0, _DOT, 0)
        rest = fp
        trailing = np.ones(len(x), bool)
        for k in range(width + 1 + decimals, width + 1, -1):  # last decimal first
            rest, d = np.divmod(rest, dtype(10))
            trailing &= d == 0
            out[:, k] = np.where(trailing, 0, d + _ZERO)
    return out


def scatter_rows(items: U8, owner_offsets: npt.NDArray[np.int64], n: int) -> U8:
    """Lay variable-length groups of item rows side by side, one group per output row.

    ``items[offsets[i]:offsets[i + 1]]`` (each (w,) bytes) go, in order, on output row ``i``;
    shorter groups are NUL-padded. Returns shape (n, max_group * w).
    """
    counts = np.diff(owner_offsets)
    width = items.shape[1]
    most = int(counts.max(initial=0))
    out = np.zeros((n, most, width), np.uint8)
    owner = np.repeat(np.arange(n), counts)
    slot = np.arange(len(items)) - np.repeat(owner_offsets[:-1], counts)
    out[owner, slot] = items
    return out.reshape(n, most * width)


def compact(blocks: Sequence[U8]) -> bytes:
    """Concatenate blocks column-wise and return the non-NUL bytes in row-major order."""
    return np.concatenate(blocks, axis=1).tobytes().replace(b"\0", b"")
