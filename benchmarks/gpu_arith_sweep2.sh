#!/usr/bin/env bash
# Length-generalisation sweep 2 (GPU): variants of the first small recipe with Abacus+FIRE and the original "shift"
# ids, trained side by side for 8000 steps and exported; evaluate them afterwards on CPU with
#    python run.py arith eval --checkpoint runs/s2export_NAME --max-len 20 --n 30 --sweep 25,30
set -u
OUT=${OUT:-runs/gpu2}; mkdir -p "$OUT" runs
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
COMMON="--set model.layers=2 --set model.recurrences=2 --set model.abacus_train_ids=shift --set model.positions=[abacus,fire] --set train.steps=${STEPS:-8000} --eval-max-len 0"
declare -A V=(
  [fire8k]=""
  [wide]="--set model.width=256 --set model.ffn=1024 --set model.heads=8"
  [loop1x4]="--set model.layers=1 --set model.recurrences=4"
  [kbatch]="--set model.abacus_k_per_row=false"
  [b128]="--set data.batch_size=128"
)
for n in "${!V[@]}"; do
  (timeout ${TRAIN_TIMEOUT:-170} python run.py arith train --config configs/arith_add_small.yaml $COMMON ${V[$n]} \
     --workdir "runs/s2_$n" > "runs/s2_$n.log" 2>&1
   python run.py arith export --checkpoint "runs/s2_$n" --out "runs/s2export_$n" >> "runs/s2_$n.log" 2>&1) &
done
wait
for n in "${!V[@]}"; do echo "== $n ${V[$n]}"; grep -E '^\{' "runs/s2_$n.log" | tail -1; done | tee "$OUT/sweep2.txt"
tar cf "$OUT/sweep2.tar" runs/s2export_* runs/s2_*/metrics.jsonl
