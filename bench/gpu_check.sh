#!/usr/bin/env bash
# The daily regression's device check, on a machine with one CUDA device (issue H).
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: gpu_check_out/
#
# One short, prepared run: every step under its own timeout, every output under OUT_DIR
# (emptied first, so a rerun never reads a former run's files), a summary line per step
# in OUT_DIR/summary.txt. Its timeouts add up to 8.25 minutes:
#   env              nvidia-smi and the torch / CUDA / NCCL versions
#   doctor           hardening doctor
#   nccl1            hardening suite all on profiles/gpu1-nccl.yaml: one rank, NCCL, bf16,
#                    inductor (the cases that need no peer)
#   gloo2-compile    hardening suite compile, then operator, on profiles/gpu2-gloo-cuda.yaml:
#   gloo2-operator   two ranks on the one GPU, gloo with CUDA tensors, bf16, inductor
#   overhead         bench/overhead.py at the h200 profile's region size on one NCCL rank:
#                    the runtime's per-call cost against a GPU-sized region (ratios in one run)
# Two-rank NCCL needs two GPUs: what one GPU cannot run is said in the README ("On a GPU").
#
# On a machine without CUDA it says so in one line and exits 0, running nothing.
set -uo pipefail

OUT=${1:-gpu_check_out}
PY=${PYTHON:-python}

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device visible here (torch.cuda.is_available() is False): nothing run"
  exit 0
fi

rm -rf "$OUT"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"

# step NAME LIMIT_S COMMAND...: run COMMAND with its output in OUT/NAME.log, bounded by
# LIMIT_S (SIGTERM, then SIGKILL 15 s later: the runner tears its ranks down on SIGTERM).
step() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  echo "gpu_check: $name (at most ${limit}s) ..."
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="exit $rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then how="TIMED OUT after ${limit}s"; fi
  echo "$name: $how, $((SECONDS - started))s, log $OUT/$name.log" | tee -a "$SUMMARY"
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"device\", torch.cuda.get_device_name(0))'"
step doctor 45 hardening doctor
step nccl1 100 hardening suite all --profile gpu1-nccl --json "$OUT/nccl1.json" --junit "$OUT/nccl1.xml" --artifacts "$OUT/runs-nccl1"
for suite in compile operator; do
  step "gloo2-$suite" 100 hardening suite "$suite" --profile gpu2-gloo-cuda \
    --json "$OUT/gloo2-$suite.json" --junit "$OUT/gloo2-$suite.xml" --artifacts "$OUT/runs-gloo2-$suite"
done
step overhead 120 "$PY" "$(dirname "$0")/overhead.py" --device cuda --dist-backend nccl --ranks 1 --dtype bfloat16 \
  --backend inductor --hidden 1024 --heads 16 --tokens 256 --cache 1024 --mlp 4096 --calls 20 --repeats 20 --timeout 110

echo "gpu_check: done; every output under $OUT (summary: $SUMMARY)"
