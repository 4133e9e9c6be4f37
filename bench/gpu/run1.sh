#!/bin/bash
# First device call (see bench/gpu/README.md): set-up, the GPU benchmarks of #3/#4/#5 one after
# another on an otherwise idle machine, then two nucleus trainings (and, with TISSUE_SWEEP=1, the
# tissue CNN sweep) started with setsid so that they run on past this call; run2.sh collects.
# Local dry run on the CPU: DRY=1 OUT=/tmp/dry LIMIT=240 EXTRA=20 PY=.venv/bin/python bash bench/gpu/run1.sh
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=/tmp/gpulogs; mkdir -p $LOG /tmp/train
T0=$(date +%s); LIMIT=${LIMIT:-585}
el() { echo "[t+$(( $(date +%s) - T0 ))s] $*"; }
PY=${PY:-python3}
DEV=cuda; MOS=6; W=8192; H=6144; BENCH_T=(130 45 220)
if [ "${DRY:-0}" = 1 ]; then DEV=cpu; MOS=2; W=1024; H=768; BENCH_T=(60 30 120); fi
el setup
if [ "${DRY:-0}" != 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/.gpu/site_ic
fi
# The package without pip: slidestream/ plus the top-level folders mapped as in pyproject.
rm -rf /tmp/pkg; mkdir -p /tmp/pkg; cp -r slidestream /tmp/pkg/
for d in wsi tiling models overlays db; do ln -s "$PWD/$d" /tmp/pkg/slidestream/$d; done
ln -s "$PWD/alembic" /tmp/pkg/slidestream/migrations
export PYTHONPATH=/tmp/pkg${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import torch, slidestream, slidestream.models.nuclei, slidestream.overlays, slidestream.wsi, monai, openslide, shapely, imagecodecs; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), slidestream.__file__, 'cpus', __import__('os').cpu_count())" || exit 1
export SLIDESTREAM_NUCLEI_DATA=$PWD/.gpu/nuclei
el "bench/nuclei.py"
timeout ${BENCH_T[0]} $PY bench/nuclei.py --devices $DEV --cuda-batch 16 --repeats 3 --json $LOG/bench_nuclei.json > $LOG/bench_nuclei.log 2>&1; echo "rc $?"; tail -n 30 $LOG/bench_nuclei.log
el "bench/tissue.py"
timeout ${BENCH_T[1]} $PY bench/tissue.py --seconds 3 > $LOG/bench_tissue.log 2>&1; echo "rc $?"; tail -n 12 $LOG/bench_tissue.log
el "bench/pipeline.py"
timeout ${BENCH_T[2]} $PY bench/pipeline.py --device $DEV --batch-size 16 --width $W --height $H --mosaic $MOS --slide /tmp/big.svs --e2e-runs 1 > $LOG/bench_pipeline.log 2>&1; echo "rc $?"; tail -n 12 $LOG/bench_pipeline.log
# A second end-to-end run with 6 tile readers (reusing the slide), if time allows.
if [ $(( $(date +%s) - T0 )) -lt 300 ] && [ -f /tmp/big.svs ]; then
  el "bench/pipeline.py --workers 6"
  timeout 120 $PY bench/pipeline.py --device $DEV --batch-size 16 --width $W --height $H --mosaic $MOS --slide /tmp/big.svs --workers 6 --e2e-runs 1 > $LOG/bench_pipeline_r6.log 2>&1; echo "rc $?"; tail -n 7 $LOG/bench_pipeline_r6.log
fi
# Trainings run on (setsid) past this call's end; run2.sh waits for them and collects.
END2=$(( T0 + LIMIT + ${EXTRA:-110} ))
left=$(( END2 - $(date +%s) - 45 ))
mins=$(python3 -c "print(max(0.5, round($left / 60, 2)))")
el "training for $mins min of optimisation"
echo $mins > $LOG/train_minutes
NDATA="--data .gpu/nuclei/monuseg_kumar --data .gpu/nuclei/cpm15 --data .gpu/nuclei/gbm40_emory"
# The accurate preset's recipe (0.35 µm/px, the data pre-resampled to it by prepare.sh): a wide
# network from scratch, and the shipped fine network continued with many more steps.
WIDE="--features 32,32,64,128,256,32"; FINE="--features 16,16,32,64,128,16"
COMMON="--device $DEV --working-mpp 0.35 --batch-size 16 --crop-px 288 --colour-strength 1.0 --val-every-steps 400 --seed 0 --minutes $mins"
[ "${DRY:-0}" = 1 ] && COMMON="--device cpu --working-mpp 0.35 --batch-size 2 --crop-px 96 --val-every-steps 5 --seed 0 --minutes $mins"
if [ -d .gpu/nuclei/gbm40_emory ]; then
setsid nohup $PY -m slidestream -v train nuclei $NDATA --out /tmp/train/wide-scratch.safetensors --workers 6 --lr 2e-3 $WIDE $COMMON > $LOG/train_scratch.log 2>&1 < /dev/null &
setsid nohup $PY -m slidestream -v train nuclei $NDATA --out /tmp/train/fine-cont.safetensors --workers 6 --lr 1e-3 --init models/weights/nuclei-unet-fine.safetensors $FINE $COMMON > $LOG/train_cont.log 2>&1 < /dev/null &
else el "no nucleus training data in .gpu (prepared with TISSUE_SWEEP=1): nucleus trainings skipped"; fi
if [ "${TISSUE_SWEEP:-0}" = 1 ]; then
  setsid nohup $PY research/gpu_tissue_sweep.py --data .gpu/tissue/lc25000_lung --out /tmp/tissue --minutes $mins ${TISSUE_ARGS:-} > $LOG/tissue_sweep.log 2>&1 < /dev/null &
fi
# Wait to the end of this call, then hand back what exists so far (best checkpoints so far).
while [ $(( $(date +%s) - T0 )) -lt $(( LIMIT - 12 )) ]; do sleep 3; done
bash bench/gpu/collect.sh "$OUT"
el "call 1 done"
