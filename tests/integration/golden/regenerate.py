"""Regenerate ``small-demo-summary.json`` (only when a change of results is intended).

Usage: ``.venv/bin/python tests/integration/golden/regenerate.py``. It renders the seeded demo
slide of ``test_run_pipeline.SMALL``, runs ``slidestream run --workers 0`` with the default
models on it and stores the summary statistics that ``test_golden_summary_statistics`` compares.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

from slidestream.config import RunConfig
from slidestream.demo_slide import DemoSlideSpec, write_demo_slide
from slidestream.pipeline import run_batch

SMALL = DemoSlideSpec(width_px=1792, height_px=1408, mpp=0.5, seed=7)  # as the test


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        slide = write_demo_slide(Path(tmp) / "small-demo.svs", SMALL)
        config = RunConfig(out_dir=Path(tmp) / "out", workers=0, show_progress=False)
        (outcome,) = run_batch([slide], config)
        assert outcome.summary is not None, outcome.reason
        stats = dataclasses.asdict(outcome.summary.statistics)
    keep = ("tissue_area_mm2", "nucleus_count", "nuclei_per_mm2", "nucleus_area_um2",
            "mean_hematoxylin_od")  # fmt: skip
    golden = {k: stats[k] for k in keep}
    golden["classes"] = {
        name: {"area_mm2": c["area_mm2"], "nucleus_count": c["nucleus_count"]}
        for name, c in stats["classes"].items()
    }
    out = Path(__file__).with_name("small-demo-summary.json")
    out.write_text(json.dumps(golden, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
