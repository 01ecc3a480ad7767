#!/usr/bin/env bash
# One GPU session of issue 11's GPU work, as one command that ends within BUDGET seconds (default 570), most
# important result first:
#   1. smoke: the CLI trains, checkpoints and evaluates on this machine (stops here if it cannot);
#   2. side by side on the one GPU until the budget's training share is spent (SIGTERM: each saves a checkpoint):
#      the paper's looped 1x16 configuration unchanged (configs/arith_add_looped_1x16.yaml: its 100,000-step
#      schedule, so a short run is its first minutes) and configs/arith_add20_gpu.yaml (the CPU recipe of the
#      shipped addition model on the paper's 1..20-digit operands); a workdir already there (a warm machine, or
#      carried) is resumed;
#   3. evaluation of both (grid up to 20 digits, 30..100 digits beyond), exports, and what comes back in $OUT;
#   4. with the time left, training throughput and MFU of the paper's models (benchmarks/arith_train.py): the
#      looped 1x16 model with the einsum attention, cuDNN's fused attention, and the older scan-under-cond
#      progressive gradient; the 16-layer standard model with both attention kernels.
# Usage: OUT=results_dir bash benchmarks/gpu_arith_h200.sh    (device tool: timeout_s 600)
# A dry run of the whole flow on a CPU in a few minutes (tiny models; checks the script, not the numbers):
#   OUT=/tmp/dry PY=python BUDGET=300 RESERVE_S=200 BENCH_RESERVE_S=60 MAX_TRAIN_S=40 EVAL_N=2 BENCH="configs/arith_tiny.yaml" \
#     PAPER_SET="--set model.width=64 --set model.ffn=128 --set model.heads=4 --set data.batch_size=8 --set model.dtype=float32" \
#     SMALL_SET="--set train.steps=60 --set data.batch_size=16" bash benchmarks/gpu_arith_h200.sh
set -u
OUT=${OUT:-runs/gpu_h200}; mkdir -p "$OUT" runs
BUDGET=${BUDGET:-570}
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/log.txt") 2>&1
PY=${PY:-python3}
left() { echo $((BUDGET - SECONDS)); }

echo "== machine"; nvidia-smi -L; date -u
$PY -c "import jax, flax, optax, orbax.checkpoint; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" || exit 1

echo "== 1. smoke ($(left) s left)"
timeout 120 $PY run.py arith train --config configs/arith_tiny.yaml --set train.steps=20 --workdir runs/smoke \
  --eval-max-len 2 || { echo "SMOKE FAILED"; exit 1; }

L=configs/arith_add_looped_1x16.yaml; S=configs/arith_add_standard_16.yaml
TRAIN_S=$(( $(left) - ${RESERVE_S:-280} )); [ "$TRAIN_S" -gt "${MAX_TRAIN_S:-400}" ] && TRAIN_S=${MAX_TRAIN_S:-400}
echo "== 2. training for ${TRAIN_S} s ($(left) s left)"
if [ "$TRAIN_S" -gt 30 ]; then
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout -k 60 -s TERM "$TRAIN_S" $PY run.py arith train --config "$L" \
    --workdir runs/gpu_paper_1x16 --eval-max-len 0 --set train.ckpt_every=500 --set train.log_every=100 \
    --set train.keep_checkpoints=1 ${PAPER_SET:-} > "$OUT/train_paper.log" 2>&1 & p1=$!
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 timeout -k 60 -s TERM "$TRAIN_S" $PY run.py arith train \
    --config configs/arith_add20_gpu.yaml --workdir runs/gpu_add20 --eval-max-len 0 ${SMALL_SET:-} > "$OUT/train_add20.log" 2>&1 &
  p2=$!
  wait $p1 $p2   # by pid: a bare `wait` would also wait for the tee of this script's own log
fi
for w in gpu_paper_1x16 gpu_add20; do echo "-- $w"; grep -E '^\{' "runs/$w/metrics.jsonl" 2>/dev/null | tail -2; done

echo "== 3. evaluation ($(left) s left)"
EVAL_S=$(( $(left) - ${BENCH_RESERVE_S:-110} ))
# the mean of the newest checkpoints (the recipe's), or the newest alone where fewer were kept
XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout "$EVAL_S" $PY run.py arith export --checkpoint runs/gpu_add20 \
  --out runs/gpu_add20_export --average-last ${AVERAGE_LAST:-6} \
  || timeout "$EVAL_S" $PY run.py arith export --checkpoint runs/gpu_add20 --out runs/gpu_add20_export
for w in gpu_add20_export gpu_paper_1x16; do
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout "$EVAL_S" $PY run.py arith eval --checkpoint "runs/$w" --max-len 20 \
    --n ${EVAL_N:-20} --sweep 30,40,60,80,100 --json "$OUT/eval_$w.json" --plot "$OUT/eval_$w.png" \
    > "$OUT/eval_$w.log" 2>&1 & pids="${pids:-} $!"
done
wait $pids
for w in gpu_add20_export gpu_paper_1x16; do
  echo "-- $w"; $PY -c "import json,sys; r=json.load(open(sys.argv[1])); g=r['grid']; print('grid mean', round(sum(map(sum,g))/sum(map(len,g)),4), 'diag 20', g[-1][-1], 'sweep', r.get('sweep'))" "$OUT/eval_$w.json" 2>&1 | tail -1
done

# what comes back (at most 8 files): log.txt, mfu.md, the two eval JSONs, and one tar with the add20 workdir's
# newest checkpoint (resumable elsewhere), its export, both metrics files, the training and evaluation logs and the
# heatmaps (the paper model's full state, 12M parameters with Adam moments, is larger than one can bring back)
newest=$(ls runs/gpu_add20/checkpoints 2>/dev/null | sort -n | tail -1)
mkdir -p runs/gpu_logs && mv "$OUT"/*.log "$OUT"/*.png runs/gpu_logs/ 2>/dev/null
tar cf "$OUT/add20.tar" runs/gpu_add20/metrics.jsonl runs/gpu_add20_export runs/gpu_logs \
  ${newest:+runs/gpu_add20/checkpoints/$newest} runs/gpu_paper_1x16/metrics.jsonl 2>/dev/null
ls -la "$OUT"

echo "== 4. throughput ($(left) s left)"
BENCH=${BENCH:-"$L $L|model.attention=cudnn $S $S|model.attention=cudnn $L|model.progressive_grad=scan"}
timeout $(( $(left) - 5 )) $PY benchmarks/arith_train.py $BENCH --steps ${BENCH_STEPS:-5} 2>&1 | grep -v Warning \
  | tee "$OUT/mfu.md"

echo "== done at ${SECONDS} s"
