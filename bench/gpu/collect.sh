#!/bin/bash
# Copy the trainings' current outputs and all logs into $1 (at most 8 files).
OUT=$1; LOG=/tmp/gpulogs
for f in $LOG/train_*.log $LOG/tissue_sweep.log; do [ -f "$f" ] && { echo "== $f"; tr '\r' '\n' < "$f" | grep -v "^train nuclei:\|UserWarning\|check_worker\|^\s*$" | tail -n 6; tr '\r' '\n' < "$f" | grep "^train nuclei:" | tail -n 1; }; done
cp /tmp/train/wide-scratch.safetensors "$OUT/wide-scratch.safetensors" 2>/dev/null
cp /tmp/train/fine-cont.safetensors "$OUT/fine-cont.safetensors" 2>/dev/null
(cd / && tar czf "$OUT/results.tgz" tmp/gpulogs $(ls -d tmp/tissue 2>/dev/null) $(ls tmp/train/*.json 2>/dev/null)) 2>/dev/null
ls -la "$OUT"
