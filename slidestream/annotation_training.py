"""``slidestream train tissue --slides ... --annotations ...``: learn from the user's annotations.

Wires the layers: each slide is opened (:mod:`slidestream.wsi`), its annotation file read and
checked against it, training patches are planned inside the class regions and streamed from the
slide (:mod:`slidestream.tiling`), then the classifier is cross-validated by slide and trained
(:mod:`slidestream.models.tissue`). The model folder gets ``config.json`` (the user's class
names and annotation colours), ``weights.safetensors``, ``cv.json``, ``training.json`` and a
``MODEL_CARD.md``.

Resumable: each slide's sampled patches are cached under ``OUT/.cache/`` (keyed by the slide's
fingerprint, the annotation file's bytes and the sampling settings) and cross-validation results
in ``OUT/.cache/cv-<key>.json``; an interrupted run started again skips what is done. The cache
is removed once the model is written.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.errors import AnnotationError, ConfigError

__all__ = [
    "AnnotatedSlide",
    "SlideTrainingSummary",
    "read_groups",
    "train_tissue_from_annotations",
]

logger = logging.getLogger(__name__)

#: Fewest patches a class needs over all slides.
MIN_PATCHES_PER_CLASS = 8

ProgressFactory = Callable[..., Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class AnnotatedSlide:
    """A slide with its annotation file and cross-validation group.

    Attributes
    ----------
    slide, annotations : Path
    group : str
        The slide's name unless a groups table names its patient.
    """

    slide: Path
    annotations: Path
    group: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SlideTrainingSummary:
    """What :func:`train_tissue_from_annotations` did.

    Attributes
    ----------
    model_dir : Path
    class_names : tuple of str
    patches : dict of str to dict of str to int
        Patches per slide and class.
    cv : dict or None
        ``cv.json`` content (None without ``cv_folds``).
    seconds : dict of str to float
        Wall time of sampling, cross-validation and training.
    """

    model_dir: Path
    class_names: tuple[str, ...]
    patches: dict[str, dict[str, int]]
    cv: dict[str, Any] | None
    seconds: dict[str, float]


def read_groups(path: Path) -> dict[str, str]:
    """Slide -> group (patient) from a CSV with ``slide`` and ``group`` (or ``patient``) columns.

    Slides are matched by file name or by name without extension.
    """
    try:
        with path.open(newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            fields = reader.fieldnames or []
            gcol = next((c for c in ("group", "patient", "patient_id") if c in fields), None)
            if "slide" not in fields or gcol is None:
                raise ConfigError(
                    f"{path}: groups CSV needs columns slide,group (or slide,patient); found "
                    f"{fields}"
                )
            return {row["slide"].strip(): row[gcol].strip() for row in reader if row["slide"]}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read groups CSV ({exc})") from exc


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_savez(path: Path, **arrays: npt.NDArray[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)  # type: ignore[arg-type]
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_all_annotations(
    items: Sequence[AnnotatedSlide], class_map: Mapping[str, str], mpp_override: float | None
) -> list[tuple[AnnotatedSlide, Any, str, float, tuple[int, int]]]:
    """Open each slide, read its annotations checked against its size."""
    from slidestream.tiling import read_annotations
    from slidestream.wsi import open_slide

    out = []
    for item in items:
        with open_slide(item.slide, mpp=mpp_override) as slide:
            dims = slide.dimensions
            ann = read_annotations(item.annotations, dimensions=dims, class_map=class_map)
            out.append((item, ann, slide.fingerprint, float(slide.mpp), dims))
        logger.info("%s", ann.summary())
    return out


def _sample_slide(
    item: AnnotatedSlide,
    regions: Mapping[str, Any],
    *,
    sampling: Any,
    class_names: tuple[str, ...],
    mpp_override: float | None,
    cache: Path | None,
    progress: ProgressFactory,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64], npt.NDArray[np.float64], float]:
    """Patches, labels, level-0 positions and patch side of one slide (cached)."""
    from slidestream.tiling import detect_tissue, plan_patches, read_patches
    from slidestream.wsi import open_slide

    if cache is not None and cache.is_file():
        with np.load(cache) as data:
            logger.info("%s: %d patches from the cache", item.slide.name, len(data["labels"]))
            return data["patches"], data["labels"], data["l0_xy"], float(data["l0_size"])
    with open_slide(item.slide, mpp=mpp_override) as slide:
        mask = detect_tissue(slide) if sampling.min_tissue > 0 else None
        plan = plan_patches(
            regions,
            slide_mpp=float(slide.mpp),
            dimensions=slide.dimensions,
            config=sampling,
            class_names=class_names,
            tissue_mask=mask,
        )
        with progress(total=len(plan), desc=f"patches {item.slide.name}", unit="patch") as bar:
            patches = read_patches(slide, plan, sampling, on_patch=lambda n: bar.update(1))
    if cache is not None:
        _atomic_savez(
            cache,
            patches=patches,
            labels=plan.labels,
            l0_xy=plan.l0_xy,
            l0_size=np.asarray(plan.l0_size, dtype=np.float64),
        )
    return patches, plan.labels, plan.l0_xy, plan.l0_size


def _tick(bar: Any, text: str) -> None:
    bar.update(1)
    bar.set_postfix_str(text)


def _identity(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def train_tissue_from_annotations(
    items: Sequence[AnnotatedSlide],
    out_dir: Path,
    *,
    config: Any,
    sampling: Any,
    class_map: Mapping[str, str] | None = None,
    init: str | None = None,
    cv_folds: int = 0,
    name: str | None = None,
    display_name: str | None = None,
    mpp_override: float | None = None,
    progress: ProgressFactory,
    registry: Path | None = None,
) -> SlideTrainingSummary:
    """Sample, cross-validate and train a tissue model on annotated slides.

    Parameters
    ----------
    items : sequence of AnnotatedSlide
    out_dir : Path
        Model folder to write.
    config : slidestream.models.tissue.TrainConfig
    sampling : slidestream.tiling.PatchSamplingConfig
        Its ``patch_mpp`` / ``patch_size_px`` are replaced by the model's.
    class_map : mapping, optional
        Annotation class -> model class (``""`` / ``"-"`` drops a class).
    init : str, optional
        Name or folder of a tissue model to start from.
    cv_folds : int
        Folds of cross-validation grouped by slide (0: none).
    name, display_name : str, optional
    mpp_override : float, optional
        Level-0 µm/px of slides that lack it.
    progress : callable
        ``progress(total=..., desc=..., unit=...)`` -> a context-managed bar with ``update``
        (``tqdm`` in the CLI).
    registry : Path, optional
        User model registry, for ``init`` names.

    Returns
    -------
    SlideTrainingSummary

    Raises
    ------
    AnnotationError
        Bad annotation files, or a class with too few patches.
    """
    import torch

    from slidestream.models.tissue import (
        SlidePatches,
        config_from_init,
        cross_validate_slides,
        load_tissue_model,
        normalise_slides,
        train_on_slides,
    )
    from slidestream.models.tissue._runner import save_model
    from slidestream.models.tissue._spec import atomic_write_text

    if not items:
        raise ConfigError("no slides given; pass --slides SLIDE... --annotations FILE...")
    t0 = time.perf_counter()
    init_state = None
    cfg = config
    if init is not None:
        init_model = load_tissue_model(init, "cpu", registry=registry)
        cfg = config_from_init(cfg, init_model)
        init_state = {k: v.detach().cpu() for k, v in init_model.module.state_dict().items()}
    sampling = replace(sampling, patch_mpp=cfg.spacing_um_px, patch_size_px=cfg.patch_size_pixels)
    read = _read_all_annotations(items, dict(class_map or {}), mpp_override)
    class_names = tuple(sorted({c for _, ann, *_ in read for c in ann.regions()}))
    if not class_names:
        raise AnnotationError(
            "no classified regions in the annotation files; classify the annotations in QuPath "
            "(right-click > Set classification) before exporting"
        )
    if len(class_names) < 2:
        raise AnnotationError(
            f"only one annotated class ({class_names[0]}); a classifier needs at least two"
        )
    colors: dict[str, tuple[int, int, int]] = {}
    for _, ann, *_ in read:
        for c, rgb in ann.class_colors().items():
            colors.setdefault(c, rgb)
    cache_dir = out_dir / ".cache"
    banks = []
    patch_counts: dict[str, dict[str, int]] = {}
    slides_info = []
    for item, ann, fingerprint, slide_mpp, dims in read:
        key = _identity(
            {
                "fingerprint": fingerprint,
                "annotations": _file_sha256(item.annotations),
                "sampling": asdict(sampling),
                "classes": class_names,
                "class_map": dict(class_map or {}),
                "mpp": mpp_override,
            }
        )
        patches, labels, l0_xy, l0_size = _sample_slide(
            item,
            ann.regions(),
            sampling=sampling,
            class_names=class_names,
            mpp_override=mpp_override,
            cache=cache_dir / f"{item.slide.name}.{key[:16]}.npz",
            progress=progress,
        )
        bank = SlidePatches(
            slide=item.slide.name,
            group=item.group,
            patches=np.ascontiguousarray(patches),
            labels=np.asarray(labels, dtype=np.int64),
            class_names=class_names,
            l0_xy=l0_xy,
            l0_size=l0_size,
        )
        banks.append(bank)
        patch_counts[item.slide.name] = bank.counts()
        slides_info.append(
            {
                "slide": item.slide.name,
                "annotations": item.annotations.name,
                "group": item.group,
                "mpp": slide_mpp,
                "dimensions": list(dims),
                "annotation_summary": ann.summary(),
                "patches": bank.counts(),
            }
        )
    totals = {c: sum(p[c] for p in patch_counts.values()) for c in class_names}
    short = sorted(c for c, n in totals.items() if n < MIN_PATCHES_PER_CLASS)
    if short:
        raise AnnotationError(
            f"classes {short} give fewer than {MIN_PATCHES_PER_CLASS} patches "
            f"({', '.join(f'{c}: {totals[c]}' for c in short)}); annotate larger regions of "
            f"them or lower --min-inside ({sampling.min_inside}) / --min-tissue "
            f"({sampling.min_tissue})"
        )
    t_sampled = time.perf_counter()
    reference = normalise_slides(banks, cfg)
    cv_json: dict[str, Any] | None = None
    if cv_folds:
        cv_key = _identity(
            {
                "slides": [b.slide for b in banks],
                "patches": patch_counts,
                "cache": sorted(p.name for p in cache_dir.glob("*.npz")),
                "config": asdict(cfg),
                "folds": cv_folds,
                "init": init,
            }
        )
        cv_cache = cache_dir / f"cv-{cv_key[:16]}.json"
        if cv_cache.is_file():
            cv_json = json.loads(cv_cache.read_text(encoding="utf-8"))
            logger.info("cross-validation results from %s", cv_cache)
        else:
            with progress(total=cv_folds, desc="cv", unit="fold") as bar:
                cv, spatial = cross_validate_slides(
                    banks,
                    n_folds=cv_folds,
                    config=cfg,
                    init=init_state,
                    on_fold=lambda k, r: _tick(bar, r.summary_line()),
                )
            cv_json = cv.summary()
            cv_json["grouped_by"] = "spatial blocks" if spatial else "slide group"
            cv_json["folds"] = [f.to_json() for f in cv.folds]
            cv_json["pooled"] = cv.pooled.to_json()
            cv_json["seconds"] = cv.seconds
            atomic_write_text(cv_cache, json.dumps(cv_json, indent=2) + "\n")
    t_cv = time.perf_counter()
    training = {
        "source": "annotated slides",
        "slides": [b.slide for b in banks],
        "groups": sorted({b.group for b in banks}),
        "patches_per_class": totals,
    }
    with progress(total=cfg.epochs, desc="train", unit="epoch") as bar:
        result = train_on_slides(
            banks,
            config=cfg,
            class_colors=[colors[c] for c in class_names]
            if set(class_names) <= set(colors)
            else None,
            name=name,
            display_name=display_name,
            init=init_state,
            stain_reference=reference,
            on_epoch=lambda e, n, s: _tick(bar, ", ".join(f"{k} {v:.4f}" for k, v in s.items())),
            extra={"training": training},
        )
    spec = result.spec
    if spec.class_colors is None:
        spec = spec.replace(
            class_colors=tuple(colors.get(c, spec.colors[i]) for i, c in enumerate(class_names))
        )
    spec = save_model(result.net, spec, out_dir)
    t_done = time.perf_counter()
    seconds = {
        "sampling": t_sampled - t0,
        "cross_validation": t_cv - t_sampled,
        "training": t_done - t_cv,
    }
    record = {
        "classes": list(class_names),
        "class_colors": [list(c) for c in spec.colors],
        "slides": slides_info,
        "sampling": asdict(sampling),
        "train_config": asdict(cfg),
        "init": init,
        "class_map": dict(class_map or {}),
        "cv": cv_json,
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
    }
    atomic_write_text(out_dir / "training.json", json.dumps(record, indent=2, default=str) + "\n")
    if cv_json is not None:
        atomic_write_text(out_dir / "cv.json", json.dumps(cv_json, indent=2) + "\n")
    atomic_write_text(out_dir / "MODEL_CARD.md", _card(spec, record))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return SlideTrainingSummary(
        model_dir=out_dir,
        class_names=class_names,
        patches=patch_counts,
        cv=cv_json,
        seconds=seconds,
    )


def _card(spec: Any, record: Mapping[str, Any]) -> str:
    """MODEL_CARD.md of a model trained on annotated slides."""
    classes = record["classes"]
    totals = {c: sum(s["patches"][c] for s in record["slides"]) for c in classes}
    cv = record["cv"]
    first = (
        f"Tissue classifier trained on the annotations of {len(record['slides'])} slide(s): "
        f"{', '.join(classes)}."
    )
    class_cells = ", ".join(
        f"`{c}` {tuple(rgb)}" for c, rgb in zip(classes, record["class_colors"], strict=True)
    )
    norm = "per slide" if record["train_config"].get("stain_norm") else "none"
    lines = [
        f"# {spec.name or 'tissue model'} — trained on annotated slides",
        "",
        first,
        "",
        "| | |",
        "|---|---|",
        f"| classes | {class_cells} |",
        f"| input | {spec.patch_size_pixels} px at {spec.spacing_um_px} µm/px |",
        f"| patches per class | {', '.join(f'{c} {n}' for c, n in totals.items())} |",
        f"| init | {record['init'] or 'none (trained from scratch)'} |",
        f"| stain normalisation | {norm} |",
        "",
        "## Slides",
        "",
        "| slide | annotations | group | µm/px | patches |",
        "|---|---|---|---|---|",
    ]
    for s in record["slides"]:
        per = ", ".join(f"{c} {n}" for c, n in s["patches"].items())
        lines.append(
            f"| {s['slide']} | {s['annotations']} | {s['group']} | {s['mpp']:.4g} | {per} |"
        )
    lines += ["", "## Sampling", "", f"`{json.dumps(record['sampling'])}`", ""]
    lines += ["## Cross-validation", ""]
    if cv is None:
        lines.append("Not run (pass --cv-folds K).")
    else:
        lines.append(
            f"{cv['n_folds']}-fold, grouped by {cv['grouped_by']}; patch level (each held-out "
            "patch classified alone, as in the whole-slide tissue pass, before smoothing)."
        )
        lines += ["", "| metric | mean ± sd over folds | pooled |", "|---|---|---|"]
        for key in ("balanced_accuracy", "accuracy", "macro_f1"):
            lines.append(
                f"| {key.replace('_', ' ')} | {cv[key]['mean']:.4f} ± {cv[key]['sd']:.4f} | "
                f"{cv['pooled_' + key]:.4f} |"
            )
    lines += [
        "",
        "## Timing",
        "",
        ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items())
        + f" ({record['torch_threads']} torch threads).",
        "",
    ]
    return "\n".join(lines)
