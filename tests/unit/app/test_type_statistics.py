"""Per-nucleus-type statistics: exact counts and densities per class x type, and the stream."""

from __future__ import annotations

import numpy as np
import pytest

from slidestream.statistics import StatisticsAccumulator
from slidestream.summary import Summary, TypeStatistics

TYPES = ("other", "inflammatory", "epithelial", "spindle")


def _accumulate(chunks: int = 3) -> StatisticsAccumulator:
    """Tumour (class 0): 6 epithelial + 3 inflammatory; stroma (class 1): 4 spindle + 2
    inflammatory; outside every class (-1): 1 other. Split into ``chunks`` chunks."""
    cls = np.array([0] * 9 + [1] * 6 + [-1])
    typ = np.array([2] * 6 + [1] * 3 + [3] * 4 + [1] * 2 + [0])
    area = np.arange(1, 17, dtype=np.float64) * 10.0
    ecc = np.linspace(0.1, 0.9, 16)
    hema = np.full(16, 0.5)
    acc = StatisticsAccumulator(("tumour", "stroma", "Unclassified"), type_names=TYPES)
    for part in np.array_split(np.arange(16), chunks):
        idx = np.asarray(part)
        acc.add(
            area_um2=area[idx],
            hematoxylin_od=hema[idx],
            class_index=np.where(cls[idx] < 0, 2, cls[idx]),
            type_index=typ[idx],
            eccentricity=ecc[idx],
        )
    return acc


def test_counts_fractions_and_densities_per_class_and_type_are_exact() -> None:
    stats = _accumulate().result(
        tissue_area_mm2=2.0,
        class_area_mm2={"tumour": 1.5, "stroma": 0.25, "Unclassified": 0.25},
        drop_empty=("Unclassified",),
    )
    overall = stats.types
    assert {t: s.nucleus_count for t, s in overall.items()} == {
        "other": 1,
        "inflammatory": 5,
        "epithelial": 6,
        "spindle": 4,
    }
    assert overall["inflammatory"].nuclei_per_mm2 == pytest.approx(5 / 2.0)
    assert overall["inflammatory"].fraction == pytest.approx(5 / 16)
    assert stats.inflammatory_epithelial_ratio == pytest.approx(5 / 6)
    tumour = stats.classes["tumour"]
    assert tumour.types["inflammatory"].nucleus_count == 3
    assert tumour.types["inflammatory"].nuclei_per_mm2 == pytest.approx(3 / 1.5)
    assert tumour.types["epithelial"].fraction == pytest.approx(6 / 9)
    empty = TypeStatistics(nucleus_count=0, fraction=0.0, nuclei_per_mm2=0.0)
    assert tumour.types["spindle"] == empty
    assert tumour.inflammatory_epithelial_ratio == pytest.approx(0.5)
    stroma = stats.classes["stroma"]
    assert stroma.types["spindle"].nuclei_per_mm2 == pytest.approx(4 / 0.25)
    assert stroma.inflammatory_epithelial_ratio is None  # no epithelial nuclei
    # morphometry per type: epithelial areas are 10..60 um^2, eccentricity its share of linspace
    epi = tumour.types["epithelial"]
    assert epi.nucleus_area_um2.mean == pytest.approx(35.0)
    assert epi.nucleus_area_um2.median == pytest.approx(35.0)
    assert epi.eccentricity.mean == pytest.approx(np.linspace(0.1, 0.9, 16)[:6].mean())
    assert epi.mean_hematoxylin_od == pytest.approx(0.5)
    # the class x type counts add up to the class counts, and the types to the slide
    for c in stats.classes.values():
        assert sum(t.nucleus_count for t in c.types.values()) == c.nucleus_count
    assert sum(t.nucleus_count for t in overall.values()) == stats.nucleus_count == 16


def test_chunking_does_not_change_the_statistics() -> None:
    areas = {"tumour": 1.5, "stroma": 0.25}
    one = _accumulate(1).result(tissue_area_mm2=2.0, class_area_mm2=areas)
    many = _accumulate(5).result(tissue_area_mm2=2.0, class_area_mm2=areas)
    assert one == many


def test_untyped_accumulator_writes_no_type_blocks_and_summary_round_trips() -> None:
    acc = StatisticsAccumulator(("tumour",))
    acc.add(area_um2=[10.0, 20.0], hematoxylin_od=[0.4, 0.6], class_index=[0, 0])
    stats = acc.result(tissue_area_mm2=1.0, class_area_mm2={"tumour": 1.0})
    assert stats.types == {} and stats.inflammatory_epithelial_ratio is None
    typed = _accumulate().result(tissue_area_mm2=2.0, class_area_mm2={"tumour": 1.5})
    from slidestream.summary import Provenance, SlideRecord

    summary = Summary(
        slide=SlideRecord(name="s", path="/s.svs", fingerprint="f"),
        statistics=typed,
        provenance=Provenance(parameters_hash="h"),
    )
    back = Summary.from_json(summary.to_json())
    assert back.statistics.types == typed.types
    assert back.statistics.classes["tumour"].types == typed.classes["tumour"].types
    assert back.statistics.inflammatory_epithelial_ratio == typed.inflammatory_epithelial_ratio


def test_accumulator_with_types_needs_type_index() -> None:
    acc = StatisticsAccumulator(("tumour",), type_names=TYPES)
    with pytest.raises(ValueError, match="type_index"):
        acc.add(area_um2=[1.0], hematoxylin_od=[0.5], class_index=[0])
