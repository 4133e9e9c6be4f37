"""The ``summary.json`` schema, defined once: a slide's statistics, provenance and outputs.

The pipeline builds a :class:`Summary` and writes ``summary.json`` with :meth:`Summary.to_json`;
the database layer reads one with :meth:`Summary.from_json` (``slidestream.db.record_run``);
``docs/summary.md`` documents exactly these fields (a test checks it) and the tests read results
through it.

Versioning: :data:`SUMMARY_SCHEMA` names the schema. Adding a field (with a default) keeps the
name, and readers ignore keys they do not know, so an older summary still reads (its new fields
take their defaults). Renaming or removing a field, or changing its meaning, needs a new name.
To extend the statistics, add a field with a default to :class:`NucleusStatistics` (or
:class:`TypeStatistics`) and its parsing in :func:`_nucleus_fields`. Per nucleus type
(``statistics.types`` and ``statistics.classes.<class>.types``) every number is defined once, in
:class:`TypeStatistics`.

Frames and units: slide sizes in level-0 px, µm/px, areas µm² (nuclei) and mm² (tissue), optical
densities in OD units, times in seconds and ISO 8601 UTC timestamps.

This module imports nothing of ours but :mod:`slidestream.errors` (a bottom layer: the database
layer imports it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from types import MappingProxyType
from typing import Any

from slidestream.errors import ConfigError

__all__ = [
    "OUTPUT_NAMES",
    "SUMMARY_NAME",
    "SUMMARY_SCHEMA",
    "ClassStatistics",
    "ModelRecord",
    "NucleusStatistics",
    "Provenance",
    "SlideRecord",
    "SlideStatistics",
    "Summary",
    "TypeStatistics",
    "ValueSummary",
]

SUMMARY_SCHEMA = "slidestream.summary/1"
"""The ``schema`` value of every ``summary.json`` (see the module docstring on versioning)."""

SUMMARY_NAME = "summary.json"
"""File name of a slide's summary (written last: its presence marks the slide done)."""

