"""Configuration of a whole-slide analysis run.

The CLI builds one :class:`RunConfig` from its options (plus an optional TOML file) and passes it
down explicitly; nothing reads environment variables or globals below the CLI.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from slidestream.errors import ConfigError

__all__ = ["NucleiAs", "RunConfig", "load_config_file"]

NucleiAs = Literal["polygons", "points"]

# Fields that change what a run computes; everything else (device, batch size, paths...)
# changes only how fast or where. Their hash decides whether a stored result can be reused.
_RESULT_FIELDS = (
    "mpp_override",
    "nuclei_model",
    "tissue_model",
    "nuclei_as",
    "nuclei_tile_size_px",
    "nucleus_halo_um",
    "min_tissue_fraction",
    "tissue_mask_mpp",
    "min_tissue_area_um2",
    "tissue_smoothing_cells",
    "min_class_island_um2",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class RunConfig:
    """Everything ``slidestream run`` needs to analyse a batch of slides.

    Attributes
    ----------
    out_dir
        Output folder; each slide writes ``out_dir/<slide-name>/``.
    mpp_override
        The input slides' own level-0 µm/px, for slides that lack it (``--mpp``). Never a target.
    nuclei_model, tissue_model
        Registry names or folders of the nucleus and tissue models.
    device
        ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda[:N]"``.
    batch_size
        Tiles per inference batch.
    workers
        Tile-reading worker processes; ``None`` picks from the CPU count.
    postprocess_workers
        Nucleus post-processing worker processes; ``None`` picks from the CPU count.
    force
        Recompute slides whose stored summary matches fingerprint, models and parameters.
    nuclei_as
        ``"polygons"`` (QuPath detections with outlines) or ``"points"`` (centroids only).
    nuclei_tile_size_px
        Nucleus tile edge in pixels at the nucleus model's µm/px, halo included.
    nucleus_halo_um
        Halo around each tile core, in µm; at least the largest nucleus diameter.
    min_tissue_fraction
        Tiles whose core holds less tissue than this fraction are skipped.
    tissue_mask_mpp
        Resolution of the tissue mask in µm/px.
    min_tissue_area_um2
        Tissue pieces smaller than this are dropped from the mask.
    tissue_smoothing_cells
        Gaussian sigma, in classifier patches, applied to the class-probability grid.
    min_class_island_um2
        Class regions smaller than this merge into their surroundings.
    db_url
        Statistics database URL (SQLAlchemy form); ``None`` records nothing.
    show_progress
        Show progress bars.
    """

    out_dir: Path
    mpp_override: float | None = None
    nuclei_model: str = "default"
    tissue_model: str = "default"
    device: str = "auto"
    batch_size: int = 8
    workers: int | None = None
    postprocess_workers: int | None = None
    force: bool = False
    nuclei_as: NucleiAs = "polygons"
    nuclei_tile_size_px: int = 512
    nucleus_halo_um: float = 16.0
    min_tissue_fraction: float = 0.02
    tissue_mask_mpp: float = 8.0
    min_tissue_area_um2: float = 20_000.0
    tissue_smoothing_cells: float = 1.0
    min_class_island_um2: float = 40_000.0
    db_url: str | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.mpp_override is not None and not 0.01 <= self.mpp_override <= 100.0:
            raise ConfigError(
                f"--mpp {self.mpp_override} is outside 0.01..100 µm/px; give the slide's own "
                "level-0 resolution, e.g. --mpp 0.25 for a 40x scan"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size {self.batch_size} must be at least 1")
        for name in ("workers", "postprocess_workers"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ConfigError(f"{name} {value} must be >= 0")
        if self.nuclei_as not in ("polygons", "points"):
            raise ConfigError(f"--nuclei-as {self.nuclei_as!r}: expected 'polygons' or 'points'")
        if not 128 <= self.nuclei_tile_size_px <= 4096:
            raise ConfigError(
                f"nuclei tile size {self.nuclei_tile_size_px} px is outside 128..4096"
            )
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ConfigError(f"min tissue fraction {self.min_tissue_fraction} not in 0..1")
        if self.nucleus_halo_um <= 0:
            raise ConfigError(f"nucleus halo {self.nucleus_halo_um} µm must be positive")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"--device {self.device!r}: expected auto, cpu or cuda[:N]")

    def result_parameters(self) -> dict[str, Any]:
        """The parameters that change results (stored with every run)."""
        return {name: getattr(self, name) for name in _RESULT_FIELDS}

    def all_parameters(self) -> dict[str, Any]:
        """Every parameter, JSON-ready (paths as strings)."""
        out = asdict(self)
        out["out_dir"] = str(self.out_dir)
        out.pop("db_url", None)  # may hold credentials; never stored in outputs
        return out

    def parameters_hash(self, model_hashes: dict[str, str]) -> str:
        """SHA-256 of the result parameters and the weights of the models used."""
        payload = {"parameters": self.result_parameters(), "models": model_hashes}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()

    def with_options(self, **changes: Any) -> RunConfig:
        """A copy with some fields replaced (validated again)."""
        return replace(self, **changes)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read run options from a TOML file (table ``[run]`` or top level).

    Parameters
    ----------
    path
        TOML file whose keys are :class:`RunConfig` field names.

    Returns
    -------
    dict
        Field name to value; unknown keys raise :class:`ConfigError`.
    """
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc}); fix the TOML syntax") from exc
    table = data.get("run", data)
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"{path}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    if "out_dir" in table:
        table["out_dir"] = Path(table["out_dir"])
    return dict(table)
