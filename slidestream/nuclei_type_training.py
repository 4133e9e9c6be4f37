"""``slidestream train nuclei-types``: fit a nucleus model's type head to the user's annotations.

Wires the layers: each slide is opened (:mod:`slidestream.wsi`), its annotation file read and
checked against it (:mod:`slidestream.tiling`); the classified nuclei (points, nucleus outlines,
QuPath cells' nuclei) are grouped into level-0 tiles, each tile is read with a margin and the
base model's decoder features of the nuclei's pixels are sampled
(:func:`~slidestream.models.nuclei._type_head.nucleus_type_samples`); the type head is
cross-validated with folds grouped by slide (or patient) and fitted on all nuclei; the model
folder gets ``nuclei-types.safetensors`` with its ``nuclei-types.json`` sidecar (the user's class
names and annotation colours, the base model's working µm/px and thresholds) and a
``MODEL_CARD.md``. ``slidestream run --nuclei-model FOLDER`` and ``evaluate nuclei --model
FOLDER`` use it.

The segmentation is the base model's, unchanged: only the type head is fitted.

Resumable: each slide's samples are cached under ``OUT/.cache/`` (keyed by the slide's
fingerprint, the annotation file's bytes, the base weights and the sampling settings); an
interrupted run started again skips the slides it has. The cache is removed once the model is
written.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from slidestream.annotation_training import (
    AnnotatedSlide,
    _atomic_savez,
    _file_sha256,
    _identity,
)
from slidestream.errors import AnnotationError, ConfigError
from slidestream.tiling import AnnotatedNuclei

__all__ = [
    "MIN_NUCLEI_PER_CLASS",
    "NucleiTypeTrainingSummary",
    "TypeCrossValidation",
    "train_nucleus_types_from_annotations",
]

logger = logging.getLogger(__name__)

MIN_NUCLEI_PER_CLASS = 10
"""Fewest annotated nuclei a class needs over all slides."""

WEIGHTS_NAME = "nuclei-types.safetensors"
"""Weights file of the model folder (sidecar ``nuclei-types.json``)."""

#: Working-resolution core side and margin of the tiles nuclei are sampled in (px).
_TILE_PX = 512
_MARGIN_PX = 32

ProgressFactory = Callable[..., Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class TypeCrossValidation:
    """Nucleus-level cross-validation of the type head (folds grouped by slide or patient).

    Each held-out annotated nucleus is typed by the mean type probability over its pixels (the
    predicted instance it matches, its outline, or a disc), as ``slidestream run`` types the
    nuclei it segments. Detection is not part of these figures (``evaluate nuclei`` gives it).

    Attributes
    ----------
    grouped_by : str
        ``slide`` or ``group`` (a groups CSV).
    folds : list of dict
        Per fold: held-out groups, nuclei, accuracy, balanced accuracy, macro F1, F1 per class.
    summary : dict of str to dict
        ``mean`` and ``sd`` over folds of accuracy, balanced accuracy, macro F1 and each class's
        F1.
    pooled : dict of str to float
        The same metrics over the pooled held-out predictions, and the confusion matrix.
    """

    grouped_by: str
    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    pooled: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return asdict(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class NucleiTypeTrainingSummary:
    """What :func:`train_nucleus_types_from_annotations` did.

    Attributes
    ----------
    model_dir : Path
    type_names : tuple of str
        The model's types (the annotation classes, sorted).
    nuclei : dict of str to dict of str to int
        Annotated nuclei per slide and class that gave samples.
    matched_fraction : float
        Share of annotated points that matched a predicted instance (outlines count as matched).
    cv : TypeCrossValidation or None
    seconds : dict of str to float
        Wall time of sampling, cross-validation and fitting.
    """

    model_dir: Path
    type_names: tuple[str, ...]
    nuclei: dict[str, dict[str, int]]
    matched_fraction: float
    cv: TypeCrossValidation | None
    seconds: dict[str, float]


def _save_samples(path: Path, samples: Any) -> None:
    _atomic_savez(path, **asdict(samples))


def _load_samples(path: Path) -> Any:
    from slidestream.models.nuclei._type_head import TypeSamples

    with np.load(path) as data:
        return TypeSamples(**{k: data[k] for k in data.files})


def _sample_slide(
    model: Any,
    slide_path: Path,
    nuclei: AnnotatedNuclei,
    labels: npt.NDArray[np.int64],
    *,
    group: int,
    mpp_override: float | None,
    config: Any,
    progress: ProgressFactory,
) -> Any:
    """Type samples of one slide's nuclei, tile by tile (level-0 tiles of 512 working px)."""
    from slidestream.models.nuclei._type_head import concat_samples, nucleus_type_samples
    from slidestream.wsi import open_slide

    with open_slide(slide_path, mpp=mpp_override) as slide:
        mpp = float(slide.mpp)
        side = max(16, round(_TILE_PX * model.mpp / mpp))
        margin = max(4, round(_MARGIN_PX * model.mpp / mpp))
        tile_of = np.floor(nuclei.xy / side).astype(np.int64)
        tiles = np.unique(tile_of, axis=0) if len(tile_of) else np.zeros((0, 2), np.int64)
        parts = []
        with progress(total=len(tiles), desc=f"nuclei {slide_path.name}", unit="tile") as bar:
            for tx, ty in tiles.tolist():
                sel = np.flatnonzero((tile_of[:, 0] == tx) & (tile_of[:, 1] == ty))
                x0, y0 = tx * side - margin, ty * side - margin
                rgb = slide.read_region((x0, y0), (side + 2 * margin, side + 2 * margin))
                origin = np.array([x0, y0], np.float64)
                outlines: list[npt.NDArray[np.float64] | None] = []
                for i in sel.tolist():
                    outline = nuclei.outlines[i]
                    outlines.append(None if outline is None else outline - origin)
                parts.append(
                    nucleus_type_samples(
                        model,
                        np.ascontiguousarray(rgb[..., :3]),
                        mpp,
                        nuclei.xy[sel] - origin,
                        labels[sel],
                        outlines=outlines,
                        group=group,
                        config=config,
                    )
                )
                bar.update(1)
    n_features = int(model.net.config.features[5]) * 9
    return concat_samples(parts, n_features)


