"""Vectorised JSON text helpers: number fields, splitting, splicing variable-length runs."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidestream.overlays._json_text import (
    NumberField,
    fixed_field,
    significant_field,
    splice_runs,
    template,
)


def texts(field: NumberField) -> list[bytes]:
    """Each row of the field written alone, NUL padding dropped (what ends up in a file)."""
    n = len(field.pieces[0][1])  # the units group: one word per value
    rows = template(n, field.blank)
    field.write(rows, 0)
    return [bytes(r).replace(b"\0", b"") for r in rows]


def test_fixed_field_examples() -> None:
    v = [1008.5857, 152.0, -0.5, 0.0, -0.004, 12.30, 99.999, 1e6 + 0.01, 3.0]
    f = fixed_field(v, 2, min_int_digits=5)
    assert texts(f) == [
        b" 1008.59", b"  152.00", b"   -0.50", b"    0.00", b"    0.00", b"   12.30",
        b"  100.00", b"1000000.01", b"    3.00",
    ]  # fmt: skip
    assert f.min_width == 8 and f.width == 10  # one value widened the field
    assert fixed_field([7.0], 0).blank == b" "
    assert texts(fixed_field([7.4, 12345678.9], 0)) == [b"7", b"12345679"]


@pytest.mark.parametrize("decimals", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 9e4, 1e5, 1e9])
def test_fixed_field_matches_python_format(decimals: int, scale: float) -> None:
    rng = np.random.default_rng(decimals)
    v = rng.uniform(0, scale, 400)
    v[:3] = [0.0, scale, 0.5]
    got = texts(fixed_field(v, decimals, min_int_digits=5))
    width = 5 + (decimals + 1 if decimals else 0)
    expected = [f"{x:{width}.{decimals}f}".encode() for x in v]
    mismatch = [(g, e) for g, e in zip(got, expected, strict=True) if g != e]
    # np.rint(x * 10**d) and Python's correctly rounded format may differ on exact ties only
    assert all(abs(float(g) - float(e)) <= 1.01 * 10.0**-decimals for g, e in mismatch)
    assert len(mismatch) <= 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.floats(-1e7, 1e7, allow_nan=False), min_size=1, max_size=40),
    st.integers(0, 4),
    st.integers(1, 7),
)
def test_fixed_field_round_trip(values: list[float], decimals: int, min_int_digits: int) -> None:
    f = fixed_field(values, decimals, min_int_digits=min_int_digits)
    got = texts(f)
    for text, value in zip(got, values, strict=True):
        assert len(text) >= min_int_digits + (decimals + 1 if decimals else 0)
        assert text.strip() == text.lstrip() and b" " not in text.strip()
        assert abs(float(text) - value) <= 0.5 * 10.0**-decimals + 1e-9 * abs(value)


def test_significant_field_examples() -> None:
    v = [123.456, 12.3456, 0.123456, 0.00012, 0.00001, 123456.7, 9.99996, 0.99996, 0.0, 255.0]
    assert texts(significant_field(v)) == [
        b" 123.5", b" 12.35", b"0.1235", b"0.0001", b"     0", b"123457", b" 10.00", b" 1.000",
        b"     0", b" 255.0",
    ]  # fmt: skip
    f = significant_field([-3.25, 3.4e9, 1.0])
    assert texts(f) == [b"-3.250", b"3400000000", b" 1.000"]  # NUL, not spaces, beyond 6
    assert f.width == 10 and f.min_width == 6
    assert texts(significant_field([np.nan, np.inf])) == [b"     0", b"     0"]
    assert texts(significant_field([0.123456, 98.76], 2)) == [b"  0.12", b"    99"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e8, 1e8, allow_nan=False), min_size=1, max_size=40))
def test_significant_field_round_trip(values: list[float]) -> None:
    for text, value in zip(texts(significant_field(values)), values, strict=True):
        parsed = float(text)
        a = abs(value)
        step = 1e-4 if a < 1 else 10.0 ** (np.floor(np.log10(a)) - 3)
        assert abs(parsed - value) <= 0.5 * min(step, 1.0) * 1.0001 + 1e-12


def test_split_interleaved_columns() -> None:
    xy = np.array([[1.5, -2.0], [30.25, 4.0], [-7.125, 123456.0]])
    x, y = fixed_field(xy, 2, min_int_digits=3).split(2)
    assert x.width == y.width
    rows = template(3, x.blank + b"," + y.blank)
    x.write(rows, 0)
    y.write(rows, x.width + 1)
    got = [bytes(r).replace(b"\0", b"").decode() for r in rows]
    parsed = np.array([[float(a) for a in r.split(",")] for r in got])
    np.testing.assert_allclose(parsed, xy, atol=0.005)


def reference_splice(
    rows: npt.NDArray[np.uint8], items: npt.NDArray[np.uint8], o: list[int]
) -> bytes:
    out = rows[0].tobytes()
    for i in range(len(o) - 1):
        out += items[o[i] : o[i + 1]].tobytes() + rows[i + 1].tobytes()
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_splice_runs_matches_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(1, 30)), int(rng.integers(1, 9))
    counts = rng.integers(0, 6, n)  # empty runs included
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    rows = rng.integers(65, 91, (n + 1, k * int(rng.integers(1, 5)))).astype(np.uint8)
    items = rng.integers(97, 123, (int(offsets[-1]), k)).astype(np.uint8)
    got = splice_runs(rows, items, offsets).tobytes()
    assert got == reference_splice(rows, items, offsets.tolist())


def test_splice_runs_needs_whole_units() -> None:
    rows = np.zeros((2, 5), np.uint8)
    items = np.zeros((3, 2), np.uint8)
    with pytest.raises(ValueError, match="multiple"):
        splice_runs(rows, items, np.array([0, 3]))
