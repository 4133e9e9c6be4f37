"""The configuration tree of slidestream: every option, its default, range and meaning, once.

:data:`OPTIONS` is the one table of run options. Each :class:`Option` names the
:class:`RunConfig` field it fills, its place in the TOML configuration tree
(``[section] key``), its command-line flag (if any), its click type (the range and the messages
of both the command line and the config file) and whether it changes results. The command-line
options of every command that shares one (``--mpp``, ``--device``, ``--workers``...) are built
from this table (:mod:`slidestream._cli_options`), so an option has one meaning, one range and
one default everywhere.

A configuration file is TOML shaped like the tree (see :func:`config_tree`)::

    [slides]
    mpp = 0.25                 # the inputs' own level-0 µm/px, for slides without it

    [tissue]
    model = "default"
    mask_mpp = 8.0
    min_area_um2 = 10000.0

    [resources]
    device = "cpu"
    batch_size = 8

Unknown or duplicated keys and values of the wrong type or outside the range are
:class:`~slidestream.errors.ConfigError` naming the file and the key. Command-line options win
over the file. The resolved tree is stored in every ``summary.json`` (``provenance.config``).

The CLI builds one :class:`RunConfig` and passes it down explicitly; nothing below the CLI reads
environment variables or globals.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import click

from slidestream._device import DEVICE_CHOICES, check_device_spec
from slidestream.errors import ConfigError

__all__ = [
    "DEFAULTS",
    "OPTIONS",
    "NucleiAs",
    "NucleiClassification",
    "Option",
    "RunConfig",
    "config_tree",
    "load_config_file",
    "option",
]

NucleiAs = Literal["polygons", "points"]

NucleiClassification = Literal["type", "tissue"]
"""What a nucleus detection's QuPath classification is: its nucleus type (typing models) or the
tissue class of its region."""

MPP_RANGE = click.FloatRange(0.01, 100.0)
"""Every ``--mpp`` (an input's own µm/px): 0.01 to 100 µm/px."""


class _DeviceType(click.ParamType):  # type: ignore[type-arg]
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (checked without importing torch)."""

    name = "device"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return check_device_spec(value)
        except ConfigError:
            self.fail(f"{value!r}: expected {DEVICE_CHOICES}", param, ctx)


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    """One run option: where it lives, what it accepts, what it means."""

    field: str
    """The :class:`RunConfig` field."""
    section: str
    """Table of the configuration tree (``slides``, ``tissue``, ``nuclei``, ``resources``,
    ``run``)."""
    key: str
    """Key inside the table."""
    flag: str | None
    """Command-line flag, or ``None`` for a config-file-only option."""
    kind: type
    """Python type of a value: ``int``, ``float``, ``str`` or ``bool``."""
    param: click.ParamType  # type: ignore[type-arg]
    """click type: the range and the messages of the flag and of the config file."""
    default: Any
    """Default value (``None``: chosen at run time, or not given)."""
    help: str
    """Help text (units included)."""
    result: bool = False
    """Whether the value changes results (part of the parameters hash)."""

    @property
    def where(self) -> str:
        """How a message names the option: ``--flag`` or ``[section] key``."""
        return self.flag or f"[{self.section}] {self.key}"

    def check(self, value: Any, *, source: str = "") -> Any:
        """Validate ``value`` (of :attr:`kind`, inside the range); returns it, floats as float.

        ``None`` is accepted when the default is ``None``. ``source`` prefixes messages (a
        config file's ``path: [section] key = value``).

        Raises
        ------
        ConfigError
            A wrong type or a value outside the range, with the flag's own message.
        """
        if value is None and self.default is None:
            return None
        prefix = source or f"{self.where} {value!r}"
        ok = (
            isinstance(value, bool)
            if self.kind is bool
            else (
                isinstance(value, int | float) and not isinstance(value, bool)
                if self.kind is float
                else isinstance(value, self.kind) and not isinstance(value, bool)
            )
        )
        if not ok:
            expected = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
            raise ConfigError(
                f"{prefix}: expected {expected[self.kind]} ({_describe(self.param)}), "
                f"got {type(value).__name__}; fix the value of {self.where}"
            )
        if self.kind is float and not math.isfinite(float(value)):
            raise ConfigError(f"{prefix}: expected a finite number ({_describe(self.param)})")
        try:
            converted = self.param.convert(value, None, None)
        except click.BadParameter as exc:
            raise ConfigError(f"{prefix}: {exc.message}; fix the value of {self.where}") from exc
        return float(converted) if self.kind is float else converted


def _describe(param: click.ParamType) -> str:  # type: ignore[type-arg]
    if isinstance(param, click.FloatRange | click.IntRange):
        lo = "" if param.min is None else f"{param.min:g}"
        hi = "" if param.max is None else f"{param.max:g}"
        return f"range {lo}..{hi}"
    if isinstance(param, click.Choice):
        return "one of " + ", ".join(str(c) for c in param.choices)
    if isinstance(param, _DeviceType):
        return DEVICE_CHOICES
    return param.name


OPTIONS: tuple[Option, ...] = (
    Option(
        field="mpp_override",
        section="slides",
        key="mpp",
        flag="--mpp",
        kind=float,
        param=MPP_RANGE,
        default=None,
        help="The input's own level-0 µm/px (overrides its metadata; needed when it has "
        "none). Never a target resolution.",
        result=True,
    ),
    Option(
        field="tissue_model",
        section="tissue",
        key="model",
        flag="--tissue-model",
        kind=str,
        param=click.STRING,
        default="default",
        help="Tissue model name or folder.",
        result=True,
    ),
    Option(
        field="tissue_mask_mpp",
        section="tissue",
        key="mask_mpp",
        flag="--mask-mpp",
        kind=float,
        param=click.FloatRange(0.5, 64.0),
        default=8.0,
        help="Resolution of the tissue mask in µm/px.",
        result=True,
    ),
    Option(
        field="min_tissue_area_um2",
        section="tissue",
        key="min_area_um2",
        flag="--min-tissue-area-um2",
        kind=float,
        param=click.FloatRange(0.0, 1e9),
        default=10_000.0,
        help="Tissue pieces smaller than this (µm²) are dropped from the mask.",
        result=True,
    ),
    Option(
        field="min_tissue_fraction",
        section="tissue",
        key="min_tile_fraction",
        flag="--min-tissue",
        kind=float,
        param=click.FloatRange(0.0, 1.0),
        default=0.02,
        help="Tiles whose core holds less tissue than this fraction are skipped.",
        result=True,
    ),
    Option(
        field="tissue_smoothing_cells",
        section="tissue",
        key="smoothing_cells",
        flag=None,
        kind=float,
        param=click.FloatRange(0.0, 16.0),
        default=1.0,
        help="Gaussian sigma, in classifier patches, applied to the class-probability grid.",
        result=True,
    ),
    Option(
        field="min_class_island_um2",
        section="tissue",
        key="min_class_island_um2",
        flag=None,
        kind=float,
        param=click.FloatRange(0.0, 1e9),
        default=40_000.0,
        help="Tissue-class regions smaller than this (µm²) merge into their surroundings.",
        result=True,
    ),
    Option(
        field="nuclei_model",
        section="nuclei",
        key="model",
        flag="--nuclei-model",
        kind=str,
        param=click.STRING,
        default="default",
        help="Nucleus model name (default = fast, accurate, classical) or weights path.",
        result=True,
    ),
    Option(
        field="nuclei_as",
        section="nuclei",
        key="as",
        flag="--nuclei-as",
        kind=str,
        param=click.Choice(["polygons", "points"]),
        default="polygons",
        help="Nuclei as outlines, or as centroids for slides too large for QuPath's memory.",
        result=True,
    ),
    Option(
        field="nuclei_classification",
        section="nuclei",
        key="classification",
        flag="--nuclei-classification",
        kind=str,
        param=click.Choice(["type", "tissue"]),
        default="type",
        help="QuPath classification of each nucleus: its nucleus type (a typing model; the "
        "tissue class then goes into the object's metadata) or its region's tissue class.",
        result=True,
    ),
    Option(
        field="overlay_type",
        section="nuclei",
        key="overlay_type",
        flag="--overlay-type",
        kind=str,
        param=click.STRING,
        default="inflammatory",
        help="Nucleus type whose density overlay.png maps over the tissue classes (a type "
        "name of the nucleus model: inflammatory, epithelial, spindle, other for the shipped "
        "one, your class names for a `train nuclei-types` model; 'all' or a name the model "
        "lacks: every nucleus).",
        result=True,
    ),
    Option(
        field="nuclei_tile_size_px",
        section="nuclei",
        key="tile_size_px",
        flag=None,
        kind=int,
        param=click.IntRange(128, 4096),
        default=512,
        help="Nucleus tile edge in px at the nucleus model's µm/px, halo included.",
        result=True,
    ),
    Option(
        field="nucleus_halo_um",
        section="nuclei",
        key="halo_um",
        flag=None,
        kind=float,
        param=click.FloatRange(1.0, 200.0),
        default=16.0,
        help="Halo around each nucleus tile core in µm (at least the largest nucleus).",
        result=True,
    ),
    Option(
        field="device",
        section="resources",
        key="device",
        flag="--device",
        kind=str,
        param=_DeviceType(),
        default="auto",
        help="Torch device: auto (CUDA when present), cpu or cuda[:N].",
    ),
    Option(
        field="batch_size",
        section="resources",
        key="batch_size",
        flag="--batch-size",
        kind=int,
        param=click.IntRange(1, 1024),
        default=8,
        help="Tiles per inference batch.",
    ),
    Option(
        field="workers",
        section="resources",
        key="workers",
        flag="--workers",
        kind=int,
        param=click.IntRange(0, 64),
        default=None,
        help="Tile-reading worker processes (0: read in the main process) [from the CPU count].",
    ),
    Option(
        field="postprocess_workers",
        section="resources",
        key="postprocess_workers",
        flag="--postprocess-workers",
        kind=int,
        param=click.IntRange(0, 64),
        default=None,
        help="Nucleus post-processing processes [from the CPU count; 0 (in the main process) "
        "for an fp32 model on <= 2 CPU cores].",
    ),
    Option(
        field="force",
        section="run",
        key="force",
        flag="--force",
        kind=bool,
        param=click.BOOL,
        default=False,
        help="Recompute slides whose results are up to date.",
    ),
)

_BY_FIELD = {o.field: o for o in OPTIONS}
_BY_PLACE = {(o.section, o.key): o for o in OPTIONS}


def option(field: str) -> Option:
    """The :class:`Option` of a :class:`RunConfig` field."""
    return _BY_FIELD[field]


@dataclass(frozen=True, slots=True, kw_only=True)
class _Defaults:
    """Attribute access to every option's default (``DEFAULTS.min_tissue_area_um2``)."""

    mpp_override: float | None
    tissue_model: str
    tissue_mask_mpp: float
    min_tissue_area_um2: float
    min_tissue_fraction: float
    tissue_smoothing_cells: float
    min_class_island_um2: float
    nuclei_model: str
    nuclei_as: NucleiAs
    nuclei_classification: NucleiClassification
    overlay_type: str
    nuclei_tile_size_px: int
    nucleus_halo_um: float
    device: str
    batch_size: int
    workers: int | None
    postprocess_workers: int | None
    force: bool


DEFAULTS = _Defaults(**{o.field: o.default for o in OPTIONS})
"""The default of every run option, from :data:`OPTIONS` (the one place they are set)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``slidestream run`` needs to analyse a batch of slides.

    Every field but ``out_dir``, ``db_url`` and ``show_progress`` is an :class:`Option` of
    :data:`OPTIONS` (defaults, ranges and help there); values are validated on construction
    with the command line's ranges and messages.

    Attributes
    ----------
    out_dir
        Output folder; each slide writes ``out_dir/<folder>/`` (see
        :func:`slidestream.pipeline.output_folder`).
    db_url
        Statistics database URL (SQLAlchemy form); ``None`` records nothing. Never stored in
        outputs (it may hold credentials).
    show_progress
        Show progress bars.
    """

    out_dir: Path
    mpp_override: float | None = DEFAULTS.mpp_override
    nuclei_model: str = DEFAULTS.nuclei_model
    tissue_model: str = DEFAULTS.tissue_model
    device: str = DEFAULTS.device
    batch_size: int = DEFAULTS.batch_size
    workers: int | None = DEFAULTS.workers
    postprocess_workers: int | None = DEFAULTS.postprocess_workers
    force: bool = DEFAULTS.force
    nuclei_as: NucleiAs = DEFAULTS.nuclei_as
    nuclei_classification: NucleiClassification = DEFAULTS.nuclei_classification
    overlay_type: str = DEFAULTS.overlay_type
    nuclei_tile_size_px: int = DEFAULTS.nuclei_tile_size_px
    nucleus_halo_um: float = DEFAULTS.nucleus_halo_um
    min_tissue_fraction: float = DEFAULTS.min_tissue_fraction
    tissue_mask_mpp: float = DEFAULTS.tissue_mask_mpp
    min_tissue_area_um2: float = DEFAULTS.min_tissue_area_um2
    tissue_smoothing_cells: float = DEFAULTS.tissue_smoothing_cells
    min_class_island_um2: float = DEFAULTS.min_class_island_um2
    db_url: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.out_dir, Path):
            raise ConfigError(f"out_dir {self.out_dir!r}: expected a pathlib.Path")
        for opt in OPTIONS:
            opt.check(getattr(self, opt.field))

    def result_parameters(self) -> dict[str, Any]:
        """The parameters that change results (stored with every run), by field name."""
        return {o.field: getattr(self, o.field) for o in OPTIONS if o.result}

    def tree(self) -> dict[str, dict[str, Any]]:
        """The resolved configuration tree (``provenance.config`` of ``summary.json``)."""
        return config_tree({o.field: getattr(self, o.field) for o in OPTIONS})

    def parameters_hash(self, model_hashes: Mapping[str, str]) -> str:
        """SHA-256 of the result parameters and the weights of the models used."""
        payload = {"parameters": self.result_parameters(), "models": dict(model_hashes)}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def with_options(self, **changes: Any) -> RunConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def config_tree(values: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Field values -> the configuration tree ``{section: {key: value}}`` (in table order)."""
    tree: dict[str, dict[str, Any]] = {}
    for opt in OPTIONS:
        if opt.field in values:
            tree.setdefault(opt.section, {})[opt.key] = values[opt.field]
    return tree


_KEY_LINE = re.compile(r"""^\s*("[^"]*"|'[^']*'|[A-Za-z0-9_.-]+)\s*=""")
_TABLE_LINE = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]\s*(#.*)?$")


def _duplicate_key(text: str) -> tuple[str, int] | None:
    """The first key given twice in one table of a TOML text, with its line number."""
    seen: set[tuple[str, str]] = set()
    tables: set[str] = set()
    table = ""
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _TABLE_LINE.match(line):
            table = m.group(1)
            if table in tables:
                return f"[{table}]", number
            tables.add(table)
            continue
        if m := _KEY_LINE.match(line):
            key = m.group(1).strip("\"'")
            if (table, key) in seen:
                return (f"[{table}] {key}" if table else key), number
            seen.add((table, key))
    return None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read and validate a configuration file; returns ``{RunConfig field: value}``.

    Parameters
    ----------
    path
        TOML file shaped like the configuration tree (tables ``[slides]``, ``[tissue]``,
        ``[nuclei]``, ``[resources]``, ``[run]``; see :data:`OPTIONS`).

    Returns
    -------
    dict
        The values the file sets, by :class:`RunConfig` field name, validated.

    Raises
    ------
    ConfigError
        Unreadable file or bad TOML; an unknown table or key, a key given twice, or a value of
        the wrong type or outside its range (the message names the file and the key).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc}); check the path") from exc
    duplicate = _duplicate_key(text)
    if duplicate is not None:
        key, line = duplicate
        raise ConfigError(f"{path}: line {line}: {key} is given twice; keep one of them")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the syntax") from exc
    sections = sorted({o.section for o in OPTIONS})
    out: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict) or section not in sections:
            raise ConfigError(
                f"{path}: unknown {'table' if isinstance(table, dict) else 'key'} {section!r}; "
                f"the file holds the tables {', '.join(f'[{s}]' for s in sections)}"
            )
        for key, value in table.items():
            opt = _BY_PLACE.get((section, key))
            if opt is None:
                known = ", ".join(o.key for o in OPTIONS if o.section == section)
                raise ConfigError(
                    f"{path}: unknown key [{section}] {key}; [{section}] knows {known}"
                )
            out[opt.field] = opt.check(value, source=f"{path}: [{section}] {key} = {value!r}")
    return out


def _check_known_fields() -> None:
    """Every option names a RunConfig field (import-time consistency of the table)."""
    names = {f.name for f in fields(RunConfig)}
    missing = [o.field for o in OPTIONS if o.field not in names]
    if missing:  # pragma: no cover - a programming error caught by any test
        raise ConfigError(f"config OPTIONS name unknown RunConfig fields {missing}")


_check_known_fields()