def _grouped_folds(groups: npt.NDArray[np.int64], n_folds: int) -> list[npt.NDArray[np.int64]]:
    """Held-out group indices of each fold: largest groups first, each to the emptiest fold."""
    uniq, counts = np.unique(groups, return_counts=True)
    k = min(n_folds, len(uniq))
    sizes = np.zeros(k)
    members: list[list[int]] = [[] for _ in range(k)]
    for g in uniq[np.argsort(-counts, kind="stable")].tolist():
        f = int(np.argmin(sizes))
        members[f].append(int(g))
        sizes[f] += float(counts[uniq.tolist().index(g)])
    return [np.asarray(sorted(m), np.int64) for m in members]


def _metrics(
    true: npt.NDArray[np.int64], pred: npt.NDArray[np.int64], names: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1 (classes present) and F1 per class."""
    k = len(names)
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (true, pred), 1)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1).astype(np.float64)
    predicted = cm.sum(axis=0).astype(np.float64)
    present = support > 0
    recall = np.divide(tp, support, out=np.zeros(k), where=present)
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(k), where=(support + predicted) > 0)
    return {
        "nuclei": len(true),
        "accuracy": float(tp.sum() / max(len(true), 1)),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        **{f"f1_{n}": float(f1[i]) for i, n in enumerate(names) if present[i]},
        "confusion": cm.tolist(),
    }


def _cross_validate(
    samples: Any,
    names: tuple[str, ...],
    group_names: Sequence[str],
    *,
    n_folds: int,
    fit: Callable[[Any], Any],
    grouped_by: str,
    progress: ProgressFactory,
) -> TypeCrossValidation:
    from slidestream.models.nuclei._type_head import predict_sample_types

    folds_out: list[dict[str, Any]] = []
    true_all: list[npt.NDArray[np.int64]] = []
    pred_all: list[npt.NDArray[np.int64]] = []
    folds = _grouped_folds(samples.groups, n_folds)
    with progress(total=len(folds), desc="cv", unit="fold") as bar:
        for held in folds:
            test = np.isin(samples.groups, held)
            train = samples.subset(~test)
            missing = [n for i, n in enumerate(names) if not (train.labels == i).any()]
            if missing:
                logger.warning(
                    "cv fold holding out %s: classes %s have no training nuclei in the other "
                    "slides; their nuclei count as errors",
                    [group_names[g] for g in held.tolist()],
                    missing,
                )
            head = fit(train)
            held_out = samples.subset(test)
            pred = predict_sample_types(head, held_out).argmax(axis=1).astype(np.int64)
            m = _metrics(held_out.labels, pred, names)
            m["held_out"] = [group_names[g] for g in held.tolist()]
            folds_out.append(m)
            true_all.append(held_out.labels)
            pred_all.append(pred)
            bar.update(1)
            bar.set_postfix_str(f"balanced accuracy {m['balanced_accuracy']:.3f}")
    keys = ["accuracy", "balanced_accuracy", "macro_f1", *[f"f1_{n}" for n in names]]
    summary = {}
    for key in keys:
        vals = [f[key] for f in folds_out if key in f]
        if vals:
            summary[key] = {"mean": float(np.mean(vals)), "sd": float(np.std(vals)), "n": len(vals)}
    pooled = _metrics(np.concatenate(true_all), np.concatenate(pred_all), names)
    return TypeCrossValidation(
        grouped_by=grouped_by, folds=folds_out, summary=summary, pooled=pooled
    )


def train_nucleus_types_from_annotations(
    items: Sequence[AnnotatedSlide],
    out_dir: Path,
    *,
    base: str = "default",
    class_map: Mapping[str, str] | None = None,
    mpp_override: float | None = None,
    config: Any = None,
    cv_folds: int = 5,
    grouped_by: str = "slide",
    max_nucleus_um2: float = 400.0,
    name: str | None = None,
    device: str = "cpu",
    progress: ProgressFactory,
    command: str = "",
) -> NucleiTypeTrainingSummary:
    """Fit the type head of ``base`` to the classified nuclei of annotated slides.

    Parameters
    ----------
    items : sequence of AnnotatedSlide
        Slides, their annotation files and CV groups.
    out_dir : Path
        Model folder to write (created; an existing model there is replaced).
    base : str
        Nucleus model whose segmentation is kept (name, weights file or folder).
    class_map : mapping, optional
        Annotation class -> type name (``""`` or ``"-"`` drops a class).
    mpp_override : float, optional
        Level-0 µm/px of slides that lack it.
    config : TypeHeadConfig, optional
        Sampling and fitting settings.
    cv_folds : int
        Folds grouped by ``AnnotatedSlide.group`` (0: none; at most the number of groups).
    grouped_by : str
        What the groups are, for the card (``slide`` or ``group``).
    max_nucleus_um2 : float
        Classified polygons larger than this (µm²) are regions, not nuclei, and are left out.
    name : str, optional
        The model's name (default: the folder's name).
    device : str
        Where the base model runs.
    progress : callable
        ``progress(total=, desc=, unit=)`` -> context manager with ``update(n)`` and
        ``set_postfix_str(text)``.
    command : str
        The command line, for the card.

    Returns
    -------
    NucleiTypeTrainingSummary

    Raises
    ------
    AnnotationError
        No classified nuclei, or a class with fewer than :data:`MIN_NUCLEI_PER_CLASS`.
    ConfigError
        The base model is the classical segmenter.
    """
    import torch
    from safetensors.torch import load_file

    from slidestream._atomic import write_json_atomic, write_text_atomic
    from slidestream.models.nuclei._registry import load_resolved_weights, resolve_nuclei_weights
    from slidestream.models.nuclei._type_head import (
        TypeHeadConfig,
        build_typed_network,
        concat_samples,
        fit_type_head,
    )
    from slidestream.models.nuclei._weights import file_sha256, save_weights
    from slidestream.tiling import read_annotations
    from slidestream.wsi import open_slide

    cfg = config or TypeHeadConfig()
    if base == "classical":
        raise ConfigError("train nuclei-types: --base classical has no network; use a U-Net model")
    found = resolve_nuclei_weights(base)
    t0 = time.perf_counter()
    # 1. Every slide's classified nuclei, checked against the slide.
    read: list[tuple[AnnotatedSlide, AnnotatedNuclei, str, float, dict[str, tuple[int, int, int]]]]
    read = []
    for item in items:
        with open_slide(item.slide, mpp=mpp_override) as slide:
            ann = read_annotations(
                item.annotations, dimensions=slide.dimensions, class_map=dict(class_map or {})
            )
            nuclei = ann.nuclei(max_area_px2=max_nucleus_um2 / float(slide.mpp) ** 2)
            read.append((item, nuclei, slide.fingerprint, float(slide.mpp), ann.class_colors()))
        logger.info(
            "%s: %d classified nuclei (%d larger regions left out; %d unclassified objects)",
            item.annotations.name,
            len(nuclei.classes),
            nuclei.regions,
            ann.unclassified,
        )
    names = tuple(sorted({str(n) for _, nuc, *_ in read for n in nuc.classes}))
    totals = {n: sum(nuc.classes.count(n) for _, nuc, *_ in read) for n in names}
    if not names:
        raise AnnotationError(
            f"{items[0].annotations if items else 'annotations'}: no classified nucleus points "
            "or outlines; annotate nuclei as points or outlines with a class"
        )
    if len(names) < 2:
        raise AnnotationError(f"only one nucleus class {list(names)}; annotate two or more")
    short = sorted(n for n, c in totals.items() if c < MIN_NUCLEI_PER_CLASS)
    if short:
        raise AnnotationError(
            f"classes {short} have fewer than {MIN_NUCLEI_PER_CLASS} annotated nuclei "
            f"({', '.join(f'{n}: {totals[n]}' for n in short)}); annotate more of them or drop "
            "them with --class-map NAME=-"
        )
    colors: dict[str, tuple[int, int, int]] = {}
    for *_, cols in read:
        for k, v in cols.items():
            colors.setdefault(k, v)
    # 2. Samples (cached per slide).
    model = load_resolved_weights(found, device)
    model.tta = False  # features of the image as it is (views are sampled explicitly)
    base_sha = file_sha256(found.weights)
    cache_dir = out_dir / ".cache"
    group_names = sorted({item.group for item, *_ in read})
    parts = []
    per_slide: dict[str, dict[str, int]] = {}
    slides_info = []
    for item, nuclei, fingerprint, mpp, _ in read:
        key = _identity(
            {
                "fingerprint": fingerprint,
                "annotations": _file_sha256(item.annotations),
                "base": base_sha,
                "mpp": model.mpp,
                "postprocess": found.postprocess.to_dict(),
                "config": asdict(cfg),
                "classes": names,
                "class_map": dict(class_map or {}),
                "max_nucleus_um2": max_nucleus_um2,
                "group": item.group,
                "groups": group_names,
            }
        )
        cache = cache_dir / f"{key[:24]}.npz"
        labels = np.array([names.index(str(n)) for n in nuclei.classes], np.int64)
        if cache.is_file():
            samples = _load_samples(cache)
            logger.info("%s: %d nuclei from the cache", item.slide.name, samples.n_nuclei)
        else:
            samples = _sample_slide(
                model,
                item.slide,
                nuclei,
                labels,
                group=group_names.index(item.group),
                mpp_override=mpp_override,
                config=cfg,
                progress=progress,
            )
            _save_samples(cache, samples)
        parts.append(samples)
        counts = np.bincount(samples.labels, minlength=len(names))
        per_slide[item.slide.name] = {n: int(counts[i]) for i, n in enumerate(names)}
        slides_info.append(
            {
                "slide": item.slide.name,
                "annotations": item.annotations.name,
                "group": item.group,
                "mpp": mpp,
                "annotated": len(nuclei.classes),
                "nuclei": per_slide[item.slide.name],
                "matched": int(samples.matched.sum()),
                "regions_left_out": nuclei.regions,
            }
        )
    samples = concat_samples(parts, int(model.net.config.features[5]) * 9)
    t_sampled = time.perf_counter()
    # 3. Cross-validation and the final fit, from the base head.
    base_state = load_file(str(found.weights), device="cpu")
    init = {
        k.removeprefix("unet.final_conv.types."): v
        for k, v in base_state.items()
        if k.startswith("unet.final_conv.types.")
    }
    base_names = tuple(found.architecture.type_names)
    copy_rows = {i: base_names.index(n) for i, n in enumerate(names) if n in base_names}
    width = int(found.architecture.type_head_width)

    def fit(part: Any) -> Any:
        return fit_type_head(
            part, len(names), width=width, init=init, copy_rows=copy_rows, config=cfg
        )

    cv = None
    if cv_folds and len(group_names) >= 2:
        cv = _cross_validate(
            samples,
            names,
            group_names,
            n_folds=cv_folds,
            fit=fit,
            grouped_by=grouped_by,
            progress=progress,
        )
    elif cv_folds:
        logger.warning("cross-validation needs two or more slides (groups); skipped")
    t_cv = time.perf_counter()
    head = fit(samples)
    net = build_typed_network(base_state, found.architecture, names, head)
    t_done = time.perf_counter()
    # 4. The model folder.
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds = {
        "sampling": t_sampled - t0,
        "cross_validation": t_cv - t_sampled,
        "fitting": t_done - t_cv,
    }
    model_name = name or out_dir.resolve().name
    preset = {
        k: v for k, v in found.preset.items() if k not in ("weights", "architecture", "preset")
    }
    preset["summary"] = (
        f"{found.name} segmentation with a type head fitted to {sum(totals.values())} annotated "
        f"nuclei of {len(read)} slide(s): {', '.join(names)}"
    )
    matched = float(samples.matched.mean()) if samples.n_nuclei else 0.0
    record = {
        "base": {"name": found.name, "weights": str(found.weights), "sha256": base_sha},
        "classes": list(names),
        "class_map": dict(class_map or {}),
        "slides": slides_info,
        "head_config": asdict(cfg),
        "class_weights": [float(w) for w in head.class_weights],
        "final_loss": head.loss,
        "matched_fraction": matched,
        "max_nucleus_um2": max_nucleus_um2,
        "cv": None if cv is None else cv.to_json(),
        "seconds": seconds,
        "torch_threads": torch.get_num_threads(),
        "command": command,
    }
    for stale in out_dir.glob("*.safetensors"):
        if stale.name != WEIGHTS_NAME:
            stale.unlink()
    save_weights(
        net,
        out_dir / WEIGHTS_NAME,
        {
            "name": model_name,
            "presets": {"default": preset},
            "default": "default",
            "type_colors": {k: list(v) for k, v in colors.items() if k in names},
            "train_types": record,
        },
    )
    write_json_atomic(out_dir / "training.json", record)
    write_text_atomic(out_dir / "MODEL_CARD.md", _card(model_name, record, preset))
    shutil.rmtree(cache_dir, ignore_errors=True)
    return NucleiTypeTrainingSummary(
        model_dir=out_dir,
        type_names=names,
        nuclei=per_slide,
        matched_fraction=matched,
        cv=cv,
        seconds=seconds,
    )


def _card(name: str, record: Mapping[str, Any], preset: Mapping[str, Any]) -> str:
    """MODEL_CARD.md of a nucleus-type model fitted to annotated slides."""
    classes = record["classes"]
    totals = {c: sum(s["nuclei"][c] for s in record["slides"]) for c in classes}
    cv = record["cv"]
    lines = [
        f"# {name} — nucleus types fitted to annotated slides",
        "",
        f"Nucleus segmentation of `{record['base']['name']}` (sha256 "
        f"`{record['base']['sha256'][:12]}…`, unchanged) with its type head fitted to the "
        f"classified nuclei of {len(record['slides'])} slide(s).",
        "",
        "| | |",
        "|---|---|",
        f"| types | {', '.join(f'`{c}`' for c in classes)} |",
        f"| nuclei per type | {', '.join(f'{c} {n}' for c, n in totals.items())} |",
        f"| working resolution | {preset.get('mpp')} µm/px |",
        f"| matched to a predicted nucleus | {record['matched_fraction']:.1%} of annotated "
        "nuclei (the rest gave a small disc around the point) |",
        f"| class weights | {', '.join(f'{w:.2f}' for w in record['class_weights'])} |",
        "",
        "## Slides",
        "",
        "| slide | annotations | group | µm/px | nuclei | matched |",
        "|---|---|---|---|---|---|",
    ]
    for s in record["slides"]:
        per = ", ".join(f"{c} {n}" for c, n in s["nuclei"].items())
        lines.append(
            f"| {s['slide']} | {s['annotations']} | {s['group']} | {s['mpp']:.4g} | {per} | "
            f"{s['matched']} |"
        )
    lines += ["", "## Cross-validation", ""]
    if cv is None:
        lines.append("Not run (needs two or more slides or groups, and --cv-folds K).")
    else:
        lines += [
            f"{len(cv['folds'])} folds grouped by {cv['grouped_by']}; nucleus level: each "
            "held-out annotated nucleus is typed by the mean probability over its pixels. "
            "Detection is not part of it (run `slidestream evaluate nuclei --slides ... "
            "--annotations ... --model THIS_FOLDER` on other slides).",
            "",
            "| metric | mean ± sd over folds | pooled |",
            "|---|---|---|",
        ]
        for key, m in cv["summary"].items():
            pooled = cv["pooled"].get(key)
            cell = f"{pooled:.4f}" if isinstance(pooled, float) else ""
            lines.append(f"| {key.replace('_', ' ')} | {m['mean']:.4f} ± {m['sd']:.4f} | {cell} |")
    lines += [
        "",
        "## Reproduce",
        "",
        f"`{record['command']}`" if record["command"] else "(command not recorded)",
        "",
        "## Timing",
        "",
        ", ".join(f"{k} {v:.0f} s" for k, v in record["seconds"].items())
        + f" ({record['torch_threads']} torch threads).",
        "",
    ]
    return "\n".join(lines)
