#!/usr/bin/env bash
# compute-sanitizer over a small forward and backward of every CUDA kernel (needs a GPU and a
# build with the CUDA extension): memcheck (out-of-bounds and misaligned global/shared
# accesses), racecheck (shared-memory hazards between cp.async, ldmatrix and barriers),
# synccheck (barrier misuse) and initcheck (reads of uninitialised global memory).
#
#   csrc/cuda/sanitize.sh [OUT_DIR]      # reports in OUT_DIR (default: $OUT or .)
#
# SANITIZE_TOOLS picks the checks (default "memcheck racecheck synccheck initcheck"). A trimmed
# build (ATTNKERN_CUDA_HDIMS / _DTYPES) skips the calls it cannot serve, and says so.
# SANITIZE_ECHO=1 prints each report whole (its first 400 kB) instead of its last lines.
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
for check in ${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
  echo "== $check"
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$check" --error-exitcode 1 --print-limit 20 \
    ${PYTHON:-python} "$repo/csrc/cuda/sanitize_workload.py" \
    > "$out/sanitize_$check.log" 2>&1
  rc=$?
  if [[ "${SANITIZE_ECHO:-0}" == 1 ]]; then head -c 400000 "$out/sanitize_$check.log"; else tail -n 3 "$out/sanitize_$check.log"; fi
  echo "$check exit=$rc" | tee -a "$out/sanitize_summary.txt"
  [[ $rc -ne 0 ]] && status=1
done
exit $status
