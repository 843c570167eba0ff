#!/usr/bin/env bash
# The daily regression's device check, on a machine with one CUDA device (issue H).
#
#   bash bench/gpu_check.sh [OUT_DIR [STEP ...]]      # default OUT_DIR: gpu_check_out/
#
# One short, prepared run: every step under its own timeout, every output under OUT_DIR,
# one line per step in OUT_DIR/summary.txt. With no STEP every step runs and OUT_DIR is
# emptied first (only a former gpu_check output, or an empty folder, is ever emptied); with
# STEPs only those run, and their files are replaced: a step that timed out is rerun by name.
# Steps, with their timeouts (10.5 minutes in all at most; a step is killed 15 s after its
# SIGTERM, which the runner answers by tearing its ranks down):
#   env              20 s   nvidia-smi and the torch / CUDA / NCCL versions
#   doctor           30 s   hardening doctor
#   nccl1           150 s   suite all on profiles/gpu1-nccl.yaml: one rank, NCCL, bf16,
#                           inductor (the cases that need no peer)
#   gloo2-compile   150 s   suite compile on profiles/gpu2-gloo-cuda.yaml: two ranks on the
#                           one GPU, gloo with CUDA tensors, bf16, inductor
#   gloo2-operator  150 s   the operator cases that need a peer, on the same profile
#   overhead        120 s   bench/overhead.py at the h200 region size on one NCCL rank: the
#                           runtime's per-call cost against a GPU-sized region
# Two-rank NCCL needs two GPUs: what one GPU cannot run is said in the README ("On a GPU").
#
# Exit 0 when every step exited 0; 1 when one did not (or the machine has a GPU that this
# torch cannot use: a CPU build); on a machine without any GPU it says so in one line and
# exits 0, running nothing.
set -uo pipefail

OUT=${1:-gpu_check_out}
shift $(($# > 0 ? 1 : 0))
PY=${PYTHON:-python}
ALL=(env doctor nccl1 gloo2-compile gloo2-operator overhead)
STEPS=("$@")

for s in "${STEPS[@]}"; do
  case " ${ALL[*]} " in *" $s "*) ;; *) echo "gpu_check: unknown step '$s' (steps: ${ALL[*]})" >&2; exit 1 ;; esac
done

gpu_present=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then gpu_present=1; fi
torch_cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()), torch.__version__, torch.version.cuda)' 2>&1 | tail -1)
if [ "${torch_cuda%% *}" != 1 ]; then
  if [ "$gpu_present" = 0 ]; then
    echo "gpu_check: no CUDA device visible here (no GPU for nvidia-smi, torch.cuda.is_available() is False): nothing run"
    exit 0
  fi
  echo "gpu_check: a GPU is present but this torch cannot use it (torch.cuda.is_available, version, cuda: $torch_cuda): install a CUDA build" >&2
  exit 1
fi

if [ ${#STEPS[@]} -eq 0 ]; then
  STEPS=("${ALL[@]}")
  if [ -d "$OUT" ] && [ -n "$(ls -A "$OUT")" ] && [ ! -f "$OUT/summary.txt" ]; then
    echo "gpu_check: $OUT holds files that are not a gpu_check output: refusing to empty it (name another OUT_DIR)" >&2
    exit 1
  fi
  rm -rf "$OUT"
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
HERE=$(cd "$(dirname "$0")" && pwd)
failed=0

# run NAME LIMIT_S COMMAND...: COMMAND's output in OUT/NAME.log, bounded by LIMIT_S.
run() {
  local name=$1 limit=$2
  shift 2
  local started=$SECONDS
  rm -rf "$OUT/$name".* "$OUT/runs-$name"
  echo "gpu_check: $name (at most ${limit}s) ..."
  timeout -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  local how="exit $rc"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then how="TIMED OUT after ${limit}s"; fi
  if [ "$rc" -ne 0 ]; then failed=1; fi
  echo "$name: $how, $((SECONDS - started))s, log $OUT/$name.log" | tee -a "$SUMMARY"
}

suite() {  # suite NAME LIMIT_S SUITE PROFILE [ARGS...]
  local name=$1 limit=$2 which=$3 profile=$4
  shift 4
  run "$name" "$limit" "$PY" -m hardening suite "$which" --profile "$profile" \
    --json "$OUT/$name.json" --junit "$OUT/$name.xml" --artifacts "$OUT/runs-$name" "$@"
}

for s in "${STEPS[@]}"; do
  case $s in
    env) run env 20 bash -c "nvidia-smi; $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"nccl\", torch.cuda.nccl.version(), \"device\", torch.cuda.get_device_name(0))'" ;;
    doctor) run doctor 30 "$PY" -m hardening doctor ;;
    nccl1) suite nccl1 150 all gpu1-nccl ;;
    gloo2-compile) suite gloo2-compile 150 compile gpu2-gloo-cuda ;;
    gloo2-operator) suite gloo2-operator 150 operator gpu2-gloo-cuda --only OM-00,OM-04,OM-05,OM-11,OM-12,OM-13,H-01,K-01 ;;
    overhead) run overhead 120 "$PY" "$HERE/overhead.py" --device cuda --dist-backend nccl --ranks 1 --dtype bfloat16 \
      --backend inductor --hidden 1024 --heads 16 --tokens 256 --cache 1024 --mlp 4096 --calls 20 --repeats 20 --timeout 110 ;;
  esac
done

echo "gpu_check: done ($([ $failed = 0 ] && echo 'every step exited 0' || echo 'a step failed')); every output under $OUT (summary: $SUMMARY)"
exit $failed
