#!/bin/bash
# Build .gpu/ (git-ignored) for a device check: the wheels the GPU image lacks, a slimmed
# imagecodecs, the shared nucleus data resampled to 0.35 µm/px (the accurate network's working
# resolution) and the LC25000 tiles.
# Run from the repository root on the development machine:  bash bench/gpu/prepare.sh
# The device tool carries at most 64 MiB with the tracked tree (~13 MB), and the nucleus data at
# 0.35 µm/px (37 MB) and the LC25000 tiles (5 MB) do not both fit: by default .gpu/ holds the
# nucleus data (~51 MB in all); TISSUE_SWEEP=1 holds the LC25000 tiles and only the one nucleus
# image that bench/nuclei.py tiles (~20 MB), and run1.sh then skips the nucleus trainings.
set -eu
ROOT=$(git rev-parse --show-toplevel); cd "$ROOT"
SHARED=${SHARED:-$ROOT/../shared/data}
EXCLUDE=$(git rev-parse --git-dir)/info/exclude
mkdir -p "$(dirname "$EXCLUDE")"; grep -qx '/.gpu/' "$EXCLUDE" 2>/dev/null || echo /.gpu/ >> "$EXCLUDE"
rm -rf .gpu; mkdir -p .gpu/whl
# 1. Wheels for the device's python 3.12 (its image has torch, numpy, scipy, scikit-image,
#    opencv, pillow, tifffile, pyarrow, safetensors, click, tqdm; not these).
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
for p in monai==1.6.1 openslide-python==1.4.7 openslide-bin==4.0.1.2 shapely==2.2.0 \
         geojson==3.3.0 orjson==3.13.0 isal==1.9.1 imagecodecs==2026.3.6; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLAT -d .gpu/whl "$p"
done
# 2. imagecodecs is 26 MB: keep only the codecs slidestream uses (JPEG, zlib, deflate).
mkdir -p .gpu/site_ic; (cd .gpu/site_ic && unzip -q ../whl/imagecodecs-*.whl)
rm .gpu/whl/imagecodecs-*.whl
for f in .gpu/site_ic/imagecodecs/_*.so; do
  case $(basename "$f") in _shared.*|_shared_cython.*|_jpeg8.*|_zlib.*|_deflate.*) ;; *) rm "$f";; esac
done
for f in .gpu/site_ic/imagecodecs.libs/*; do
  case $(basename "$f") in libjpeg-*|libdeflate-*) ;; *) rm "$f";; esac
done
rm -f .gpu/site_ic/imagecodecs/__init__.pyi
# 3. Data: nucleus sets at the training µm/px (identical pixels to load_sources), or LC25000 tiles.
.venv/bin/python bench/gpu/prepare_nuclei.py "$SHARED/nuclei" .gpu/nuclei --mpp 0.35
if [ "${TISSUE_SWEEP:-0}" = 1 ]; then
  keep=Breast_TCGA-AR-A1AS-01Z-00-DX1  # the tile of bench/nuclei.py
  find .gpu/nuclei -name '*.png' ! -name "$keep.png" -delete
  rm -rf .gpu/nuclei/cpm15 .gpu/nuclei/gbm40_emory
  mkdir -p .gpu/tissue; cp -r "$SHARED/tissue/lc25000_lung" .gpu/tissue/; chmod -R u+w .gpu/tissue
fi
du -sh .gpu
