"""Tissue-classification commands: ``classify``, ``train tissue``, ``evaluate tissue``, ``models``.

torch and the model code are imported inside the command bodies so ``--help`` stays fast.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from slidestream import _cli_annotations
from slidestream._cli_options import device_option, mpp_option

__all__ = ["register"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def _default_registry() -> Path:
    return Path(click.get_app_dir("slidestream")) / "tissue_models.json"


_registry_option = click.option(
    "--registry",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    hidden=True,
    help="User model registry JSON (default: the slidestream app config dir).",
)

_tta_option = click.option(
    "--tta/--no-tta",
    default=None,
    help="Average every patch over its 8 flips/rotations (8x the cost). "
    "Default: the model's own setting (on for lung-lc25000 and tumour-pan).",
)


def _parse_class_map(text: str | None) -> dict[str, str]:
    """``lung`` (LC25000 folder names), a JSON file, or ``raw=name,raw=name``."""
    if not text:
        return {}
    if text == "lung":
        from slidestream.models.tissue import LUNG_CLASS_MAP

        return dict(LUNG_CLASS_MAP)
    if text.endswith(".json") and Path(text).is_file():
        data = json.loads(Path(text).read_text(encoding="utf-8"))
        return {str(k): str(v) for k, v in data.items()}
    out: dict[str, str] = {}
    for part in text.split(","):
        raw, sep, name = part.partition("=")
        if not sep or not raw.strip() or not name.strip():
            raise click.BadParameter(f"{part!r}: expected RAW=CLASS pairs, 'lung' or a JSON file")
        out[raw.strip()] = name.strip()
    return out


def _collect_inputs(inputs: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for p in inputs:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix.lower() in _IMAGE_SUFFIXES)
        else:
            files.append(p)
    return files


def _model_folder_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--out`` (the model folder to write), ``--name`` and ``--display-name`` of a command that
    writes a tissue model (``train tissue``, ``models ensemble``)."""
    command = click.option("--display-name", default=None)(command)
    command = click.option("--name", default=None, help="Model name stored in config.json.")(
        command
    )
    return click.option(
        "--out",
        "out_dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Model folder to write.",
    )(command)


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach the tissue commands to the CLI groups."""

    @cli.command("classify")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @click.option(
        "--model",
        "model_name",
        default="default",
        show_default=True,
        help="Model name (see `slidestream models list`) or model folder.",
    )
    @click.option(
        "--out",
        "out_csv",
        required=True,
        type=click.Path(dir_okay=False, writable=True, path_type=Path),
        help="Output CSV: path,label,prob_<class>...",
    )
    @mpp_option(help="The input images' own µm/px (default: the model's training data's).")
    @device_option()
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @_tta_option
    @_registry_option
    def classify(
        inputs: tuple[Path, ...],
        model_name: str,
        out_csv: Path,
        mpp: float | None,
        device: str,
        progress: bool,
        tta: bool | None,
        registry: Path | None,
    ) -> None:
        """Classify image files (or all images in folders) with a tissue model.

        An image no larger than about one patch is classified whole; a larger one is tiled at
        the model's µm/px and its patch probabilities averaged.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from slidestream._atomic import write_text_atomic as atomic_write_text
        from slidestream._device import resolve_device
        from slidestream.models.tissue import classify_image, load_tissue_model
        from slidestream.models.tissue._data import read_rgb

        dev = resolve_device(device)
        model = load_tissue_model(model_name, dev, registry=registry or _default_registry())
        files = _collect_inputs(inputs)
        if not files:
            raise click.UsageError("no image files found in INPUT")
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["path", "label", *(f"prob_{c}" for c in model.class_names)])
        with logging_redirect_tqdm():
            for f in tqdm(files, desc="classify", unit="img", disable=not progress):
                probs = classify_image(read_rgb(f), mpp, model, tta=tta)
                label = model.class_names[int(probs.argmax())]
                writer.writerow([str(f), label, *(f"{p:.6f}" for p in probs)])
        atomic_write_text(out_csv, buf.getvalue())
        click.echo(f"wrote {len(files)} predictions to {out_csv}")

    @train.command("tissue")
    @click.option(
        "--data",
        "data_dirs",
        multiple=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Training folder (class sub-folders or labels.csv); repeat for several. Or train "
        "on annotated slides with --slides/--annotations.",
    )
    @_cli_annotations.train_options
    @_model_folder_options
    @mpp_option(multiple=True, help="The images' own µm/px, one per --data (or one for all).")
    @click.option(
        "--class-map",
        "class_maps",
        multiple=True,
        help="Per --data: 'lung' (LC25000 names), RAW=CLASS,... or a JSON file.",
    )
    @click.option("--epochs", type=click.IntRange(min=1), default=25, show_default=True)
    @click.option("--seed", type=int, default=0, show_default=True)
    @device_option()
    @click.option(
        "--val-fraction",
        type=click.FloatRange(0, 1, max_open=True),
        default=0.2,
        show_default=True,
        help="Groups held out for epoch selection (0: none).",
    )
    @click.option(
        "--views-per-image",
        type=click.IntRange(min=1),
        default=16,
        show_default=True,
        help="Augmented crops per image in the feature bank.",
    )
    @click.option(
        "--cnn",
        "cnn_channels",
        default="",
        show_default=True,
        help="Learned CNN branch widths, e.g. 16,32,64,64 (empty: fixed features); trained end "
        "to end with augmentation on the training device (best with --device cuda).",
    )
    @click.option(
        "--textons",
        type=click.IntRange(min=0),
        default=32,
        show_default=True,
        help="Texton dictionary size (0: none).",
    )
    @click.option(
        "--morphology/--no-morphology",
        default=False,
        show_default=True,
        help="Add granulometry and joint H-E histogram features.",
    )
    @click.option(
        "--lbp/--no-lbp",
        default=False,
        show_default=True,
        help="Add local-binary-pattern histograms of H and E (radii 1-3 px).",
    )
    @click.option(
        "--hidden",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Hidden units of the head (0: linear).",
    )
    @click.option(
        "--fixed-features/--no-fixed-features",
        default=True,
        show_default=True,
        help="Use the fixed colour/texture front end; --no-fixed-features trains the --cnn "
        "branch alone (--textons is then ignored).",
    )
    @click.option("--batch-size", type=click.IntRange(min=2), default=32, show_default=True)
    @click.option("--samples-per-epoch", type=click.IntRange(min=2), default=768, show_default=True)
    @click.option(
        "--lr",
        type=click.FloatRange(min=0, min_open=True),
        default=3e-3,
        show_default=True,
        help="AdamW learning rate (the one-cycle peak with --cnn).",
    )
    @click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-3, show_default=True)
    @click.option("--patch-size-px", type=click.IntRange(min=32), default=112, show_default=True)
    @click.option(
        "--model-mpp",
        type=click.FloatRange(min=0, min_open=True),
        default=1.5,
        show_default=True,
        help="Working µm/px of the model.",
    )
    @click.option(
        "--cv-folds",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Run group-aware k-fold CV first and write cv.json (0: skip).",
    )
    @click.option("--progress/--no-progress", default=True, show_default=True)
    @click.option(
        "--stain-norm/--no-stain-norm",
        default=False,
        show_default=True,
        help="Bring each image's (whole-slide analysis: each slide's) haematoxylin and eosin "
        "intensity to a reference fitted on the training images, one gain per image "
        "(robustness to staining differences between patients and labs; stored in "
        "config.json).",
    )
    @click.option(
        "--tta/--no-tta",
        default=False,
        show_default=True,
        help="The model classifies images over 8 flips/rotations per patch (stored in "
        "config.json; validation and --cv-folds classify the same way).",
    )
    def train_tissue_cmd(
        data_dirs: tuple[Path, ...],
        out_dir: Path,
        mpps: tuple[float, ...],
        class_maps: tuple[str, ...],
        epochs: int,
        seed: int,
        device: str,
        val_fraction: float,
        views_per_image: int,
        cnn_channels: str,
        textons: int,
        morphology: bool,
        lbp: bool,
        hidden: int,
        fixed_features: bool,
        batch_size: int,
        samples_per_epoch: int,
        lr: float,
        weight_decay: float,
        patch_size_px: int,
        model_mpp: float,
        cv_folds: int,
        name: str | None,
        display_name: str | None,
        progress: bool,
        stain_norm: bool,
        tta: bool,
        **annotated: Any,
    ) -> None:
        """Train a tissue patch classifier on labelled images or on annotated slides.

        With --slides and --annotations (QuPath GeoJSON, ImageScope or ASAP XML), patches at
        the model's µm/px are sampled inside the annotated regions, cross-validated by slide
        (--cv-folds) and the model folder gets the annotation class names and colours.
        """
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        from slidestream._atomic import write_text_atomic as atomic_write_text
        from slidestream.models.tissue import (
            DataSource,
            TrainConfig,
            cross_validate_tissue,
            train_tissue,
        )

        if bool(data_dirs) == bool(annotated["slide_inputs"]):
            raise click.UsageError("give --data FOLDER or --slides SLIDE --annotations FILE")
        if len(mpps) not in (0, 1, len(data_dirs)):
            raise click.UsageError("give one --mpp, or one per --data")
        if len(class_maps) not in (0, 1, len(data_dirs)):
            raise click.UsageError("give one --class-map, or one per --data")
        sources = []
        for i, d in enumerate(data_dirs):
            m = mpps[i if len(mpps) > 1 else 0] if mpps else None
            cm = class_maps[i if len(class_maps) > 1 else 0] if class_maps else None
            sources.append(DataSource(data_dir=d, mpp=m, class_map=_parse_class_map(cm)))
        widths = tuple(int(w) for w in cnn_channels.split(",") if w.strip())
        cfg = TrainConfig(
            epochs=epochs,
            seed=seed,
            device=device,
            val_fraction=val_fraction,
            views_per_image=views_per_image,
            cnn_channels=widths,
            textons=textons if fixed_features else 0,
            morphology=morphology,
            lbp=lbp,
            hidden=hidden,
            fixed_features=fixed_features,
            batch_size=batch_size,
            samples_per_epoch=samples_per_epoch,
            lr=lr,
            weight_decay=weight_decay,
            patch_size_pixels=patch_size_px,
            spacing_um_px=model_mpp,
            tta=tta,
            stain_norm=stain_norm,
        )
        if annotated["slide_inputs"]:
            _cli_annotations.run_train(
                **annotated,
                class_map=_parse_class_map(class_maps[0] if class_maps else None),
                config=cfg,
                cv_folds=cv_folds,
                out_dir=out_dir,
                name=name,
                display_name=display_name,
                progress=progress,
                seed=seed,
                registry=_default_registry(),
            )
            return
        with logging_redirect_tqdm():
            if cv_folds:
                with tqdm(total=cv_folds, desc="cv", unit="fold", disable=not progress) as bar:

                    def on_fold(k: int, report: Any) -> None:
                        bar.update(1)
                        bar.set_postfix_str(report.summary_line())

                    cv = cross_validate_tissue(
                        sources, n_folds=cv_folds, config=cfg, on_fold=on_fold
                    )
                summary = cv.summary()
                summary["folds"] = [f.to_json() for f in cv.folds]
                summary["pooled"] = cv.pooled.to_json()
                summary["seconds"] = cv.seconds
                atomic_write_text(out_dir / "cv.json", json.dumps(summary, indent=2) + "\n")
                for key in ("accuracy", "balanced_accuracy", "macro_f1"):
                    click.echo(f"cv {key}: {summary[key]['mean']:.4f} ± {summary[key]['sd']:.4f}")
            with tqdm(total=epochs, desc="train", unit="epoch", disable=not progress) as bar:

                def on_epoch(epoch: int, total: int, stats: Any) -> None:
                    bar.update(1)
                    bar.set_postfix({k: round(v, 4) for k, v in stats.items()})

                result = train_tissue(
                    sources,
                    out_dir,
                    config=cfg,
                    name=name,
                    display_name=display_name,
                    on_epoch=on_epoch,
                )
        if result.val_report is not None:
            click.echo(
                f"validation (epoch {result.best_epoch}): {result.val_report.summary_line()}"
            )
        click.echo(f"wrote {result.model_dir} in {result.seconds:.0f} s")

    @evaluate.command("tissue")
    @click.option(
        "--data",
        "data_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        help="Folder of labelled images; or score a tissue map with --slides/--annotations.",
    )
    @_cli_annotations.evaluate_options
    @click.option("--model", "model_name", default="default", show_default=True)
    @mpp_option(help="The images' own µm/px (default: the model's training data's).")
    @click.option("--class-map", default=None, help="'lung', RAW=CLASS,... or a JSON file.")
    @device_option()
    @click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
    @_tta_option
    @_registry_option
    def evaluate_tissue_cmd(
        data_dir: Path | None,
        model_name: str,
        mpp: float | None,
        class_map: str | None,
        device: str,
        as_json: bool,
        tta: bool | None,
        registry: Path | None,
        **annotated: Any,
    ) -> None:
        """Score a tissue model on labelled images (accuracy, balanced accuracy, macro F1,
        per-class precision/recall, confusion matrix), or its whole-slide tissue map against
        annotated regions (--slides/--annotations: area-weighted per-class accuracy, balanced
        accuracy, Dice and confusion in mm², only where annotated)."""
        if (data_dir is None) == (not annotated["slide_inputs"]):
            raise click.UsageError("give --data FOLDER or --slides SLIDE --annotations FILE")
        if annotated["slide_inputs"]:
            _cli_annotations.run_evaluate(
                **annotated,
                model_name=model_name,
                class_map=_parse_class_map(class_map),
                device=device,
                as_json=as_json,
                registry=registry or _default_registry(),
            )
            return

        from slidestream._device import resolve_device
        from slidestream.models.tissue import evaluate_tissue, load_tissue_model

        dev = resolve_device(device)
        model = load_tissue_model(model_name, dev, registry=registry or _default_registry())
        if data_dir is None:  # checked above; narrows the type
            raise click.UsageError("give --data FOLDER")
        report = evaluate_tissue(
            data_dir, model, mpp=mpp, class_map=_parse_class_map(class_map), tta=tta
        )
        if as_json:
            click.echo(json.dumps({"model": model.name, **report.to_json()}, indent=2))
        else:
            click.echo(f"model {model.name}\n{report.to_text()}")

    @cli.group("models")
    def models() -> None:
        """List and register tissue (and nucleus) models."""

    @models.command("list")
    @click.option(
        "--models-dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Also list the model folders inside this folder.",
    )
    @click.option("--json", "as_json", is_flag=True)
    @_registry_option
    def models_list(models_dir: Path | None, as_json: bool, registry: Path | None) -> None:
        """Shipped and user-registered models: classes, µm/px and card summary."""
        from slidestream.models.tissue import list_tissue_models

        infos = list_tissue_models(registry=registry or _default_registry(), models_dir=models_dir)
        rows: list[dict[str, Any]] = [
            {
                "kind": "tissue",
                "name": i.name + (" (default)" if i.is_default else ""),
                "origin": i.origin,
                "classes": list(i.class_names),
                "mpp": i.mpp,
                "patch_px": i.patch_size_pixels,
                "path": str(i.path),
                "summary": i.summary,
            }
            for i in infos
        ]
        rows += _nuclei_rows()
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        for r in rows:
            classes = ", ".join(r["classes"]) if r.get("classes") else "-"
            click.echo(
                f"{r['kind']:<7} {r['name']:<22} {r['origin']:<8} mpp={r['mpp']}  "
                f"classes: {classes}"
            )
            if r.get("summary"):
                click.echo(f"        {r['summary']}")

    @models.command("ensemble")
    @click.argument(
        "model_dirs",
        nargs=-1,
        required=True,
        type=click.Path(exists=True, file_okay=False, path_type=Path),
    )
    @click.option(
        "--weights",
        "weights_text",
        required=True,
        help="Comma-separated weight per model folder, e.g. 0.65,0.35 (normalised to sum 1).",
    )
    @_model_folder_options
    def ensemble_cmd(
        model_dirs: tuple[Path, ...],
        weights_text: str,
        out_dir: Path,
        name: str | None,
        display_name: str | None,
    ) -> None:
        """Combine trained model folders into one that averages their probabilities."""
        from slidestream.models.tissue import combine_models

        try:
            weights = [float(w) for w in weights_text.split(",") if w.strip()]
        except ValueError as exc:
            raise click.BadParameter(f"{weights_text!r}: expected numbers like 0.6,0.4") from exc
        if len(weights) != len(model_dirs):
            raise click.BadParameter(
                f"{len(weights)} weights for {len(model_dirs)} model folders; give one each"
            )
        spec = combine_models(model_dirs, weights, out_dir, name=name, display_name=display_name)
        click.echo(
            f"wrote {out_dir}: {len(model_dirs)} members, {spec.patch_size_pixels} px at "
            f"{spec.spacing_um_px} µm/px"
        )

    @models.command("register")
    @click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
    @click.option("--name", required=True, help="Name to load the model by.")
    @_registry_option
    def models_register(model_dir: Path, name: str, registry: Path | None) -> None:
        """Register a user model folder (config.json + weights or TorchScript) under NAME."""
        from slidestream.models.tissue import register_tissue_model

        path = register_tissue_model(model_dir, name, registry or _default_registry())
        click.echo(f"registered {name} -> {model_dir.resolve()} in {path}")


def _nuclei_rows() -> list[dict[str, Any]]:
    """Nucleus models from ``slidestream.models.nuclei.list_nuclei_models()`` if it exists."""
    try:
        from slidestream.models import nuclei
    except ImportError:
        return []
    fn = getattr(nuclei, "list_nuclei_models", None)
    if fn is None:
        return []
    rows: list[dict[str, Any]] = []
    try:
        for m in fn():
            rows.append(
                {
                    "kind": "nuclei",
                    "name": str(_field(m, "name")),
                    "origin": "shipped",
                    "classes": [],
                    "mpp": _field(m, "mpp"),
                    "summary": str(_field(m, "summary") or ""),
                }
            )
    except Exception:  # another team's code: never let it break the listing
        logger.exception("listing nucleus models failed")
    return rows


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
