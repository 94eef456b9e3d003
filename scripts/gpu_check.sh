#!/usr/bin/env bash
# Build attnkern, run the GPU tests and the GPU benchmarks on a machine with an NVIDIA GPU
# (no network needed), and leave a log, the test report and the benchmark JSON in one folder.
#
#   scripts/gpu_check.sh [OUT_DIR] [--phase all|build|test|bench] [--quick] [--only dense|window]
#
# OUT_DIR defaults to $OUT. Phases run in order; a failing phase is reported and the next one
# still runs, and the exit status is non-zero if any phase failed. The phases can be run in
# separate calls (build first) when one call has a time limit.
#
# Environment: TORCH_CUDA_ARCH_LIST (default: the GPU's arch, 9.0a on Hopper),
# ATTNKERN_CUDA_HDIMS (head dims the CUDA extension instantiates, default 64,128),
# MAX_JOBS (default: number of CPUs), PYTHON (default: python).
set -euo pipefail

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

out_dir="${OUT:-}"
phase="all"
bench_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --phase) phase="${2:?--phase needs a value: all, build, test or bench}"; shift 2 ;;
    --quick) bench_args+=(--quick); shift ;;
    --only) bench_args+=(--only "${2:?--only needs dense or window}"); shift 2 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) out_dir="$1"; shift ;;
  esac
done
case "$phase" in all|build|test|bench) ;; *) echo "gpu_check: --phase must be all, build, test or bench" >&2; exit 2 ;; esac
if [[ -z "$out_dir" ]]; then
  echo "gpu_check: give an output folder as the argument or in \$OUT" >&2
  exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
log="$out_dir/gpu_check.log"
summary="$out_dir/gpu_check_summary.txt"
py="${PYTHON:-python}"
cd "$repo"

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

# run_phase NAME CMD...: runs CMD with its output in the log, records the status, never exits
failed=0
run_phase() {
  local name="$1"; shift
  say "phase $name: $*"
  local start=$SECONDS rc
  set +e
  "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  say "phase $name: exit $rc after $((SECONDS - start)) s"
  echo "$name exit=$rc seconds=$((SECONDS - start))" >> "$summary"
  if [[ $rc -ne 0 ]]; then failed=1; fi
}

say "repo $repo, output $out_dir, phase $phase"
if ! command -v nvidia-smi > /dev/null 2>&1; then
  say "nvidia-smi not found: this script needs a machine with an NVIDIA GPU"
  exit 3
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee -a "$log"
if ! "$py" - <<'EOF' 2>&1 | tee -a "$log"; then
import sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError:
    print("triton missing: the Triton backend cannot run")
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
p = torch.cuda.get_device_properties(0)
print(f"device {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs")
EOF
  say "torch cannot use the GPU; stopping"
  exit 3
fi

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  TORCH_CUDA_ARCH_LIST="$("$py" -c 'import torch; a, b = torch.cuda.get_device_capability(0); print(f"{a}.{b}" + ("a" if a == 9 else ""))')"
fi
export TORCH_CUDA_ARCH_LIST
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [[ -d csrc/cuda ]]; then
  export ATTNKERN_CUDA_HDIMS="${ATTNKERN_CUDA_HDIMS:-64,128}"
fi

if [[ "$phase" == all || "$phase" == build ]]; then
  say "TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS ATTNKERN_CUDA_HDIMS=${ATTNKERN_CUDA_HDIMS:-n/a}"
  run_phase build "$py" -m pip install --no-build-isolation --no-deps -e .
  "$py" -c 'import attnkern; print("attnkern", attnkern.__version__, "from", attnkern.__file__);
print("backends for CUDA tensors:", attnkern.available_backends("cuda"))' 2>&1 | tee -a "$log" || failed=1
fi

if [[ "$phase" == all || "$phase" == test ]]; then
  # one autotune candidate per kernel: the tests check correctness, and every specialisation
  # would otherwise compile each candidate
  run_phase test env ATTNKERN_TRITON_AUTOTUNE=0 "$py" -m pytest tests -m gpu -q -rfE -p no:cacheprovider \
    --junitxml="$out_dir/gpu_tests.xml"
fi

if [[ "$phase" == all || "$phase" == bench ]]; then
  run_phase bench "$py" benchmarks/gpu_bench.py --out "$out_dir" ${bench_args[@]+"${bench_args[@]}"}
fi

say "summary: $(tr '\n' ';' < "$summary")"
if [[ $failed -ne 0 ]]; then
  say "some phase failed; see $log"
  exit 1
fi
say "all phases passed; results in $out_dir"
