#!/usr/bin/env bash
# Everything that needs a GPU, in one go, on a lent GPU machine as it is (no network):
#   1. install kernelrl in place (builds the CUDA extension);
#   2. run the test suite (gpu-marked tests run when a GPU is present);
#   3. kernelrl tune --device cuda: benchmarks/results/tune-<gpu-name-slug>-<YYYY-MM-DD>.json
#      (the dispatch table's measurements; a failure here is reported, not fatal). It also
#      writes the user's tuned file, so the benchmarks' plain "kernelrl" row below is what
#      dispatch picks after `kernelrl tune` (kernelrl[native], kernelrl[triton] and
#      kernelrl[torch] are each backend forced);
#   4. run every benchmark family (advantages, logprobs, moe, nf4, ppo_loss, steps: every
#      benchmarks/bench_<family>.py) at the target shapes, in two passes so that the fast one
#      comes back first: every implementation but torch.compile, then torch.compile (whose
#      first compile of a long unrolled loop can take minutes); merged into one JSON,
#      benchmarks/results/<gpu-name-slug>-<YYYY-MM-DD>.json;
#   5. with "$OUT" set, the logs are written there as they grow and each result is copied
#      there as soon as it exists, so a run cut short still returns what it finished.
# It goes on to the benchmarks when the install or some tests fail, and exits non-zero at
# the end if the install, the tests or the benchmarks failed.
#
# Knobs (environment): SKIP_INSTALL=1, SKIP_TESTS=1, SKIP_TUNE=1, SKIP_COMPILE=1,
# COMPILE_FAMILIES="logprobs ppo_loss" (the families of the torch.compile pass; default all),
# BENCH_ARGS="--cases token" (extra arguments for run.py), PYTEST_ARGS="-m gpu -n 8" (extra
# pytest arguments), and time limits in seconds per stage: INSTALL_TIMEOUT (300),
# TESTS_TIMEOUT (1200), TUNE_TIMEOUT (600), BENCH_TIMEOUT (900, each pass). Wheels placed in
# .whl/ (for example liger-kernel, to compare against Liger; bitsandbytes and peft for the
# nf4 family's bnb, bnb_linear4bit and bnb_peft rows) are installed offline first. The moe
# family's hf_eager and hf_grouped_mm rows need transformers 5 (MixtralExperts).
set -euo pipefail

cd "$(dirname "$0")/.."
REPO="$(pwd)"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
STAMP="$(date +%F)"
WORK="$(mktemp -d /tmp/kernelrl-gpu-check.XXXXXX)"
LOGS="${OUT:-$WORK/logs}"
mkdir -p "$LOGS" benchmarks/results
failed=()

echo "== environment" | tee "$LOGS/env.log"
{
  "$PY" --version
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
  command -v nvcc >/dev/null && nvcc --version | tail -n 2 || echo "nvcc not found"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  git -C "$REPO" rev-parse HEAD 2>/dev/null || echo "git sha unknown"
} 2>&1 | tee -a "$LOGS/env.log"

if compgen -G ".whl/*.whl" >/dev/null; then
  echo "== installing carried wheels from .whl/ (offline)"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/kernelrl-site .whl/*.whl; then
    export PYTHONPATH="/tmp/kernelrl-site${PYTHONPATH:+:$PYTHONPATH}"
  else
    failed+=("wheels")
  fi
fi

if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  echo "== install (builds the CUDA extension)"
  set +e
  timeout "${INSTALL_TIMEOUT:-300}" "$PY" -m pip install --no-deps --no-build-isolation -e . 2>&1 \
    | tee "$LOGS/install.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 ]]; then
    echo "!! install failed (rc=$rc); going on with the repo on PYTHONPATH"
    failed+=("install")
  fi
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  echo "== tests"
  set +e
  # shellcheck disable=SC2086
  timeout "${TESTS_TIMEOUT:-1200}" "$PY" -m pytest -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
    | tee "$LOGS/tests.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 ]]; then
    echo "!! tests failed (rc=$rc); going on to the benchmarks"
    failed+=("tests")
  fi
fi

SLUG="$("$PY" benchmarks/common.py gpu-slug)"
RESULT="benchmarks/results/${SLUG}-${STAMP}.json"
TUNED="benchmarks/results/tune-${SLUG}-${STAMP}.json"

save() {  # copy a finished result into $OUT at once
  [[ -n "${OUT:-}" && -f "$1" ]] && cp "$1" "$OUT/" || true
}

if [[ "${SKIP_TUNE:-0}" != "1" ]]; then
  echo "== kernelrl tune --device cuda"
  set +e
  timeout "${TUNE_TIMEOUT:-600}" "$PY" -m kernelrl tune --device cuda --out "$TUNED" 2>&1 \
    | tee "$LOGS/tune.log"
  rc=${PIPESTATUS[0]}
  set -e
  # The dispatch table is seeded from this file later; a failure is worth reading, but the
  # benchmarks stand without it, so it does not fail the check.
  if [[ $rc -ne 0 ]]; then
    echo "!! kernelrl tune exited $rc (not counted as a failure; see tune.log)"
  else
    echo "== wrote $TUNED"; save "$TUNED"
  fi
fi

bench_pass() {  # bench_pass NAME JSON IMPLS [FAMILY...]: one run.py --full pass, its own log
  local name="$1" json="$2" impls="$3" rc
  shift 3
  echo "== benchmarks, $name (run.py --full --device cuda --impls $impls)"
  set +e
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-900}" "$PY" benchmarks/run.py "$@" --full --device cuda \
    --impls "$impls" --out "$json" ${BENCH_ARGS:-} 2>&1 | tee "$LOGS/bench-$name.log"
  rc=${PIPESTATUS[0]}
  set -e
  if [[ $rc -ne 0 || ! -f "$json" ]]; then
    echo "!! benchmarks ($name) exited $rc" | tee -a "$LOGS/bench-$name.log"
    return 1
  fi
}

parts=()
KERNEL_IMPLS="kernelrl,kernelrl[native],kernelrl[triton],kernelrl[torch],eager,torch_chunked,liger"
KERNEL_IMPLS+=",dense,bnb,bnb_linear4bit,bnb_peft"   # the nf4 family's peers
KERNEL_IMPLS+=",hf_eager,hf_grouped_mm,einsum"      # the moe family's (dense too)
if bench_pass kernels "$WORK/bench-kernels.json" "$KERNEL_IMPLS"; then
  parts+=("$WORK/bench-kernels.json")
  cp "$WORK/bench-kernels.json" "$RESULT"; save "$RESULT"
else
  failed+=("benchmarks")
fi
if [[ "${SKIP_COMPILE:-0}" != "1" ]]; then
  # shellcheck disable=SC2086
  if bench_pass compile "$WORK/bench-compile.json" "compile" ${COMPILE_FAMILIES:-}; then
    parts+=("$WORK/bench-compile.json")
  else
    failed+=("benchmarks-compile")
  fi
fi
if [[ ${#parts[@]} -gt 1 ]]; then
  "$PY" benchmarks/common.py merge "$RESULT" "${parts[@]}" && save "$RESULT"
fi
[[ -f "$RESULT" ]] && echo "== wrote $RESULT"

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "== FAILED: ${failed[*]}"
  exit 1
fi
echo "== all passed"
