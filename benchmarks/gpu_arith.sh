#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md (arith): training throughput + MFU, decoding throughput, and a small
# length-generalisation sweep of the CPU-sized addition model. Usage: OUT=results_dir bash benchmarks/gpu_arith.sh
set -u
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/machine.txt"
python -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/machine.txt"

# 1. Length-generalisation sweep 1: variants of the first small recipe (2 layers x 2 passes, Abacus only, original
#    "shift" ids with k drawn per row; = configs/arith_add_small.yaml with the BASE overrides below), trained side by
#    side on the one GPU. Evaluate the exports afterwards on CPU:
#    python run.py arith eval --checkpoint runs/export_NAME --max-len 20 --n 30 --sweep 25,30
BASE="--set model.layers=2 --set model.recurrences=2 --set model.positions=[abacus] --set model.abacus_train_ids=shift --set train.steps=6000"
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
EV="--set eval.n_per_cell=30 --set eval.sweep=[25,30,40]"
declare -A VARIANTS=(
  [base]=""
  [fire]="--set model.positions=[abacus,fire]"
  [k40]="--set model.abacus_max_k=40"
  [rec4]="--set model.recurrences=4"
  [b128]="--set data.batch_size=128"
)
for name in "${!VARIANTS[@]}"; do
  (timeout ${SWEEP_TIMEOUT:-240} python run.py arith train --config ${CONFIG:-configs/arith_add_small.yaml} \
     $BASE ${VARIANTS[$name]} $EV ${EXTRA:-} --workdir "runs/sweep_$name" > "runs/sweep_$name.log" 2>&1
   python run.py arith export --checkpoint "runs/sweep_$name" --out "runs/export_$name" >> "runs/sweep_$name.log" 2>&1
   cp "runs/sweep_$name/eval.json" "runs/export_$name/eval.json" 2>/dev/null) &
done
wait
for name in "${!VARIANTS[@]}"; do
  echo "== $name ${VARIANTS[$name]}"; grep -E '^\{' "runs/sweep_$name.log" | tail -2
  python - "$name" <<'PY'
import json, sys
r = json.load(open(f"runs/sweep_{sys.argv[1]}/eval.json"))
print("sweep", r.get("sweep"), "row 20:", [round(x, 2) for x in r["grid"][-1]])
PY
done 2>&1 | tee "$OUT/sweep.txt"
unset XLA_PYTHON_CLIENT_MEM_FRACTION
tar cf "$OUT/sweep_exports.tar" runs/export_* runs/sweep_*.log runs/sweep_*/metrics.jsonl runs/sweep_*/eval.png 2>/dev/null
[ -n "${SKIP_BENCH:-}" ] && exit 0

# 2. Training throughput (the arith_add_small row of BENCHMARKS.md was measured with the first recipe: add $BASE) (tokens/s, MFU in bf16) and decoding throughput.
timeout 110 python benchmarks/arith_train.py configs/arith_add_small.yaml configs/arith_add_looped_1x16.yaml \
  configs/arith_add_standard_16.yaml --steps 10 2>&1 | grep -v Warning | tee "$OUT/train_bench.md"
timeout 70 python benchmarks/arith_decode.py --config configs/arith_add_small.yaml --lengths 20 100 --batch 256 \
  2>&1 | tee "$OUT/decode_small.md"
timeout 80 python benchmarks/arith_decode.py --config configs/arith_add_looped_1x16.yaml --lengths 20 100 \
  --batch 256 2>&1 | tee "$OUT/decode_1x16.md"
