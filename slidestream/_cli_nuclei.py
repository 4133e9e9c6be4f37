"""CLI: ``slidestream train nuclei``, ``slidestream evaluate nuclei``, ``slidestream segment``.

Heavy libraries (torch, MONAI, the model code) are imported inside the command bodies.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

from slidestream import _cli_annotations
from slidestream._cli_options import device_option, mpp_option, out_option

__all__ = ["register"]

logger = logging.getLogger(__name__)

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff"})

#: Nucleus model of the per-image commands (``segment``, ``evaluate nuclei``). Images and ROIs
#: are small, so these favour accuracy (8-view TTA, watershed at up to 2x: about 7x the cost of
#: the fast preset); ``slidestream run`` keeps the fast preset (``default``) for whole slides.
IMAGE_DEFAULT_MODEL = "nuclei-unet-accurate"

_image_model_option = click.option(
    "--model",
    default=IMAGE_DEFAULT_MODEL,
    show_default=True,
    help="Registry name (nuclei-unet-accurate, nuclei-unet-fast = default, classical) or "
    ".safetensors path. Per-image tools use the accurate preset unless told otherwise.",
)


def _collect_inputs(inputs: tuple[Path, ...]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES))
        else:
            files.append(item)
    if not files:
        raise click.UsageError(f"no PNG/JPEG/TIFF images found in {[str(i) for i in inputs]}")
    return files


def _read_rgb(path: Path) -> Any:
    from slidestream.commands import read_rgb

    return read_rgb(path)


def _train_progress() -> Any:
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(step: int, total: int, info: dict[str, float]) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc="train nuclei", unit="step")
        b = bar["bar"]
        b.update(step - b.n)
        b.set_postfix({k: f"{v:.3f}" for k, v in info.items()}, refresh=False)

    return update


def register(cli: click.Group, *, train: click.Group, evaluate: click.Group) -> None:
    """Attach ``train nuclei``, ``evaluate nuclei`` and ``segment`` to the CLI groups."""

    @train.command("nuclei")
    @click.option(
        "--data",
        "data",
        multiple=True,
        required=True,
        help="Dataset folder (images/, masks/); DIR:MPP gives its µm/px, else "
        "DIR/mpp.json or the known shared datasets' table.",
    )
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        help="Output weights (.safetensors; a .json sidecar is written beside it).",
    )
    @click.option(
        "--epochs",
        type=click.IntRange(min=1),
        default=None,
        help="Passes over the training pixels [default: 300, or no cap when --minutes is given].",
    )
    @click.option(
        "--minutes",
        type=click.FloatRange(min=0.1),
        default=None,
        help="Wall-clock budget of the optimisation (stops early).",
    )
    @click.option("--seed", type=int, default=0, show_default=True)
    @click.option(
        "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
    )
    @click.option(
        "--working-mpp",
        type=click.FloatRange(min=0.05),
        default=0.5,
        show_default=True,
        help="µm/px the model works at (every dataset is resampled to it). Not an input's "
        "µm/px: those come with --data DIR:MPP.",
    )
    @click.option(
        "--steps",
        type=click.IntRange(min=1),
        default=None,
        help="Total optimiser steps (the LR schedule's length); overrides --epochs.",
    )
    @click.option(
        "--types/--no-types",
        default=False,
        show_default=True,
        help="Add the nucleus-type head (other, inflammatory, epithelial, spindle); typed data "
        "(CoNSeP types/, CRCHisto points.csv) trains it.",
    )
    @click.option(
        "--split",
        type=click.Choice(["v1", "v2"]),
        default="v1",
        show_default=True,
        help="Default validation/test images: v1 = the 9 validation images of the first "
        "presets, no test images; v2 = nuclei-v2's protocol (those 9 images, 4 CoNSeP tiles "
        "and 10 CRCHisto images are test images, never trained on nor used for a choice).",
    )
    @click.option(
        "--checkpoint",
        type=click.Choice(["last", "best"]),
        default="best",
        show_default=True,
        help="Keep the last step's weights (validation then only picks thresholds) or the best "
        "validation AJI's.",
    )
    @click.option(
        "--resume",
        is_flag=True,
        help="Continue an interrupted run from OUT's .resume.pt checkpoint (same options).",
    )
    @click.option("--crop-px", type=click.IntRange(min=32), default=160, show_default=True)
    @click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
    @click.option("--val-every-steps", type=click.IntRange(min=1), default=150, show_default=True)
    @click.option(
        "--threads",
        type=click.IntRange(min=1),
        default=2,
        show_default=True,
        help="CPU threads (torch.set_num_threads); 1 is faster on an oversubscribed machine.",
    )
    @click.option(
        "--init",
        "init",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Start from these .safetensors (same architecture, or the same without the type "
        "head, which then starts untrained).",
    )
    @click.option(
        "--lr", type=click.FloatRange(min=0, min_open=True), default=3e-3, show_default=True
    )
    @click.option(
        "--workers",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Processes drawing augmented batches (use ~CPU cores - 1 with a GPU).",
    )
    @click.option(
        "--features",
        default="16,16,32,64,128,16",
        show_default=True,
        help="Six BasicUNet channel widths (four encoder levels, bottleneck, last decoder).",
    )
    @click.option(
        "--colour-strength",
        type=click.FloatRange(min=0),
        default=1.0,
        show_default=True,
        help="Strength of the HED stain / brightness jitter.",
    )
    def train_nuclei_cmd(
        data: tuple[str, ...],
        out: Path,
        epochs: int | None,
        minutes: float | None,
        seed: int,
        device: str,
        working_mpp: float,
        steps: int | None,
        types: bool,
        split: str,
        checkpoint: str,
        resume: bool,
        crop_px: int,
        batch_size: int,
        val_every_steps: int,
        threads: int,
        init: Path | None,
        lr: float,
        workers: int,
        features: str,
        colour_strength: float,
    ) -> None:
        """Train the nucleus U-Net (from scratch or --init weights) on common-format folders.

        Checkpoints its whole state every --val-every-steps; rerun with --resume after an
        interruption.
        """
        from slidestream.models.nuclei import TrainConfig, train_nuclei
        from slidestream.models.nuclei._network import NetworkConfig
        from slidestream.models.nuclei._train import (
            DEFAULT_TEST_KEYS,
            DEFAULT_V2_VAL_KEYS,
            DEFAULT_VAL_KEYS,
        )

        try:
            widths = [int(f) for f in features.split(",")]
        except ValueError as exc:
            raise click.BadParameter(f"{features!r}: expected six integers") from exc
        if len(widths) != 6:
            raise click.BadParameter(f"{features!r}: expected six comma-separated widths")
        config = TrainConfig(
            network=NetworkConfig(
                features=(*widths,),  # type: ignore[arg-type]
                n_types=4 if types else 0,
            ),
            workers=workers,
            colour_strength=colour_strength,
            mpp=working_mpp,
            steps=steps,
            val_keys=DEFAULT_V2_VAL_KEYS if split == "v2" else DEFAULT_VAL_KEYS,
            test_keys=DEFAULT_TEST_KEYS if split == "v2" else (),
            checkpoint=checkpoint,  # type: ignore[arg-type]
            resume=resume,
            # With a time budget the budget alone decides (a GPU run once stopped at the
            # 300-epoch cap after half its minutes).
            epochs=epochs if epochs is not None else (10**6 if minutes is not None else 300),
            minutes=minutes,
            seed=seed,
            device=device,  # type: ignore[arg-type]
            crop_px=crop_px,
            batch_size=batch_size,
            val_every_steps=val_every_steps,
            num_threads=threads,
            init_weights=init,
            lr=lr,
        )
        result = train_nuclei(list(data), out, config=config, progress=_train_progress())
        click.echo(
            f"wrote {result.weights} ({result.steps} steps, {result.wall_s / 60:.1f} min); "
            f"validation {json.dumps(result.val)}"
        )

    @evaluate.command("nuclei")
    @click.option(
        "--images",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Folder of images; or score annotated slides with --slides/--annotations.",
    )
    @_cli_annotations.nuclei_evaluate_options
    @click.option(
        "--masks",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="uint16 instance PNGs named like the images (AJI, PQ, Dice).",
    )
    @click.option(
        "--types",
        "types_csv",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="Typed ground truth per nucleus: types.csv (image,instance,type_name,centroid_x,"
        "centroid_y; CoNSeP's layout) or points.csv (image,x,y,type; CRCHisto's). Adds detection "
        "F1 and per-type F1 (HoVer-Net's definitions).",
    )
    @mpp_option(help="The images' own µm/px (with --images).")
    @click.option(
        "--pair-radius-um",
        type=click.FloatRange(min=0, min_open=True),
        default=3.0,
        show_default=True,
        help="Centroid pairing radius for detection/type F1 (HoVer-Net: 12 px at 0.25 µm/px).",
    )
    @click.option(
        "--pair-radius-px",
        type=click.FloatRange(min=0, min_open=True),
        default=None,
        help="The pairing radius in image px instead (e.g. 6 for CRCHisto at 20x).",
    )
    @_image_model_option
    @device_option()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def evaluate_nuclei_cmd(
        images: Path | None,
        masks: Path | None,
        types_csv: Path | None,
        mpp: float | None,
        pair_radius_um: float,
        pair_radius_px: float | None,
        model: str,
        device: str,
        as_json: bool,
        **annotated: Any,
    ) -> None:
        """Score a nucleus model: AJI, PQ (DQ, SQ), object F1 at IoU 0.5 and Dice against
        --masks; detection and per-type F1 against --types, or against the classified nuclei
        (points or outlines) of annotated slides (--slides/--annotations)."""
        import numpy as np
        from PIL import Image

        from slidestream._device import resolve_device
        from slidestream.models.nuclei import load_nuclei_model, score_instances
        from slidestream.models.nuclei._type_metrics import (
            TypedCounts,
            TypedPoints,
            instance_points,
            read_typed_truth,
        )

        if annotated["slide_inputs"]:
            _cli_annotations.run_evaluate_nuclei(
                slide_inputs=annotated["slide_inputs"],
                annotation_inputs=annotated["annotation_inputs"],
                slide_mpp=annotated["slide_mpp"],
                seg=load_nuclei_model(model, resolve_device(device)),
                class_map=_cli_annotations.parse_class_map(annotated["nuclei_class_map"]),
                pair_radius_um=pair_radius_um,
                as_json=as_json,
            )
            return
        if images is None or mpp is None:
            raise click.UsageError(
                "give --images DIR --mpp MPP, or --slides SLIDE --annotations FILE"
            )

        if masks is None and types_csv is None:
            raise click.UsageError("give --masks, --types or both")
        seg = load_nuclei_model(model, resolve_device(device))
        type_names: tuple[str, ...] = tuple(getattr(seg, "type_names", ()))
        truth = read_typed_truth(types_csv) if types_csv is not None else None
        if truth is not None and not type_names:
            raise click.UsageError(
                f"--types: model {seg.name} has no type head; use a typing model "
                "(--model nuclei-unet-fast, or a .safetensors trained with --types)"
            )
        radius = pair_radius_px if pair_radius_px is not None else pair_radius_um / mpp
        counts = TypedCounts(names=type_names) if truth is not None else None
        rows: list[dict[str, Any]] = []
        for img_path in _collect_inputs((images,)):
            true = None
            if masks is not None:
                mask_path = masks / (img_path.stem + ".png")
                if not mask_path.is_file():
                    logger.warning("%s: no mask %s; skipped", img_path, mask_path)
                    continue
                with Image.open(mask_path) as im:
                    true = np.asarray(im, dtype=np.int32)
            if truth is not None and img_path.stem not in truth and true is None:
                logger.warning("%s: no typed nuclei in %s; skipped", img_path, types_csv)
                continue
            rgb = _read_rgb(img_path)
            if type_names:
                pred, pred_types = seg.segment_typed(rgb, mpp)  # type: ignore[union-attr]
            else:
                pred, pred_types = seg.segment(rgb, mpp), None
            row: dict[str, Any] = {"image": img_path.stem}
            if true is not None:
                row.update(score_instances(true, pred).to_dict())
            if truth is not None and counts is not None and pred_types is not None:
                gt = truth.get(
                    img_path.stem, TypedPoints(xy=np.zeros((0, 2)), types=np.zeros(0, np.int64))
                )
                one = TypedCounts(names=type_names)
                pp = instance_points(pred, pred_types)
                one.add(gt, pp, radius)
                counts.add(gt, pp, radius)
                sc = one.scores()
                row.update(det_f1=sc["det_f1"], type_accuracy=sc["type_accuracy"])
            rows.append(row)
        if not rows:
            raise click.UsageError(f"no images with ground truth in {images}")
        seg_keys = ("aji", "pq", "dq", "sq", "f1", "dice") if masks is not None else ()
        mean = {k: float(np.mean([r[k] for r in rows])) for k in seg_keys}
        typed = counts.scores() if counts is not None else {}
        if as_json:
            click.echo(
                json.dumps(
                    {
                        "model": seg.name,
                        "images": rows,
                        "mean": mean,
                        "types": typed,
                        "pair_radius_px": radius if counts is not None else None,
                    },
                    indent=2,
                )
            )
            return
        if seg_keys:
            click.echo(
                f"{'image':40s} " + " ".join(f"{k:>6s}" for k in seg_keys) + "  n_true n_pred"
            )
            for r in rows:
                click.echo(
                    f"{r['image'][:40]:40s} "
                    + " ".join(f"{r[k]:6.3f}" for k in seg_keys)
                    + f"  {r['n_true']:6d} {r['n_pred']:6d}"
                )
            click.echo(
                f"{'MEAN (' + seg.name + ')':40s} " + " ".join(f"{mean[k]:6.3f}" for k in seg_keys)
            )
        if typed:
            click.echo(
                f"typed nuclei (all images pooled, pairing within {radius:.1f} px): "
                + ", ".join(
                    f"{k} {v:.3f}"
                    if isinstance(v, float) and k.startswith(("det", "f1", "type"))
                    else f"{k} {int(v)}"
                    for k, v in typed.items()
                )
            )

    @cli.command("segment")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @mpp_option(required=True, help="The input images' own µm/px.")
    @out_option("dir", help="Output folder: DIR/<stem>.png uint16 instance masks.")
    @_image_model_option
    @device_option()
    @click.option(
        "--geojson",
        is_flag=True,
        help="Also write DIR/<stem>.geojson (QuPath detections; classified by nucleus type "
        "with a fixed colour per type when the model types nuclei).",
    )
    def segment_cmd(
        inputs: tuple[Path, ...], mpp: float, out: Path, model: str, device: str, geojson: bool
    ) -> None:
        """Segment nuclei in images; write DIR/<stem>.png uint16 instance masks.

        A model with a type head also writes DIR/<stem>.types.csv
        (id,type,p_other,p_inflammatory,p_epithelial,p_spindle; id = the label in the PNG).
        """
        from slidestream.commands import segment_images

        files = _collect_inputs(inputs)
        report = segment_images(
            files, out, mpp=mpp, model=model, device=device, geojson=geojson,
            show_progress=len(files) > 1,
        )  # fmt: skip
        logger.info("%d masks, %d nuclei in GeoJSON", len(report.masks), report.nuclei)
