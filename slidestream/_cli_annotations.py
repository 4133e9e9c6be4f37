"""CLI pieces for learning from the user's annotations.

``train tissue --slides ... --annotations ...`` and ``evaluate tissue --slides ...
--annotations ...`` are the existing tissue commands with these options added
(:func:`train_options`, :func:`evaluate_options`); their bodies hand over to
:func:`run_train` / :func:`run_evaluate` when ``--slides`` is given. ``train nuclei-types`` is
registered by :func:`register` (:mod:`slidestream.nuclei_type_training`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

__all__ = [
    "evaluate_options",
    "nuclei_evaluate_options",
    "parse_class_map",
    "register",
    "run_evaluate",
    "run_evaluate_nuclei",
    "run_train",
    "train_options",
]

logger = logging.getLogger(__name__)


def _slides_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--slides",
        "slide_inputs",
        multiple=True,
        type=click.Path(exists=True, path_type=Path),
        help="Annotated slide, folder of slides or manifest CSV; repeat for several.",
    )(command)


def _annotations_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--annotations",
        "annotation_inputs",
        multiple=True,
        help="QuPath GeoJSON / ImageScope or ASAP XML file or folder (paired with slides by "
        "name: slide.svs <-> slide.geojson), or SLIDE=FILE; repeat for several.",
    )(command)


_slide_mpp_option = click.option(
    "--slide-mpp",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Level-0 µm/px of slides that lack it.",
)

_groups_option = click.option(
    "--groups",
    "groups_csv",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="CSV slide,group (or slide,patient): slides of one patient share a CV fold.",
)


def train_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The annotated-slide options of ``train tissue``."""
    options: list[Callable[[Callable[..., Any]], Callable[..., Any]]] = [
        _groups_option,
        click.option(
            "--init",
            "init_model",
            default=None,
            help="Start from a tissue model (name or folder): its architecture, µm/px and "
            "texton dictionary are kept, the head is fitted on your classes.",
        ),
        click.option(
            "--min-inside",
            type=click.FloatRange(0, 1, min_open=True),
            default=0.75,
            show_default=True,
            help="Share of a patch that must lie inside its annotated region.",
        ),
        click.option(
            "--min-tissue",
            type=click.FloatRange(0, 1),
            default=0.5,
            show_default=True,
            help="Share of a patch that must be tissue (tissue mask; 0: any).",
        ),
        click.option(
            "--max-patches-per-class",
            type=click.IntRange(min=1),
            default=1000,
            show_default=True,
            help="Most patches per class and slide (drawn at random among candidates).",
        ),
        click.option(
            "--patch-stride",
            type=click.FloatRange(0.05, 4),
            default=0.5,
            show_default=True,
            help="Step of the candidate patch grid, in patch sides.",
        ),
        _slide_mpp_option,
        _annotations_option,
        _slides_option,
    ]
    for option in reversed(options):
        command = option(command)
    return command


def evaluate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The annotated-slide options of ``evaluate tissue``."""
    command = _slide_mpp_option(command)
    command = click.option(
        "--results",
        "results_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Output folder of `slidestream run`: score its <slide>/tissue.geojson instead of "
        "computing the map with --model.",
    )(command)
    return _slides_option(_annotations_option(command))


def nuclei_evaluate_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The annotated-slide options of ``evaluate nuclei``."""
    command = click.option(
        "--class-map",
        "nuclei_class_map",
        default=None,
        help="Annotation class -> model type, e.g. 'Lymphocyte=inflammatory,Tumor=epithelial'.",
    )(command)
    command = _slide_mpp_option(command)
    return _slides_option(_annotations_option(command))


