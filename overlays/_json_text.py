"""Vectorised JSON text: build many similar JSON records with numpy, no Python object per value.

Every record is a row of a ``uint8`` matrix: a *template* row of constant bytes (keys, brackets)
copied onto every row, then variable *fields* (ids, numbers, looked-up strings) written into their
columns. Numbers are right-aligned in fixed-width fields and padded with spaces, which JSON allows
between tokens (``"x": 12.5``), so a matrix of rows is already valid JSON text: no per-row
compaction pass. Records of variable length (polygons with any number of vertices) are fixed-width
rows *between* variable-length runs of item rows (one per vertex), spliced by :func:`splice_runs`.

Determinism: a field has a minimum width fixed by the caller (not by the data), and the output text
of a value depends only on the value. When a chunk holds a value wider than the minimum, the field
grows for that chunk and the extra columns are padded with NUL bytes instead of spaces; NULs never
occur in JSON text, and :func:`drop_nul` removes them. So the same nuclei give the same bytes
whatever the chunking.

Digits come from lookup tables of 4-digit groups (``"0000"`` .. ``"9999"`` as one ``uint32``
each) written through unaligned ``uint32``/``uint16`` views of the row matrix. The per-value work is
a few integer divisions and table gathers in numpy loops instead of one Python float, ``repr`` and
string per value. This is what lets the nucleus writer reach >100,000 features/s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_DECIMALS",
    "SIGNIFICANT_WIDTH",
    "NumberField",
    "drop_nul",
    "fixed_field",
    "lookup",
    "significant_field",
    "splice_runs",
    "template",
]

U8 = npt.NDArray[np.uint8]
U32 = npt.NDArray[np.uint32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]

_SPACE: Final = 32
_GROUP: Final = 10_000  # one table entry holds 4 decimal digits

MAX_DECIMALS: Final = 4
"""Most decimals a number field writes (the fraction is one digit group)."""

SIGNIFICANT_WIDTH: Final = 6
"""Width of a :func:`significant_field` (``0.1234``, ``12.35``, ``999999``)."""


def _ascii_tables() -> tuple[U32, U32, npt.NDArray[np.uint64]]:
    """Return the digit-group, fraction and significant-digit tables (ASCII packed in ints).

    ``groups`` holds three tables of 10,000 entries back to back: ``[0, 10000)`` zero-padded
    digits (``"0042"``, a group below a non-zero one), ``[10000, 20000)`` leading zeros as
    spaces (``"  42"``; ``0`` is four spaces), ``[20000, 30000)`` the same but ``0`` is ``"   0"``
    (the units group). ``fraction`` is the zero-padded table again (``fraction[7] == "0007"``).
    ``significant[d * 10000 + v]`` is ``v / 10**d`` written with ``d`` decimals, right-aligned in
    :data:`SIGNIFICANT_WIDTH` bytes (``d=2, v=1235 -> " 12.35"``), two NUL bytes after.
    """
    v = np.arange(_GROUP)
    digits = np.stack([v // 1000, v // 100 % 10, v // 10 % 10, v % 10], axis=1)
    ascii_digits = (digits + ord("0")).astype(np.uint8)
    leading = np.cumsum(digits != 0, axis=1) == 0
    spaced = np.where(leading, _SPACE, ascii_digits).astype(np.uint8)
    units = spaced.copy()
    units[0, 3] = ord("0")
    groups = np.concatenate([ascii_digits, spaced, units]).view(np.uint32).ravel()
    sig = np.zeros((MAX_DECIMALS + 1, _GROUP, 8), np.uint8)
    for d in range(MAX_DECIMALS + 1):
        int_width = SIGNIFICANT_WIDTH - (1 + d if d else 0)
        ip, fp = np.divmod(v, 10**d)
        shown = min(4, int_width)  # ip < 10**(int_width) by construction
        sig[d, :, : int_width - shown] = _SPACE
        sig[d, :, int_width - shown : int_width] = units[ip, 4 - shown :]
        if d:
            sig[d, :, int_width] = ord(".")
            sig[d, :, int_width + 1 : SIGNIFICANT_WIDTH] = ascii_digits[fp, 4 - d :]
    significant = sig.reshape(-1, 8).view(np.uint64).ravel()
    return groups, groups[:_GROUP].copy(), significant


_GROUPS, _FRACTION, _SIGNIFICANT = _ascii_tables()
_SIGNIFICANT_HEAD = (_SIGNIFICANT & np.uint64(0xFFFFFFFF)).astype(np.uint32)  # bytes 0-3
_SIGNIFICANT_TAIL = (_SIGNIFICANT >> np.uint64(32)).astype(np.uint16)  # bytes 4-5
_POW10: Final = 10.0 ** np.arange(MAX_DECIMALS + 1)
_ZERO_PADDED, _SPACED, _UNITS = 0, _GROUP, 2 * _GROUP  # offsets of the tables in _GROUPS


def template(n: int, row: bytes) -> U8:
    """Return an (n, len(row)) uint8 matrix with ``row`` on every row (a fresh, writable array)."""
    out = np.empty((n, len(row)), np.uint8)
    out[...] = np.frombuffer(row, np.uint8)
    return out


def lookup(texts: Sequence[bytes], index: npt.NDArray[np.intp], *, pad: int = _SPACE) -> U8:
    """Return ``texts[index[i]]`` on row ``i``, left-aligned and padded with ``pad`` bytes."""
    width = max((len(t) for t in texts), default=0)
    table = np.full((len(texts), width), pad, np.uint8)
    for i, t in enumerate(texts):
        table[i, : len(t)] = np.frombuffer(t, np.uint8)
    return table[index]


def _put(rows: U8, col: int, words: npt.NDArray[np.unsignedinteger], nbytes: int) -> None:
    """Write the low ``nbytes`` (1-4) bytes of each word (little-endian) at ``rows[:, col:]``."""
    if nbytes == 4:
        rows[:, col : col + 4].view("<u4")[:, 0] = words
    elif nbytes == 2:  # assignment casts unsafely: keeps the low bytes
        rows[:, col : col + 2].view("<u2")[:, 0] = words
    elif nbytes == 1:
        rows[:, col] = words
    else:  # 3
        _put(rows, col, words, 2)
        _put(rows, col + 2, words >> np.uint32(16), 1)


@dataclass(frozen=True, slots=True, eq=False)
class NumberField:
    """Numbers ready to be written right-aligned into a fixed-width field of text rows.

    Made by :func:`fixed_field` or :func:`significant_field`; write with :meth:`write` after
    laying out a row template with :attr:`blank` at the field's columns.
    """

    width: int
    """Field width in bytes for this chunk (>= ``min_width``)."""
    min_width: int
    """Width that holds every ordinary value; columns beyond it are NUL-padded."""
    blank: bytes
    """The field's template bytes: NUL beyond ``min_width``, spaces, the decimal point."""
    pieces: tuple[tuple[int, npt.NDArray[np.unsignedinteger], int], ...]
    """``(column, words, nbytes)`` written by :func:`_put`; columns relative to the field."""
    odd_rows: npt.NDArray[np.intp]
    """Rows whose text (``odd_text``) replaces the whole field (negative or too-wide values)."""
    odd_text: U8
    """(len(odd_rows), width) text of the odd rows, right-aligned."""

    def split(self, parts: int) -> list[NumberField]:
        """Split interleaved values (value ``i`` -> part ``i % parts``, row ``i // parts``).

        For the columns of a C-order (rows, parts) array formatted at once: x and y of vertices,
        the measurements of nuclei. The parts share this field's width.
        """
        odd_part = self.odd_rows % parts
        return [
            NumberField(
                self.width,
                self.min_width,
                self.blank,
                tuple((at, words[p::parts], nbytes) for at, words, nbytes in self.pieces),
                self.odd_rows[odd_part == p] // parts,
                self.odd_text[odd_part == p],
            )
            for p in range(parts)
        ]

    def write(self, rows: U8, col: int) -> None:
        """Write the numbers into ``rows[:, col:col + width]`` (rows hold :attr:`blank` there)."""
        for at, words, nbytes in self.pieces:
            _put(rows, col + at, words, nbytes)
        excess = self.width - self.min_width
        for c in range(col, col + excess):  # spaces of the table groups -> NUL
            column = rows[:, c]
            column[column == _SPACE] = 0
        if len(self.odd_rows):
            rows[self.odd_rows, col : col + self.width] = self.odd_text


