#!/usr/bin/env bash
# The GPU figures of the issues' checks, on one GPU: `bash bench/gpu_checks.sh PART OUTDIR`.
#   train   baseline 200 steps and record_1263 50 steps (bf16 + compile, random tokens): ms/step, memory
#   run     record_1298 for 300 steps on FineWeb-format shards (EMA, late QAT, GPTQ export, round trip)
#   eval    every eval mode on the record_1263 model over a 1M-token slice, extrapolated to FineWeb val
# Data for `run`: shards + tokenizer under data/fineweb_sample (python -m pgolf.tools.prepare ... --out there).
# Each step has its own time limit and log; a failing step does not stop the others.
set -u
part=${1:?part: train | run | eval}
out=${2:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
data=data/fineweb_sample
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "rc=$? $name $((SECONDS - t0))s"
  grep -v "Warning\|warn(" "$out/$name.log" | tail -n 40
}
case "$part" in
  train)
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    step env 60 $py -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name(0))"
    step gpu_tests 240 $py -m pytest -q -m gpu tests/ -x -p no:cacheprovider
    step baseline_train 300 $py bench/train_bench.py experiment=baseline --steps 200 --warmup 5 --json "$out/baseline_train.json"
    step record_1263_train 300 $py bench/train_bench.py experiment=record_1263 --steps 50 --warmup 3 --json "$out/record_1263_train.json"
    ;;
  run)
    step record_1298_run 570 $py train.py experiment=record_1298 data.dir=$data data.tokenizer_path=$data/fineweb_1024_bpe.model \
      train.iterations=300 train.warmdown_iters=150 train.max_wallclock_seconds=0 train.val_every=100 train.log_every=25 \
      callbacks.progress=line callbacks.progress_every_seconds=60 hydra.run.dir=outputs/gpu_record_1298
    cp outputs/gpu_record_1298/results.json "$out/record_1298_results.json" 2>/dev/null
    ;;
  eval)
    step eval_modes 580 $py bench/eval_bench.py experiment=record_1263 --tokens 1048576 --compile \
      --modes standard,sliding,slot_1263,slot_1298,causal_slot,ttt,lora_ttt --json "$out/eval_modes.json"
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
