#!/usr/bin/env bash
# Everything bench/gpu_checks.sh needs on a bare GPU machine, made here (CPU, once) into ignored folders of the
# repo, so that a lent GPU's few minutes go to the checks alone:
#   data/fineweb_sample          sp1024 shards of the shared FineWeb sample (100 validation documents)
#   data/fineweb_sample_caseops  CaseOps sp8192 shards of the same sample, with the validation byte sidecar
#   .whl/                        wheels the GPU machine lacks (hydra-core, omegaconf, antlr, zstandard, brotli,
#                                python-minifier) and, under .whl/deb/, Debian's lrzip with its liblzo2 and liblz4 libraries
#                                for the pergroup export codec (unpacked there into .site/deb, never into /)
# Usage, from the repo root with ../shared beside it:   bash bench/gpu_prep.sh
# Then one device call (its `carry`: data/fineweb_sample, data/fineweb_sample_caseops, .whl):
#   bash bench/gpu_checks.sh quick bench/results/gpu
# Keeps what is already there; the whole carry stays under the device tool's 64 MiB (printed at the end).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
shared=${SHARED:-../shared}
sample=$shared/data/fineweb/fineweb10BT_legalprefilter_2800docs.jsonl
tok=$shared/data/tokenizers
[ -f "$sample" ] || { echo "error: $sample not found (the shared FineWeb sample; set SHARED=DIR)" >&2; exit 2; }

if [ ! -f data/fineweb_sample/manifest.json ]; then
  "$py" -m pgolf.tools.prepare --input "$sample" --out data/fineweb_sample --name fineweb \
    --tokenizer "$tok/fineweb_1024_bpe.model" --val-docs 100
  cp "$tok/fineweb_1024_bpe.model" data/fineweb_sample/
fi
caseops_model=fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model
if [ ! -f data/fineweb_sample_caseops/manifest.json ]; then
  "$py" -m pgolf.tools.prepare --input "$sample" --out data/fineweb_sample_caseops --name fineweb --caseops \
    --tokenizer "$tok/$caseops_model" --val-docs 100
  cp "$tok/$caseops_model" data/fineweb_sample_caseops/
fi

# wheels for CPython 3.12 on x86-64 (the GPU machine's Python); python-minifier: train.py packs its experiment
ls .whl/hydra_core-*.whl >/dev/null 2>&1 || bash "$shared/device/wheels.sh" python-minifier==3.4.0
if [ ! -d .whl/deb ] && command -v apt-get >/dev/null 2>&1; then
  mkdir -p .whl/deb
  (cd .whl/deb && apt-get download lrzip liblzo2-2 liblz4-1 >/dev/null 2>&1) || echo "lrzip .debs not downloaded: pergroup needs lrzip there"
fi
du -sh data/fineweb_sample data/fineweb_sample_caseops .whl
du -scb data/fineweb_sample data/fineweb_sample_caseops .whl | tail -n 1 |
  awk '{printf "carry: %.1f MiB of the 64 MiB a device call takes (with the tracked tree)\n", $1 / 1048576}'