def parse_class_map(text: str | None) -> dict[str, str]:
    """``RAW=CLASS,RAW=CLASS`` -> mapping (empty for None)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        raw, sep, name = part.partition("=")
        if not sep or not raw.strip():
            raise click.BadParameter(f"{part!r}: expected RAW=CLASS pairs")
        out[raw.strip()] = name.strip()
    return out


@contextlib.contextmanager
def _bar(show: bool, **kwargs: Any) -> Iterator[Any]:
    from tqdm.auto import tqdm

    bar = tqdm(disable=not show, **kwargs)
    try:
        yield bar
    finally:
        bar.close()


def _pairs(
    slide_inputs: tuple[Path, ...], annotation_inputs: tuple[str, ...]
) -> list[tuple[Path, Path]]:
    from slidestream.inputs import discover_slides
    from slidestream.tiling import pair_annotations

    if not annotation_inputs:
        raise click.UsageError("--slides needs --annotations FILE_OR_FOLDER (or SLIDE=FILE)")
    slides = discover_slides(slide_inputs)
    if not slides:
        raise click.UsageError("--slides: no slide files found")
    return pair_annotations(slides, annotation_inputs)


def _annotated_slides(
    slide_inputs: tuple[Path, ...], annotation_inputs: tuple[str, ...], groups_csv: Path | None
) -> list[Any]:
    """Slides paired with their annotation files, each in its CV group (slide or patient)."""
    from slidestream.annotation_training import AnnotatedSlide, read_groups

    groups = read_groups(groups_csv) if groups_csv else {}
    items = []
    for slide, ann in _pairs(slide_inputs, annotation_inputs):
        group = groups.get(slide.name) or groups.get(slide.stem)
        if groups and group is None:
            raise click.UsageError(f"{groups_csv}: no group for slide {slide.name}")
        items.append(AnnotatedSlide(slide=slide, annotations=ann, group=group or slide.name))
    return items


def run_train(
    *,
    slide_inputs: tuple[Path, ...],
    annotation_inputs: tuple[str, ...],
    groups_csv: Path | None,
    init_model: str | None,
    min_inside: float,
    min_tissue: float,
    max_patches_per_class: int,
    patch_stride: float,
    slide_mpp: float | None,
    class_map: dict[str, str],
    config: Any,
    cv_folds: int,
    out_dir: Path,
    name: str | None,
    display_name: str | None,
    progress: bool,
    seed: int,
    registry: Path | None,
) -> None:
    """``train tissue --slides ...``: sample, cross-validate by slide, train, write the folder."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from slidestream.annotation_training import (
        train_tissue_from_annotations,
    )
    from slidestream.tiling import PatchSamplingConfig

    items = _annotated_slides(slide_inputs, annotation_inputs, groups_csv)
    sampling = PatchSamplingConfig(
        patch_mpp=config.spacing_um_px,
        patch_size_px=config.patch_size_pixels,
        min_inside=min_inside,
        min_tissue=min_tissue,
        stride=patch_stride,
        max_per_class=max_patches_per_class,
        seed=seed,
    )
    with logging_redirect_tqdm():
        summary = train_tissue_from_annotations(
            items,
            out_dir,
            config=config,
            sampling=sampling,
            class_map=class_map,
            init=init_model,
            cv_folds=cv_folds,
            name=name,
            display_name=display_name,
            mpp_override=slide_mpp,
            progress=lambda **kw: _bar(progress, **kw),
            registry=registry,
        )
    for slide_name, counts in summary.patches.items():
        per_class = ", ".join(f"{c} {n}" for c, n in counts.items())
        click.echo(f"{slide_name}: {per_class} patches")
    if summary.cv is not None:
        for key in ("balanced_accuracy", "accuracy", "macro_f1"):
            m = summary.cv[key]
            click.echo(f"cv {key}: {m['mean']:.4f} ± {m['sd']:.4f} ({summary.cv['grouped_by']})")
    secs = ", ".join(f"{k} {v:.0f} s" for k, v in summary.seconds.items())
    click.echo(f"wrote {summary.model_dir} ({secs})")


