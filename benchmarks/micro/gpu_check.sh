#!/usr/bin/env bash
# Issue 18's GPU check as one prepared script: profile_exit.py's realization table (batch sizes 1 and 32) on CUDA,
# timed with CUDA events, once deciding after every layer (a host sync per layer) and once one layer late.
#
#   here, once (it has the data and the MiniLM package):   bash benchmarks/micro/gpu_check.sh prepare
#   on the lent GPU machine (device run, carry .gpu-kit):  bash benchmarks/micro/gpu_check.sh run
#
# Why a kit: that machine has torch, transformers and pandas but no network, no eebench, no MiniLM package and
# no ../shared/data. `prepare` copies into .gpu-kit/ (git-ignored through .git/info/exclude) MiniLM's config and
# tokenizer, not its 87 MB of weights (the working tree that travels is capped at 64 MiB; profile_exit.py
# --architecture builds random weights of that shape, and the time does not depend on them), and SST-2's dev split.
# `run` installs eebench without its dependencies and writes its logs under $OUT (default ./gpu-check-out).
# Arguments after `run` go to profile_exit.py (later ones win), e.g. `run --examples 4 --rounds 1` to smoke-test;
# DEVICE=cpu PYTHON=.venv/bin/python runs the same steps here.
set -euo pipefail
cd "$(dirname "$0")/../.."
kit=${GPU_KIT:-.gpu-kit}  # another folder (the test's) is not added to .git/info/exclude
python=${PYTHON:-python3}
command=${1:-}
shift || true
case "$command" in
prepare)
  data=${1:-../shared/data/glue}
  python=${PYTHON:-.venv/bin/python}
  model=$("$python" -c "from eebench.backbones import minilm_path; print(minilm_path())")
  rm -rf "$kit"
  mkdir -p "$kit/minilm/1_Pooling" "$kit/glue/SST-2" .git/info
  for file in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt modules.json; do
    cp "$model/$file" "$kit/minilm/"
  done
  cp "$model/1_Pooling/config.json" "$kit/minilm/1_Pooling/"
  cp "$data/SST-2/dev.tsv" "$kit/glue/SST-2/"
  if [ "$kit" = .gpu-kit ]; then
    grep -qxF "/$kit/" .git/info/exclude 2>/dev/null || echo "/$kit/" >>.git/info/exclude
  fi
  du -sh "$kit"
  ;;
run)
  [ -d "$kit/minilm" ] || { echo "no $kit: run '$0 prepare' first and carry $kit" >&2; exit 2; }
  out=${OUT:-gpu-check-out}
  site=$(mktemp -d)
  trap 'rm -rf "$site"' EXIT
  mkdir -p "$out"
  "$python" -m pip install -q --no-deps --no-build-isolation --target "$site" .
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv 2>/dev/null || true
    "$python" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  } | tee "$out/machine.txt"
  for decision in now late; do
    "$python" benchmarks/micro/profile_exit.py --architecture "$kit/minilm" --task sst2 --data-dir "$kit/glue" \
      --examples 64 --batch-sizes 1 32 --rounds 5 --no-profile --device "${DEVICE:-cuda}" \
      --exit-decision "$decision" "$@" 2>&1 | tee "$out/profile-$decision.log"
  done
  ;;
*)
  echo "usage: $0 prepare [GLUE_DIR] | run [profile_exit.py arguments]" >&2
  exit 2
  ;;
esac