OUTPUT_NAMES: Mapping[str, str] = MappingProxyType(
    {
        "nuclei_geojson": "nuclei.geojson.gz",
        "tissue_geojson": "tissue.geojson",
        "nuclei_parquet": "nuclei.parquet",
        "overlay_png": "overlay.png",
        "tissue_mask_png": "tissue_mask.png",
        "summary_json": SUMMARY_NAME,
    }
)
"""Role -> file name of every output in a slide's folder (``summary.outputs``)."""

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True, kw_only=True)
class ValueSummary:
    """Mean, median and quartiles of a per-nucleus value (``None`` without nuclei)."""

    mean: float | None = None
    median: float | None = None
    q1: float | None = None
    q3: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeStatistics:
    """The nuclei of one nucleus type inside a region (the whole tissue, or one tissue class)."""

    nucleus_count: int = 0
    """Nuclei of the type in the region."""
    fraction: float | None = None
    """Share of the region's nuclei that have the type, 0..1 (``None`` without nuclei)."""
    nuclei_per_mm2: float | None = None
    """Nuclei of the type per mm² of the region (``None`` when its area is 0)."""
    nucleus_area_um2: ValueSummary = field(default_factory=ValueSummary)
    """Areas of those nuclei in µm²."""
    eccentricity: ValueSummary = field(default_factory=ValueSummary)
    """Eccentricity of the ellipse of equal second moments (0 circle .. 1 line), unitless."""
    mean_hematoxylin_od: float | None = None
    """Mean haematoxylin optical density of those nuclei (OD units)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class NucleusStatistics:
    """Nucleus statistics of a region (the whole tissue, or one tissue class)."""

    nucleus_count: int | None = None
    """Nuclei found."""
    nuclei_per_mm2: float | None = None
    """Nuclei per mm² of the region (``None`` when its area is 0)."""
    nucleus_area_um2: ValueSummary = field(default_factory=ValueSummary)
    """Nucleus areas in µm²."""
    mean_hematoxylin_od: float | None = None
    """Mean haematoxylin optical density of the nuclei (OD units)."""
    types: Mapping[str, TypeStatistics] = field(default_factory=dict)
    """Nucleus type (the model's names: ``epithelial``, ``inflammatory``, ``spindle``,
    ``other``) -> its statistics in the region; every type of the model is listed (count 0 when
    absent); empty when the nucleus model has no type head."""
    inflammatory_epithelial_ratio: float | None = None
    """Inflammatory nuclei per epithelial nucleus in the region (``None`` without a type head,
    or without epithelial nuclei)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ClassStatistics(NucleusStatistics):
    """One tissue class: its area and the statistics of the nuclei inside it."""

    area_mm2: float | None = None
    """Area of the class region in mm² (counted on the tissue mask)."""
    fraction: float | None = None
    """``area_mm2`` / tissue area."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideStatistics(NucleusStatistics):
    """The ``statistics`` block: the whole tissue and each tissue class."""

    tissue_area_mm2: float | None = None
    """Detected tissue area in mm²."""
    classes: Mapping[str, ClassStatistics] = field(default_factory=dict)
    """Tissue class -> its statistics (``Unclassified`` only when it holds area or nuclei)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideRecord:
    """The ``slide`` block: which slide, and its geometry."""

    name: str
    """File name without the slide extension."""
    path: str
    """Absolute path of the slide file (or DICOM folder)."""
    fingerprint: str
    """Content fingerprint (OpenSlide quickhash-1, else sha256 of the bytes)."""
    output_dir: str | None = None
    """Name of the slide's output folder inside the run's output folder."""
    vendor: str | None = None
    reader: str | None = None
    """Pixel backend that served the reads (``openslide``, ``fast-tiff``, ``tifffile``...)."""
    width: int | None = None
    """Level-0 width in px."""
    height: int | None = None
    """Level-0 height in px."""
    mpp_x: float | None = None
    """Level-0 µm/px along x."""
    mpp_y: float | None = None
    """Level-0 µm/px along y."""
    objective_power: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelRecord:
    """One model of the run (``provenance.models.<role>``)."""

    name: str
    sha256: str
    """sha256 of the weights (``classical`` for the model without weights)."""
    mpp: float | None = None
    """Working µm/px of the model."""
    details: Mapping[str, Any] = field(default_factory=dict)
    """Role-specific settings: the nucleus post-processing thresholds, the tissue classes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Provenance:
    """The ``provenance`` block: what produced the results, and how."""

    parameters_hash: str
    """sha256 of the result parameters and the model hashes (decides reuse)."""
    software_version: str = "unknown"
    git_commit: str | None = None
    """Commit of the checkout slidestream ran from (``None`` for an installed wheel)."""
    versions: Mapping[str, str] = field(default_factory=dict)
    """Versions of python, numpy, torch, openslide and the other libraries that shape results."""
    device: str | None = None
    """Torch device of the models."""
    models: Mapping[str, ModelRecord] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    """The result parameters, by configuration field name."""
    config: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The resolved configuration tree (``{section: {key: value}}``)."""
    workers: Mapping[str, int] = field(default_factory=dict)
    """``readers`` and ``postprocess`` process counts."""
    execution: Mapping[str, str] = field(default_factory=dict)
    """How those workers ran: ``host`` (``local`` or ``dask-worker <address>``), ``tile_reading``
    and ``postprocess`` (``processes``, ``threads`` or ``inline``), and the ``reason``."""
    timings_s: Mapping[str, float] = field(default_factory=dict)
    tissue_mask_mpp: float | None = None
    tissue_stain_gains: tuple[float, ...] | None = None
    """The slide's haematoxylin and eosin gains (tissue models with stain normalisation)."""
    truncated_nuclei: int = 0
    """Nuclei that touched a tile border (the halo was too small for them)."""
    started_at: str | None = None
    finished_at: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """A slide's ``summary.json``."""

    slide: SlideRecord
    statistics: SlideStatistics
    provenance: Provenance
    outputs: Mapping[str, str] = field(default_factory=lambda: dict(OUTPUT_NAMES))
    """Role -> file name in the slide's folder."""
    schema: str = SUMMARY_SCHEMA

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict (the file's content); non-finite numbers become ``null``."""
        data = asdict(self)
        ordered = {"schema": data.pop("schema"), **data}
        return _finite(ordered)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, data: object, *, source: str = "summary.json") -> Summary:
        """Parse a ``summary.json`` mapping (unknown keys are ignored).

        Raises
        ------
        ConfigError
            Wrong schema name, a required field missing, or a block of the wrong shape; the
            message names ``source`` and the field.
        """
        top = _mapping(data, "the file", source)
        if top.get("schema") != SUMMARY_SCHEMA:
            raise ConfigError(
                f"{source}: schema {top.get('schema')!r}, expected {SUMMARY_SCHEMA!r}; "
                "rerun the slide with this slidestream"
            )
        slide = _mapping(top.get("slide"), "slide", source)
        prov = _mapping(top.get("provenance"), "provenance", source)
        try:
            slide_record = SlideRecord(
                name=str(slide["name"]),
                path=str(slide["path"]),
                fingerprint=str(slide["fingerprint"]),
                output_dir=_opt_str(slide.get("output_dir")),
                vendor=_opt_str(slide.get("vendor")),
                reader=_opt_str(slide.get("reader")),
                width=_opt_int(slide.get("width"), "slide.width", source),
                height=_opt_int(slide.get("height"), "slide.height", source),
                mpp_x=_opt_float(slide.get("mpp_x"), "slide.mpp_x", source),
                mpp_y=_opt_float(slide.get("mpp_y"), "slide.mpp_y", source),
                objective_power=_opt_float(
                    slide.get("objective_power"), "slide.objective_power", source
                ),
            )
            parameters_hash = str(prov["parameters_hash"])
        except KeyError as err:
            raise ConfigError(f"{source}: missing field {err.args[0]!r}") from err
        models = {
            str(role): _model(spec, f"provenance.models.{role}", source)
            for role, spec in _mapping(prov.get("models"), "provenance.models", source).items()
        }
        gains = prov.get("tissue_stain_gains")
        provenance = Provenance(
            parameters_hash=parameters_hash,
            software_version=str(prov.get("software_version", "unknown")),
            git_commit=_opt_str(prov.get("git_commit")),
            versions={
                str(k): str(v)
                for k, v in _mapping(prov.get("versions"), "provenance.versions", source).items()
            },
            device=_opt_str(prov.get("device")),
            models=models,
            parameters=dict(_mapping(prov.get("parameters"), "provenance.parameters", source)),
            config={
                str(k): dict(_mapping(v, f"provenance.config.{k}", source))
                for k, v in _mapping(prov.get("config"), "provenance.config", source).items()
            },
            workers={
                str(k): int(v)
                for k, v in _mapping(prov.get("workers"), "provenance.workers", source).items()
            },
            execution={
                str(k): str(v)
                for k, v in _mapping(prov.get("execution"), "provenance.execution", source).items()
            },
            timings_s={
                str(k): float(v)
                for k, v in _mapping(prov.get("timings_s"), "provenance.timings_s", source).items()
            },
            tissue_mask_mpp=_opt_float(
                prov.get("tissue_mask_mpp"), "provenance.tissue_mask_mpp", source
            ),
            tissue_stain_gains=None if gains is None else tuple(float(g) for g in gains),
            truncated_nuclei=int(prov.get("truncated_nuclei") or 0),
            started_at=_opt_str(prov.get("started_at")),
            finished_at=_opt_str(prov.get("finished_at")),
        )
        return cls(
            slide=slide_record,
            statistics=_slide_statistics(top.get("statistics"), source),
            provenance=provenance,
            outputs={
                str(k): str(v) for k, v in _mapping(top.get("outputs"), "outputs", source).items()
            },
        )


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _mapping(value: object, what: str, source: str) -> Mapping[str, Any]:
    if value is None:
        return _EMPTY
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {what} is {type(value).__name__}, expected an object")
    return value


