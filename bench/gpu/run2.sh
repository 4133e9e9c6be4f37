#!/bin/bash
# Second call: wait for the trainings started by run1.sh, then collect.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; T0=$(date +%s); LIMIT=${LIMIT:-170}
while pgrep -f "train nuclei|gpu_tissue_sweep" > /dev/null && [ $(( $(date +%s) - T0 )) -lt $LIMIT ]; do sleep 2; done
echo "waited $(( $(date +%s) - T0 )) s; still running: $(pgrep -fc 'train nuclei|gpu_tissue_sweep')"
bash bench/gpu/collect.sh "$OUT"
