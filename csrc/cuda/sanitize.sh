#!/usr/bin/env bash
# compute-sanitizer over a small forward and backward of every CUDA kernel (needs a GPU and a
# build with the CUDA extension): memcheck (out-of-bounds and misaligned global/shared
# accesses), racecheck (shared-memory hazards between cp.async, ldmatrix and barriers),
# synccheck (barrier misuse) and initcheck (reads of uninitialised global memory).
#
#   csrc/cuda/sanitize.sh [OUT_DIR]      # reports in OUT_DIR (default: $OUT or .)
#
# The caching allocator is switched off so memcheck sees each tensor's real bounds.
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
out="${1:-${OUT:-.}}"
mkdir -p "$out"
tool="$(command -v compute-sanitizer || true)"
for home in "${CUDA_HOME:-}" /usr/local/cuda /usr/local/cuda-13.0; do
  [[ -z "$tool" && -n "$home" && -x "$home/bin/compute-sanitizer" ]] && tool="$home/bin/compute-sanitizer"
done
if [[ -z "$tool" ]]; then
  echo "sanitize: compute-sanitizer not found (CUDA toolkit bin/)" >&2
  exit 2
fi
status=0
for check in memcheck racecheck synccheck initcheck; do
  echo "== $check"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$check" --error-exitcode 1 --print-limit 20 \
    ${PYTHON:-python} "$repo/csrc/cuda/sanitize_workload.py" \
    > "$out/sanitize_$check.log" 2>&1
  rc=$?
  tail -n 3 "$out/sanitize_$check.log"
  echo "$check exit=$rc" | tee -a "$out/sanitize_summary.txt"
  [[ $rc -ne 0 ]] && status=1
done
exit $status