def _finite(values: npt.ArrayLike) -> F64:
    x = np.asarray(values, np.float64).ravel()
    finite = np.isfinite(x)
    return x if finite.all() else np.where(finite, x, 0.0)


def _odd_text(texts: list[bytes], width: int, min_width: int) -> U8:
    """Right-align ``texts`` in ``width`` bytes: spaces up to ``min_width``, NUL beyond."""
    out = np.zeros((len(texts), width), np.uint8)
    for i, t in enumerate(texts):
        out[i, width - min_width :] = _SPACE
        out[i, width - len(t) :] = np.frombuffer(t, np.uint8)
    return out


def _check_decimals(decimals: int) -> None:
    if not 0 <= decimals <= MAX_DECIMALS:
        raise ValueError(f"decimals={decimals}: expected 0..{MAX_DECIMALS} (one digit group)")


def fixed_field(values: npt.ArrayLike, decimals: int, *, min_int_digits: int = 1) -> NumberField:
    """Format numbers with exactly ``decimals`` decimals (``1008.5857 -> "1008.59"``).

    Trailing zeros are kept (``3 -> "3.00"``, valid JSON). Non-finite values are written as ``0``
    (callers leave them out themselves). Values round half to even on the binary value
    (``np.rint``); ``-0.001`` with 2 decimals is ``0.00``.

    Parameters
    ----------
    values : array_like of float
        Any shape; one row per value in C order. Magnitudes below 9e18 / 10**decimals.
    decimals : int
        0 to :data:`MAX_DECIMALS`.
    min_int_digits : int
        Integer digits the field always has room for (spaces before shorter numbers), so that
        typical values never widen it: 5 for level-0 pixel coordinates below 100,000.

    Returns
    -------
    NumberField
        Width ``max(min_int_digits, digits of the largest value) + 1 + decimals`` (no point for 0
        decimals); one more for a minus sign when a value is negative.

    Examples
    --------
    >>> f = fixed_field([1008.5857, -0.5, 3.0], 2, min_int_digits=3)
    >>> rows = template(3, f.blank)
    >>> f.write(rows, 0)
    >>> [bytes(r) for r in rows]
    [b'1008.59', b'\\x00 -0.50', b'\\x00  3.00']
    """
    _check_decimals(decimals)
    x = _finite(values)
    scale = 10**decimals
    negative = x < 0
    any_negative = bool(negative.any())
    scaled = np.abs(x) if any_negative else x.copy()
    scaled *= scale
    np.rint(scaled, out=scaled)
    top = float(scaled.max(initial=0.0))
    ints = scaled.astype(np.int32 if top < 2**31 - 1 else np.int64)
    ip = ints // scale
    odd = np.flatnonzero(negative & (ints > 0)) if any_negative else np.zeros(0, np.intp)
    point = 1 + decimals if decimals else 0
    odd_texts = [f"{v:.{decimals}f}".encode() for v in x[odd].tolist()]
    top_ip = int(top) // scale
    int_digits = max([min_int_digits, len(str(top_ip)), *(len(t) - point for t in odd_texts)])
    width, min_width = int_digits + point, min_int_digits + point
    pieces: list[tuple[int, npt.NDArray[np.unsignedinteger], int]] = []
    above = ip  # ip // 10**(4 * k), k = 0 for the units group
    for k in range(-(-int_digits // 4)):
        first = _UNITS if k == 0 else _SPACED
        if top_ip >= 10 ** (4 * (k + 1)):  # some value has digits above this group
            higher = above // _GROUP
            group = above - higher * _GROUP
            index = np.where(higher > 0, group, group + first)
            above = higher
        elif k == 0 or top_ip >= 10 ** (4 * k):  # the highest group of some value
            index = above + first
        else:  # no digits here: the blank (spaces) stays
            break
        words = np.take(_GROUPS, index)
        end = int_digits - 4 * k
        nbytes = min(4, end)
        pieces.append(
            (end - nbytes, words >> np.uint32(8 * (4 - nbytes)) if nbytes < 4 else words, nbytes)
        )
    if decimals:
        fraction = np.take(_FRACTION, ints - ip * scale)
        pieces.append((int_digits + 1, fraction >> np.uint32(8 * (4 - decimals)), decimals))
    blank = bytes(width - min_width) + b" " * min_int_digits + (b"." if decimals else b"")
    blank += b" " * decimals
    odd_text = _odd_text(odd_texts, width, min_width)
    return NumberField(width, min_width, blank, tuple(pieces), odd, odd_text)


def significant_field(values: npt.ArrayLike, digits: int = 4) -> NumberField:
    """Format numbers with ``digits`` significant digits, at most :data:`MAX_DECIMALS` decimals.

    For measurements: ``123.456 -> " 123.5"``, ``12.3456 -> " 12.35"``, ``0.123456 -> "0.1235"``,
    ``0.00012 -> "0.0001"``, ``0.00001 -> "0"``, ``123456.7 -> "123457"`` (integer digits are never
    cut), right-aligned in :data:`SIGNIFICANT_WIDTH` bytes; negative values and values from 1e6 on
    widen the field. Non-finite values are written as ``0``.

    Parameters
    ----------
    values : array_like of float
        Any shape; one row per value in C order.
    digits : int
        Significant digits, 1 to :data:`MAX_DECIMALS`.

    Returns
    -------
    NumberField

    Examples
    --------
    >>> f = significant_field([123.456, 0.123456, 99.996])
    >>> rows = template(3, f.blank)
    >>> f.write(rows, 0)
    >>> [bytes(r) for r in rows]
    [b' 123.5', b'0.1235', b' 100.0']
    """
    if not 1 <= digits <= MAX_DECIMALS:
        raise ValueError(f"digits={digits}: expected 1..{MAX_DECIMALS}")
    x = _finite(values)
    a = np.abs(x)
    decimals = np.full(len(x), MAX_DECIMALS, np.intp)
    for e in range(digits - MAX_DECIMALS, digits):  # one decimal less per power of ten
        decimals -= a >= 10.0**e
    scaled = a * np.take(_POW10, decimals)
    np.rint(scaled, out=scaled)
    carried = (scaled >= 10**digits) & (decimals > 0)  # 9.99996 -> 10.00, not 10.000
    if carried.any():
        decimals -= carried
        scaled = np.where(carried, np.rint(a * np.take(_POW10, decimals)), scaled)
    decimals *= scaled > 0  # what rounds to zero is written "0"
    odd_mask = scaled >= _GROUP
    odd_mask |= (x < 0) & (scaled > 0)
    odd = np.flatnonzero(odd_mask)
    odd_pairs = zip(x[odd].tolist(), decimals[odd].tolist(), strict=True)
    odd_texts = [f"{v:.{d}f}".encode() for v, d in odd_pairs]
    width = max([SIGNIFICANT_WIDTH, *map(len, odd_texts)])
    if len(odd):
        scaled[odd] = 0
    index = scaled.astype(np.intp)
    index += decimals * _GROUP
    start = width - SIGNIFICANT_WIDTH
    pieces = (
        (start, np.take(_SIGNIFICANT_HEAD, index), 4),
        (start + 4, np.take(_SIGNIFICANT_TAIL, index), 2),
    )
    blank = bytes(start) + b" " * SIGNIFICANT_WIDTH
    odd_text = _odd_text(odd_texts, width, SIGNIFICANT_WIDTH)
    return NumberField(width, SIGNIFICANT_WIDTH, blank, pieces, odd, odd_text)


def splice_runs(rows: U8, items: U8, offsets: I64) -> U8:
    """Interleave ``n + 1`` fixed-width rows with ``n`` variable-length runs of item rows.

    Returns ``rows[0] + items[o[0]:o[1]] + rows[1] + ... + items[o[n-1]:o[n]] + rows[n]`` as one
    flat uint8 array. Used for features whose geometry has any number of vertices: a row holds the
    end of one feature and the start of the next, the items are vertices. The row width must be a
    multiple of the item width: the output is built in item-sized units by two scatters (the rows
    through a sliding-window view, so each is one contiguous copy), with no Python loop.

    Parameters
    ----------
    rows : ndarray of uint8, shape (n + 1, s)
        C-contiguous; ``s`` a multiple of ``k``.
    items : ndarray of uint8, shape (m, k)
        C-contiguous.
    offsets : ndarray of int, shape (n + 1,)
        Run ``i`` is ``items[offsets[i]:offsets[i + 1]]``; ``offsets[0] == 0``, ``offsets[n] == m``.

    Returns
    -------
    ndarray of uint8, shape ((n + 1) * s + m * k,)

    Examples
    --------
    >>> rows = np.frombuffer(b"<(|(|>", np.uint8).reshape(3, 2)
    >>> items = np.frombuffer(b"abcdef", np.uint8).reshape(3, 2)
    >>> splice_runs(rows, items, np.array([0, 2, 3])).tobytes()
    b'<(abcd|(ef|>'
    """
    n, k = len(rows) - 1, items.shape[1]
    if k == 0 or rows.shape[1] % k:
        raise ValueError(f"row width {rows.shape[1]} is not a multiple of the item width {k}")
    units = rows.shape[1] // k
    out = np.empty(((n + 1) * units + len(items), k), np.uint8)
    unit = np.dtype((np.void, k))
    out_units = out.view(unit)[:, 0]
    item_at = np.arange(units, units + len(items))  # item v of run i goes to v + (i + 1) * units
    item_at += np.repeat(np.arange(n) * units, np.diff(offsets))
    out_units[item_at] = items.view(unit)[:, 0]
    windows = np.lib.stride_tricks.sliding_window_view(out_units, units, writeable=True)
    windows[np.arange(n + 1) * units + offsets] = rows.reshape(n + 1, units, k).view(unit)[..., 0]
    return out.reshape(-1)


def drop_nul(text: bytes) -> bytes:
    """Return ``text`` without NUL bytes (the padding of widened fields)."""
    return text.replace(b"\0", b"") if b"\0" in text else text