def run_evaluate(
    *,
    slide_inputs: tuple[Path, ...],
    annotation_inputs: tuple[str, ...],
    results_dir: Path | None,
    slide_mpp: float | None,
    model_name: str,
    class_map: dict[str, str],
    device: str,
    as_json: bool,
    registry: Path | None,
) -> None:
    """``evaluate tissue --slides ...``: area-weighted figures of the map inside annotations."""
    from slidestream._device import resolve_device
    from slidestream.annotation_eval import evaluate_tissue_on_annotations
    from slidestream.config import RunConfig
    from slidestream.models.tissue import load_tissue_model, region_report

    pairs = _pairs(slide_inputs, annotation_inputs)
    config = RunConfig(out_dir=Path(), mpp_override=slide_mpp, show_progress=False)
    model = None
    if results_dir is None:
        model = load_tissue_model(model_name, resolve_device(device), registry=registry)
        class_names = tuple(model.class_names)
        name = model.name
    else:
        class_names = _results_classes(results_dir, pairs, model_name, registry)
        name = f"results {results_dir}"
    per_slide = evaluate_tissue_on_annotations(
        pairs,
        class_names=class_names,
        model=model,
        results_dir=results_dir,
        class_map=class_map,
        config=config,
    )
    total = region_report([e.confusion_um2 for e in per_slide], class_names)
    if as_json:
        out = {
            "model": name,
            **total.to_json(),
            "slides": {
                e.slide: region_report([e.confusion_um2], class_names).to_json() for e in per_slide
            },
        }
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(f"model {name}, {len(per_slide)} slide(s), only where annotated")
    for e in per_slide:
        r = region_report([e.confusion_um2], class_names)
        click.echo(
            f"  {e.slide}: balanced accuracy {r.balanced_accuracy:.4f}, coverage {r.coverage:.4f}"
        )
    click.echo(total.to_text())


