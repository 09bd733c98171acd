#!/usr/bin/env bash
# The GPU figures of the issues' checks, on one GPU: `bash bench/gpu_checks.sh PART OUTDIR`.
#   train   baseline 200 steps and record_1263 50 steps (bf16 + compile, random tokens): ms/step, memory
#   run     record_1298 for 300 steps on FineWeb-format shards (EMA, late QAT, GPTQ export, round trip)
#   eval    every eval mode on the record_1263 model over a 1M-token slice, extrapolated to FineWeb val
#   pack    the packed record_1263 train_gpt.py, 50 steps under torchrun --nproc_per_node=1, against train.py on
#           the same data and steps (step_avg of both logs)
#   frontier  record_1611 50 steps on CaseOps shards with its export end to end (SDClip GPTQ + LQER, per-group
#           codec, calibration on the challenge clock) and phased TTT (phased_ttt_1611) on a validation slice
#   quick   `pack` and `frontier` (20 steps) with limits that fit one device call (under 600 s): what a session
#           lent 15 minutes of GPU time runs
# Data for `run` and `pack`: shards + tokenizer under data/fineweb_sample; for `frontier`: CaseOps sp8192 shards
# under data/fineweb_sample_caseops; `bash bench/gpu_prep.sh` makes both here, and .whl/ (the wheels a bare GPU
# machine lacks, and lrzip), installed below into .site/ when the packages are missing.
# Each step has its own time limit and log; a failing step does not stop the others.
set -u
part=${1:?part: train | run | eval | pack | frontier | quick}
out=${2:-bench/results/gpu}
mkdir -p "$out"
py=${PYTHON:-python3}
data=data/fineweb_sample
if [ -d .whl ] && ! $py -c "import hydra, omegaconf, brotli, zstandard, python_minifier" 2>/dev/null; then
  $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl || exit 1
  export PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! command -v lrzip >/dev/null 2>&1 && ls .whl/deb/*.deb >/dev/null 2>&1; then
  for f in .whl/deb/*.deb; do dpkg -x "$f" .site/deb; done
  export PATH=$PWD/.site/deb/usr/bin:$PATH LD_LIBRARY_PATH=$PWD/.site/deb/lib/x86_64-linux-gnu:$PWD/.site/deb/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "rc=$? $name $((SECONDS - t0))s"
  grep -v "Warning\|warn(" "$out/$name.log" | tail -n 40
}
pack_check() {  # LIMIT: seconds for each of the two 50-step runs
  rm -rf "$out/packed" && $py -m pgolf.tools.pack experiment=record_1263 --out "$out/packed" >"$out/pack.log" 2>&1
  cat "$out/pack.log"
  abs=$(cd "$data" && pwd)
  step record_1263_packed "$1" env -C "$out/packed" DATA_PATH="$abs" TOKENIZER_PATH="$abs/fineweb_1024_bpe.model" \
    ITERATIONS=50 MAX_WALLCLOCK_SECONDS=0 RUN_ID=packed50 torchrun --standalone --nproc_per_node=1 train_gpt.py \
    train.log_every=10 'final_eval.modes=[standard]' final_eval.max_tokens=1048576
  step record_1263_train_py "$1" $py train.py experiment=record_1263 data.dir=$data \
    data.tokenizer_path=$data/fineweb_1024_bpe.model train.iterations=50 train.max_wallclock_seconds=0 \
    train.log_every=10 'final_eval.modes=[standard]' final_eval.max_tokens=1048576 hydra.run.dir=outputs/gpu_pack_ref
  grep -h "step:50/" "$out/record_1263_packed.log" "$out/record_1263_train_py.log"
}
frontier_check() {  # LIMIT STEPS
  cdata=data/fineweb_sample_caseops
  step record_1611_run "$1" $py train.py experiment=record_1611 data.dir=$cdata \
    data.tokenizer_path=$cdata/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model train.iterations="$2" train.max_wallclock_seconds=0 \
    train.log_every=10 final_eval.max_tokens=262144 callbacks.progress=line callbacks.progress_every_seconds=30 \
    hydra.run.dir=outputs/gpu_record_1611
  cp outputs/gpu_record_1611/results.json "$out/record_1611_results.json" 2>/dev/null
  grep -h "gptq:\|calibration\|export_time\|phased\|Total submission" "$out/record_1611_run.log" | tail -n 30
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
  pack) pack_check 420 ;;
  frontier) frontier_check 570 50 ;;
  quick)
    step env 60 $py -c "import torch, lightning; print(torch.__version__, lightning.__version__, torch.cuda.get_device_name(0))"
    pack_check 170
    frontier_check 220 20
    ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac
