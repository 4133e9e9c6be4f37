"""CLI: ``slidestream train nuclei``, ``slidestream evaluate nuclei``, ``slidestream segment``.

Heavy libraries (torch, MONAI, the model code) are imported inside the command bodies.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import click

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
        "--mpp",
        type=click.FloatRange(min=0.05),
        default=0.5,
        show_default=True,
        help="Working µm/px of the model.",
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
        help="Continue training from these .safetensors (same architecture).",
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
        mpp: float,
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
        """Train the nucleus U-Net (from scratch or --init weights) on common-format folders."""
        from slidestream.models.nuclei import TrainConfig, train_nuclei
        from slidestream.models.nuclei._network import NetworkConfig

        try:
            widths = [int(f) for f in features.split(",")]
        except ValueError as exc:
            raise click.BadParameter(f"{features!r}: expected six integers") from exc
        if len(widths) != 6:
            raise click.BadParameter(f"{features!r}: expected six comma-separated widths")
        config = TrainConfig(
            network=NetworkConfig(features=(*widths,)),  # type: ignore[arg-type]
            workers=workers,
            colour_strength=colour_strength,
            mpp=mpp,
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
        "--images", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True
    )
    @click.option(
        "--masks",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        required=True,
        help="uint16 instance PNGs named like the images.",
    )
    @mpp_option(required=True, help="The images' own µm/px.")
    @_image_model_option
    @device_option()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
    def evaluate_nuclei_cmd(
        images: Path, masks: Path, mpp: float, model: str, device: str, as_json: bool
    ) -> None:
        """Score a nucleus model: AJI, PQ (DQ, SQ), object F1 at IoU 0.5 and Dice."""
        import numpy as np
        from PIL import Image

        from slidestream._device import resolve_device
        from slidestream.models.nuclei import load_nuclei_model, score_instances

        seg = load_nuclei_model(model, resolve_device(device))
        rows: list[dict[str, Any]] = []
        for img_path in _collect_inputs((images,)):
            mask_path = masks / (img_path.stem + ".png")
            if not mask_path.is_file():
                logger.warning("%s: no mask %s; skipped", img_path, mask_path)
                continue
            with Image.open(mask_path) as im:
                true = np.asarray(im, dtype=np.int32)
            pred = seg.segment(_read_rgb(img_path), mpp)
            rows.append({"image": img_path.stem, **score_instances(true, pred).to_dict()})
        if not rows:
            raise click.UsageError(f"no image/mask pairs in {images} and {masks}")
        keys = ("aji", "pq", "dq", "sq", "f1", "dice")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        if as_json:
            click.echo(json.dumps({"model": seg.name, "images": rows, "mean": mean}, indent=2))
            return
        click.echo(f"{'image':40s} " + " ".join(f"{k:>6s}" for k in keys) + "  n_true n_pred")
        for r in rows:
            click.echo(
                f"{r['image'][:40]:40s} "
                + " ".join(f"{r[k]:6.3f}" for k in keys)
                + f"  {r['n_true']:6d} {r['n_pred']:6d}"
            )
        click.echo(f"{'MEAN (' + seg.name + ')':40s} " + " ".join(f"{mean[k]:6.3f}" for k in keys))

    @cli.command("segment")
    @click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
    @mpp_option(required=True, help="The input images' own µm/px.")
    @out_option("dir", help="Output folder: DIR/<stem>.png uint16 instance masks.")
    @_image_model_option
    @device_option()
    @click.option("--geojson", is_flag=True, help="Also write DIR/<stem>.geojson (QuPath).")
    def segment_cmd(
        inputs: tuple[Path, ...], mpp: float, out: Path, model: str, device: str, geojson: bool
    ) -> None:
        """Segment nuclei in images; write DIR/<stem>.png uint16 instance masks."""
        from slidestream.commands import segment_images

        files = _collect_inputs(inputs)
        report = segment_images(
            files, out, mpp=mpp, model=model, device=device, geojson=geojson,
            show_progress=len(files) > 1,
        )  # fmt: skip
        logger.info("%d masks, %d nuclei in GeoJSON", len(report.masks), report.nuclei)
