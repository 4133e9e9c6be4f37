"""Learning from annotations: sampler, train tissue --slides, evaluate tissue --slides, run."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from click.testing import CliRunner

from slidestream.annotated_mosaic import MosaicSlide, write_annotated_mosaic
from slidestream.cli import cli
from slidestream.tiling import PatchSamplingConfig, plan_patches, read_annotations, read_patches
from slidestream.wsi import open_slide

COLORS = {"Tumor": (200, 0, 0), "Stroma": (150, 200, 150)}


def _tile(kind: str, rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """Synthetic H&E-like tile: dense purple nuclei (Tumor) or pink fibres with few (Stroma)."""
    img = np.full((size, size, 3), (236, 170, 205), dtype=np.uint8)
    if kind == "Stroma":
        for _ in range(14):
            y = int(rng.integers(0, size))
            cv2.line(img, (0, y), (size, int(y + rng.integers(-30, 30))), (205, 110, 170), 3)
        n = 6
    else:
        n = 70
    for _ in range(n):
        c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
        cv2.circle(img, c, int(rng.integers(3, 6)), (90, 40, 140), -1)
    noise = rng.normal(0, 6, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _mosaic(tmp: Path, name: str, seed: int) -> MosaicSlide:
    rng = np.random.default_rng(seed)
    tiles = [(_tile(k, rng), k) for k in ("Tumor", "Stroma") for _ in range(16)]
    return write_annotated_mosaic(
        tmp,
        name,
        tiles,
        tile_mpp=1.5,
        slide_mpp=1.0,
        class_colors=COLORS,
        block_tiles=2,
        blocks_per_row=4,
        margin_px=128,
        seed=seed,
    )


@pytest.fixture(scope="module")
def mosaics(tmp_path_factory: pytest.TempPathFactory) -> tuple[MosaicSlide, MosaicSlide]:
    tmp = tmp_path_factory.mktemp("mosaic")
    return _mosaic(tmp / "a", "slide_a", 1), _mosaic(tmp / "b", "slide_b", 2)


def test_plan_and_read_patches(mosaics: tuple[MosaicSlide, MosaicSlide]) -> None:
    m = mosaics[0]
    regions = read_annotations(m.geojson, dimensions=m.dimensions).regions()
    cfg = PatchSamplingConfig(patch_mpp=1.5, patch_size_px=64, min_inside=0.9, max_per_class=40)
    plan = plan_patches(regions, slide_mpp=m.mpp, dimensions=m.dimensions, config=cfg)
    assert plan.class_names == ("Stroma", "Tumor")
    assert set(plan.counts().values()) == {40}
    assert plan.l0_size == pytest.approx(96.0)
    for (x, y), k in zip(plan.l0_xy[:20], plan.labels[:20], strict=True):
        box = shapely.box(x, y, x + 96, y + 96)
        inside = shapely.intersection(box, regions[plan.class_names[k]]).area / box.area
        assert inside >= 0.9
        blocks = [c for c, (x0, y0, x1, y1) in m.blocks if x0 <= x + 48 < x1 and y0 <= y + 48 < y1]
        assert blocks == [plan.class_names[k]]
    with open_slide(m.slide) as slide:
        patches = read_patches(slide, plan, cfg)
        assert patches.shape == (80, 64, 64, 3) and patches.dtype == np.uint8
        i = 7
        expect = slide.read_at_mpp(tuple(plan.l0_xy[i]), (64, 64), 1.5)
        np.testing.assert_array_equal(patches[i], expect)


_TRAIN = ["--epochs", "4", "--views-per-image", "1", "--textons", "8", "--no-progress"]


@pytest.fixture(scope="module")
def trained(
    tmp_path_factory: pytest.TempPathFactory, mosaics: tuple[MosaicSlide, MosaicSlide]
) -> Path:
    a = mosaics[0]
    model = tmp_path_factory.mktemp("trained") / "model"
    res = CliRunner().invoke(
        cli,
        ["train", "tissue", "--slides", str(a.slide), "--annotations", str(a.geojson.parent),
         "--out", str(model), "--cv-folds", "2", *_TRAIN],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return model


def _evaluate(b: MosaicSlide, *source: str) -> dict[str, object]:
    res = CliRunner().invoke(
        cli,
        ["evaluate", "tissue", "--slides", str(b.slide), "--annotations", str(b.geojson),
         *source, "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    out: dict[str, object] = json.loads(res.output)
    return out


def test_train_then_evaluate(trained: Path, mosaics: tuple[MosaicSlide, MosaicSlide]) -> None:
    model = trained
    spec = json.loads((model / "config.json").read_text(encoding="utf-8"))
    assert spec["class_names"] == ["Stroma", "Tumor"]
    assert spec["class_colors"] == [list(COLORS["Stroma"]), list(COLORS["Tumor"])]
    assert spec["slidestream"]["training"]["slides"] == ["slide_a.tiff"]
    assert (model / "cv.json").is_file() and (model / "MODEL_CARD.md").is_file()
    assert "slide_a.tiff" in (model / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert not (model / ".cache").exists()
    scores = _evaluate(mosaics[1], "--model", str(model))
    assert scores["balanced_accuracy"] >= 0.9  # type: ignore[operator]
    assert scores["coverage"] > 0.9  # type: ignore[operator]
    assert set(scores["dice"]) == {"Stroma", "Tumor"}  # type: ignore[arg-type]


@pytest.mark.slow
def test_run_writes_the_users_classes(
    tmp_path: Path, trained: Path, mosaics: tuple[MosaicSlide, MosaicSlide]
) -> None:
    b = mosaics[1]
    out = tmp_path / "run"
    res = CliRunner().invoke(
        cli,
        ["run", str(b.slide), "--tissue-model", str(trained), "--out", str(out), "--no-progress",
         "--nuclei-model", "classical"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    geo = json.loads((out / "slide_b" / "tissue.geojson").read_text(encoding="utf-8"))
    classes = {
        f["properties"]["classification"]["name"]: f["properties"]["classification"]["color"]
        for f in geo["features"]
    }
    assert classes == {k: list(v) for k, v in COLORS.items()}
    from_run = _evaluate(b, "--results", str(out))
    computed = _evaluate(b, "--model", str(trained))
    assert from_run["balanced_accuracy"] == pytest.approx(computed["balanced_accuracy"], abs=1e-6)


def test_resume_uses_the_patch_cache(
    tmp_path: Path, mosaics: tuple[MosaicSlide, MosaicSlide], monkeypatch: pytest.MonkeyPatch
) -> None:
    import slidestream.models.tissue as tissue
    import slidestream.tiling as tiling

    a = mosaics[0]
    model = tmp_path / "model"
    args = ["train", "tissue", "--slides", str(a.slide), "--annotations", str(a.geojson),
            "--out", str(model), *_TRAIN]  # fmt: skip

    def interrupted(*_: object, **__: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(tissue, "train_on_slides", interrupted)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code != 0
    assert list((model / ".cache").glob("slide_a.tiff.*.npz"))
    monkeypatch.undo()

    def no_reading(*_: object, **__: object) -> None:
        raise AssertionError("patches read again")

    monkeypatch.setattr(tiling, "read_patches", no_reading)
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert (model / "weights.safetensors").is_file()


def test_bad_annotations_one_line(tmp_path: Path, mosaics: tuple[MosaicSlide, MosaicSlide]) -> None:
    a = mosaics[0]
    one_class = tmp_path / "slide_a.geojson"
    text = a.geojson.read_text(encoding="utf-8").replace('"name":"Stroma"', '"name":"Tumor"')
    one_class.write_text(text, encoding="utf-8")
    res = CliRunner().invoke(
        cli,
        ["train", "tissue", "--slides", str(a.slide), "--annotations", str(one_class),
         "--out", str(tmp_path / "m"), *_TRAIN],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "only one annotated class (Tumor)" in res.output
    far = tmp_path / "far.geojson"
    far.write_text(
        '[{"type":"Feature","geometry":{"type":"Point","coordinates":[99999, 5]},'
        '"properties":{"classification":"Tumor"}}]',
        encoding="utf-8",
    )
    res = CliRunner().invoke(
        cli,
        ["evaluate", "tissue", "--slides", str(a.slide), "--annotations",
         f"slide_a.tiff={far}", "--model", "default"],
    )  # fmt: skip
    assert res.exit_code == 1
    assert "far.geojson: feature 0: coordinates" in res.output and "outside the slide" in res.output
    res = CliRunner().invoke(
        cli, ["train", "tissue", "--slides", str(a.slide), "--out", str(tmp_path / "m")]
    )
    assert res.exit_code == 2 and "--annotations" in res.output