def _results_classes(
    results_dir: Path, pairs: list[tuple[Path, Path]], model_name: str, registry: Path | None
) -> tuple[str, ...]:
    """The tissue classes of a run's results (summary.json provenance), else of --model."""
    from slidestream.models.tissue import load_tissue_model
    from slidestream.wsi import slide_name

    for slide, _ in pairs:
        summary = results_dir / slide_name(slide) / "summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text(encoding="utf-8"))
            classes = data.get("provenance", {}).get("models", {}).get("tissue", {}).get("classes")
            if classes:
                return tuple(str(c) for c in classes)
    return tuple(load_tissue_model(model_name, "cpu", registry=registry).class_names)


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """``train nuclei-types`` (the tissue commands carry their annotation options themselves)."""
    del cli, evaluate
    from slidestream._cli_options import device_option, out_option

    @train.command("nuclei-types")
    @_slides_option
    @_annotations_option
    @out_option("dir", help="Model folder to write (nuclei-types.safetensors, its .json, card).")
    @click.option(
        "--base",
        default="default",
        show_default=True,
        help="Nucleus model whose segmentation is kept and whose type head is fitted: a name "
        "(default, nuclei-unet-fast, nuclei-unet-accurate), a .safetensors file or a folder.",
    )
    @click.option(
        "--class-map",
        "class_map_text",
        default=None,
        help="Annotation class -> type name, e.g. 'Tumor=tumour,Lymphocyte=immune'; NAME=- "
        "drops a class. The model's types are the (mapped) class names.",
    )
    @_groups_option
    @click.option(
        "--cv-folds",
        type=click.IntRange(min=0),
        default=5,
        show_default=True,
        help="Cross-validation folds grouped by slide (or --groups); at most one per slide; "
        "0: none.",
    )
    @click.option(
        "--views",
        type=click.IntRange(1, 8),
        default=4,
        show_default=True,
        help="Flipped/transposed views of each tile sampled (augmentation).",
    )
    @click.option(
        "--steps",
        type=click.IntRange(min=1),
        default=1500,
        show_default=True,
        help="Optimiser steps of the type head.",
    )
    @click.option(
        "--balance",
        type=click.FloatRange(0, 1),
        default=0.5,
        show_default=True,
        help="Class weight exponent (a nucleus weighs n_class^-balance; 1: classes alike).",
    )
    @click.option(
        "--max-nucleus-area",
        "max_nucleus_um2",
        type=click.FloatRange(min=0, min_open=True),
        default=400.0,
        show_default=True,
        help="Classified polygons larger than this (µm²) are regions, not nuclei: left out.",
    )
    @_slide_mpp_option
    @click.option("--name", default=None, help="Model name (default: the folder's name).")
    @click.option("--seed", type=int, default=0, show_default=True)
    @device_option()
    @click.option("--progress/--no-progress", default=True, show_default=True)
    def train_nuclei_types_cmd(
        slide_inputs: tuple[Path, ...],
        annotation_inputs: tuple[str, ...],
        out: Path,
        base: str,
        class_map_text: str | None,
        groups_csv: Path | None,
        cv_folds: int,
        views: int,
        steps: int,
        balance: float,
        max_nucleus_um2: float,
        slide_mpp: float | None,
        name: str | None,
        seed: int,
        device: str,
        progress: bool,
    ) -> None:
        """Fit a nucleus model's type head to the classified nuclei of annotated slides.

        Nuclei are QuPath points, detections or cells, ImageScope/ASAP dots or nucleus
        outlines, with a class each; the model's types are their class names. The base
        model's segmentation is kept; its type head is cross-validated by slide and fitted.
        Use the folder with `slidestream run --nuclei-model OUT` and `slidestream evaluate
        nuclei --slides ... --annotations ... --model OUT`.
        """
        import shlex

        from tqdm.contrib.logging import logging_redirect_tqdm

        from slidestream._device import resolve_device
        from slidestream.models.nuclei._type_head import TypeHeadConfig
        from slidestream.nuclei_type_training import train_nucleus_types_from_annotations

        if not slide_inputs:
            raise click.UsageError("train nuclei-types needs --slides SLIDE_OR_FOLDER")
        items = _annotated_slides(slide_inputs, annotation_inputs, groups_csv)
        config = TypeHeadConfig(views=views, steps=steps, balance=balance, seed=seed)
        argv = ["slidestream", "train", "nuclei-types"]
        for path in slide_inputs:
            argv += ["--slides", str(path)]
        for text in annotation_inputs:
            argv += ["--annotations", text]
        argv += ["--out", str(out), "--base", base]
        if class_map_text:
            argv += ["--class-map", class_map_text]
        if groups_csv:
            argv += ["--groups", str(groups_csv)]
        if slide_mpp:
            argv += ["--slide-mpp", str(slide_mpp)]
        argv += ["--cv-folds", str(cv_folds), "--views", str(views), "--steps", str(steps)]
        argv += ["--balance", str(balance), "--max-nucleus-area", str(max_nucleus_um2)]
        argv += ["--seed", str(seed)]
        with logging_redirect_tqdm():
            summary = train_nucleus_types_from_annotations(
                items,
                out,
                base=base,
                class_map=parse_class_map(class_map_text),
                mpp_override=slide_mpp,
                config=config,
                cv_folds=cv_folds,
                grouped_by="group" if groups_csv else "slide",
                max_nucleus_um2=max_nucleus_um2,
                name=name,
                device=resolve_device(device),
                progress=lambda **kw: _bar(progress, **kw),
                command=shlex.join(argv),
            )
        for slide_name, counts in summary.nuclei.items():
            per = ", ".join(f"{c} {n}" for c, n in counts.items())
            click.echo(f"{slide_name}: {per} nuclei")
        click.echo(f"matched to predicted nuclei: {summary.matched_fraction:.1%}")
        if summary.cv is not None:
            for key in ("balanced_accuracy", "accuracy", "macro_f1"):
                m = summary.cv.summary[key]
                click.echo(
                    f"cv {key}: {m['mean']:.4f} ± {m['sd']:.4f} "
                    f"({len(summary.cv.folds)} folds by {summary.cv.grouped_by})"
                )
        secs = ", ".join(f"{k} {v:.0f} s" for k, v in summary.seconds.items())
        click.echo(f"wrote {summary.model_dir} ({', '.join(summary.type_names)}; {secs})")


#: Level-0 tile side and halo of ``evaluate nuclei --slides`` (px).
_NUCLEI_TILE_PX = 1024
_NUCLEI_HALO_PX = 48