def _opt_str(value: object) -> str | None:
    return None if value is None else str(value)


def _opt_float(value: object, what: str, source: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{source}: {what} = {value!r}, expected a number or null")
    return float(value)


def _opt_int(value: object, what: str, source: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ConfigError(f"{source}: {what} = {value!r}, expected an integer or null")
    return int(value)


def _values(value: object, what: str, source: str) -> ValueSummary:
    m = _mapping(value, what, source)
    return ValueSummary(
        **{k: _opt_float(m.get(k), f"{what}.{k}", source) for k in ("mean", "median", "q1", "q3")}
    )


def _type_statistics(value: object, what: str, source: str) -> TypeStatistics:
    m = _mapping(value, what, source)
    return TypeStatistics(
        nucleus_count=_opt_int(m.get("nucleus_count"), f"{what}.nucleus_count", source) or 0,
        fraction=_opt_float(m.get("fraction"), f"{what}.fraction", source),
        nuclei_per_mm2=_opt_float(m.get("nuclei_per_mm2"), f"{what}.nuclei_per_mm2", source),
        nucleus_area_um2=_values(m.get("nucleus_area_um2"), f"{what}.nucleus_area_um2", source),
        eccentricity=_values(m.get("eccentricity"), f"{what}.eccentricity", source),
        mean_hematoxylin_od=_opt_float(
            m.get("mean_hematoxylin_od"), f"{what}.mean_hematoxylin_od", source
        ),
    )


def _nucleus_fields(m: Mapping[str, Any], what: str, source: str) -> dict[str, Any]:
    return {
        "nucleus_count": _opt_int(m.get("nucleus_count"), f"{what}.nucleus_count", source),
        "nuclei_per_mm2": _opt_float(m.get("nuclei_per_mm2"), f"{what}.nuclei_per_mm2", source),
        "nucleus_area_um2": _values(m.get("nucleus_area_um2"), f"{what}.nucleus_area_um2", source),
        "mean_hematoxylin_od": _opt_float(
            m.get("mean_hematoxylin_od"), f"{what}.mean_hematoxylin_od", source
        ),
        "types": {
            str(name): _type_statistics(t, f"{what}.types.{name}", source)
            for name, t in _mapping(m.get("types"), f"{what}.types", source).items()
        },
        "inflammatory_epithelial_ratio": _opt_float(
            m.get("inflammatory_epithelial_ratio"), f"{what}.inflammatory_epithelial_ratio", source
        ),
    }


def _slide_statistics(value: object, source: str) -> SlideStatistics:
    m = _mapping(value, "statistics", source)
    classes = {}
    for name, c in _mapping(m.get("classes"), "statistics.classes", source).items():
        what = f"statistics.classes.{name}"
        cm = _mapping(c, what, source)
        classes[str(name)] = ClassStatistics(
            area_mm2=_opt_float(cm.get("area_mm2"), f"{what}.area_mm2", source),
            fraction=_opt_float(cm.get("fraction"), f"{what}.fraction", source),
            **_nucleus_fields(cm, what, source),
        )
    return SlideStatistics(
        tissue_area_mm2=_opt_float(m.get("tissue_area_mm2"), "statistics.tissue_area_mm2", source),
        classes=classes,
        **_nucleus_fields(m, "statistics", source),
    )


def _model(value: object, what: str, source: str) -> ModelRecord:
    m = _mapping(value, what, source)
    details = {k: v for k, v in m.items() if k not in ("name", "sha256", "mpp", "details")}
    details.update(_mapping(m.get("details"), f"{what}.details", source))
    return ModelRecord(
        name=str(m.get("name", "unknown")),
        sha256=str(m.get("sha256", "")),
        mpp=_opt_float(m.get("mpp"), f"{what}.mpp", source),
        details=details,
    )