def run_evaluate_nuclei(
    *,
    slide_inputs: tuple[Path, ...],
    annotation_inputs: tuple[str, ...],
    slide_mpp: float | None,
    seg: Any,
    class_map: dict[str, str],
    pair_radius_um: float,
    as_json: bool,
) -> None:
    """``evaluate nuclei --slides ...``: detection and per-type F1 against annotated nuclei.

    Annotated nuclei are points (QuPath points / detections / cells, ImageScope or ASAP dots)
    or outlines (their centroid), classified with the model's type names (``--class-map`` maps
    other names). The model segments every 1024 px level-0 tile holding an annotated nucleus
    (48 px halo; a prediction counts in the tile its centroid lies in), so annotate every
    nucleus in the areas you annotate: an unannotated nucleus there counts as a false positive.
    """
    import numpy as np

    from slidestream.errors import AnnotationError
    from slidestream.models.nuclei._type_metrics import (
        TypedCounts,
        TypedPoints,
        instance_points,
    )
    from slidestream.tiling import read_annotations
    from slidestream.wsi import open_slide

    type_names: tuple[str, ...] = tuple(getattr(seg, "type_names", ()))
    if not type_names:
        raise click.UsageError(f"model {seg.name} has no type head; use a typing model")
    counts = TypedCounts(names=type_names)
    per_slide: dict[str, Any] = {}
    skipped = 0
    for slide_path, ann_path in _pairs(slide_inputs, annotation_inputs):
        with open_slide(slide_path, mpp=slide_mpp) as slide:
            ann = read_annotations(ann_path, dimensions=slide.dimensions, class_map=class_map)
            xy, names = ann.points(include_unclassified=False)
            skipped += ann.unclassified
            unknown = sorted({str(n) for n in names if n not in type_names})
            if unknown:
                raise AnnotationError(
                    f"{ann_path}: nucleus classes {unknown} are not types of model {seg.name} "
                    f"{list(type_names)}; map them with --class-map NAME=TYPE"
                )
            t_idx = np.array([type_names.index(str(n)) for n in names], dtype=np.int64)
            one = TypedCounts(names=type_names)
            tiles = np.unique(np.floor(xy / _NUCLEI_TILE_PX).astype(np.int64), axis=0)
            for tx, ty in tiles.tolist():
                x0, y0 = tx * _NUCLEI_TILE_PX, ty * _NUCLEI_TILE_PX
                h = _NUCLEI_HALO_PX
                rgb = slide.read_region(
                    (x0 - h, y0 - h), (_NUCLEI_TILE_PX + 2 * h, _NUCLEI_TILE_PX + 2 * h)
                )
                labels, types = seg.segment_typed(rgb, float(slide.mpp))
                pred = (
                    instance_points(labels, types)
                    if types is not None
                    else TypedPoints(xy=np.zeros((0, 2)), types=np.zeros(0, np.int64))
                )
                core = (
                    (pred.xy[:, 0] >= h)
                    & (pred.xy[:, 0] < h + _NUCLEI_TILE_PX)
                    & (pred.xy[:, 1] >= h)
                    & (pred.xy[:, 1] < h + _NUCLEI_TILE_PX)
                )
                pred_pts = TypedPoints(xy=pred.xy[core] + (x0 - h, y0 - h), types=pred.types[core])
                inside = np.floor(xy / _NUCLEI_TILE_PX).astype(np.int64)
                sel = (inside[:, 0] == tx) & (inside[:, 1] == ty)
                true_pts = TypedPoints(xy=xy[sel], types=t_idx[sel])
                radius = pair_radius_um / float(slide.mpp)
                one.add(true_pts, pred_pts, radius)
                counts.add(true_pts, pred_pts, radius)
            per_slide[slide_path.name] = {"n_true": len(xy), "tiles": len(tiles), **one.scores()}
    scores = counts.scores()
    if as_json:
        click.echo(
            json.dumps(
                {"model": seg.name, "types": scores, "slides": per_slide, "unclassified": skipped},
                indent=2,
            )
        )
        return
    for name, sc in per_slide.items():
        click.echo(
            f"{name}: {sc['n_true']} annotated nuclei in {sc['tiles']} tiles, detection F1 "
            f"{sc['det_f1']:.3f}, type accuracy {sc['type_accuracy']:.3f}"
        )
    click.echo(
        f"all slides ({seg.name}, pairing within {pair_radius_um} µm): "
        + ", ".join(f"{k} {v:.3f}" for k, v in scores.items())
    )
