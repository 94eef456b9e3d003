#!/usr/bin/env bash
# The GPU check of attnkern, on a machine with an NVIDIA GPU and no network: build, GPU tests,
# GPU benchmarks, compute-sanitizer. Logs and results go to one folder.
#
#   scripts/gpu_check.sh [OUT_DIR] --phase PHASE [--preset NAME] [--dry-run] [-- ARGS...]
#
# OUT_DIR defaults to $OUT. PHASE is one of
#   build     python setup.py build_ext --inplace: the CPU and CUDA extensions, every head dim,
#             for this GPU's arch; a CUDA extension that cannot be built fails the phase
#   test      pytest -m gpu over tests/ (the Triton and the CUDA GPU tests); ARGS replace
#             "tests", e.g. -- tests/test_cuda.py
#   bench     python -m attnkern bench --gpu-dense, --gpu-window, --gpu-decode (only --preset
#             NAME if given) with ARGS added, e.g. -- --where mode=bwd (attnkern bench --help):
#             OUT_DIR/gpu-<card>-<preset>-<UTC date and time>.json and plots/<same stem>/, the
#             JSON rewritten after every case (forwards come first). Copy both into
#             benchmarks/results/ and run python benchmarks/make_results.py
#   sanitize  csrc/cuda/sanitize.sh OUT_DIR (memcheck, racecheck, synccheck, initcheck)
#   all       the four, in this order
# --dry-run prints the commands without running them (no GPU needed).
#
# Where one command may run 10 minutes and a session has about 30, call the phases one at a
# time, back to back (the machine keeps the in-place build only while it stays warm):
#   1. scripts/gpu_check.sh "$OUT" --phase build                   # about 1 min on 16 cores
#   2. scripts/gpu_check.sh "$OUT" --phase test                    # cut off? split it:
#        ... --phase test -- tests/test_triton_gpu.py, then ... --phase test -- tests/test_cuda.py
#   3. scripts/gpu_check.sh "$OUT" --phase bench --preset gpu-dense
#   4. scripts/gpu_check.sh "$OUT" --phase bench --preset gpu-window
#   5. scripts/gpu_check.sh "$OUT" --phase bench --preset gpu-decode
#   6. scripts/gpu_check.sh "$OUT" --phase sanitize
# Each phase stops itself after PHASE_TIMEOUT seconds (default 540), so its log and summary are
# written inside a 10-minute limit; a bench stopped that way keeps the cases it finished (its
# JSON says how many) and the rest can follow in another call, e.g.
#   scripts/gpu_check.sh "$OUT" --phase bench --preset gpu-window -- --where mode=bwd
# How long test, bench and sanitize take on a GPU is not known yet: no GPU run so far.
# On an H100/H200 (compute capability 9.0, build with 9.0a) the Hopper wgmma/TMA kernels, opt-in
# with ATTNKERN_CUDA_WGMMA=1 until verified, come along by themselves: tests/test_cuda.py's
# test_gpu_wgmma_parity sets the switch and checks with the profiler that they ran, the bench
# adds the subject attnkern-cuda-wgmma next to attnkern-cuda, and the sanitize workload runs its
# fast-path calls once more through them. Once they pass, make them the default in
# csrc/cuda/dispatch.cu (wgmma_enabled).
#
# Environment: TORCH_CUDA_ARCH_LIST (default: this GPU's arch, 9.0a on Hopper), MAX_JOBS
# (default: nproc), PYTHON (default: python), PHASE_TIMEOUT.
set -euo pipefail

usage() { sed -n '2,/^$/p' "$0" | sed -e '/^set /,$d' -e 's/^# \{0,1\}//'; }

out_dir="${OUT:-}"
phase=""
presets=(gpu-dense gpu-window gpu-decode)
dry_run=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --phase) phase="${2:?--phase needs a value}"; shift 2 ;;
    --preset) presets=("${2:?--preset needs a value}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) out_dir="$1"; shift ;;
  esac
done
case "$phase" in
  build|test|bench|sanitize) phases=("$phase") ;;
  all) phases=(build test bench sanitize) ;;
  *) echo "gpu_check: --phase must be build, test, bench, sanitize or all (got '${phase}')" >&2; exit 2 ;;
esac
if [[ "$phase" == all && ${#extra[@]} -gt 0 ]]; then
  echo "gpu_check: arguments after -- go to one phase's command; give --phase test or bench" >&2; exit 2
fi
for p in "${presets[@]}"; do
  case "$p" in gpu-dense|gpu-window|gpu-decode) ;; *) echo "gpu_check: unknown --preset $p" >&2; exit 2 ;; esac
done
[[ -n "$out_dir" ]] || { echo "gpu_check: give an output folder as the argument or in \$OUT" >&2; exit 2; }

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$out_dir"
out_dir="$(cd "$out_dir" && pwd)"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # the in-place build, whatever else is installed
py="${PYTHON:-python}"
log="$out_dir/gpu_check.log"
failed=0

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }

# run NAME CMD...: the command under the phase timeout, output into the log, status into the
# summary; a failure is recorded, never fatal
run() {
  local name="$1"; shift
  say "$name: $*"
  [[ $dry_run -eq 1 ]] && return 0
  local start=$SECONDS rc
  set +e
  timeout --kill-after=20 "${PHASE_TIMEOUT:-540}" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  set -e
  [[ $rc -eq 124 ]] && say "$name: stopped after PHASE_TIMEOUT=${PHASE_TIMEOUT:-540} s"
  say "$name: exit $rc after $((SECONDS - start)) s"
  echo "$name exit=$rc seconds=$((SECONDS - start))" >> "$out_dir/gpu_check_summary.txt"
  [[ $rc -eq 0 ]] || failed=1
}

if [[ $dry_run -eq 1 ]]; then
  card="card" arch="${TORCH_CUDA_ARCH_LIST:-<GPU arch>}"
else
  if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    say "torch sees no CUDA device; nvidia-smi says: $(nvidia-smi -L 2>&1 | head -n 3)"
    exit 3
  fi
  read -r card arch < <("$py" -c 'import re, torch
major, minor = torch.cuda.get_device_capability(0)
name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
print(name, f"{major}.{minor}" + ("a" if major == 9 else ""))')
  arch="${TORCH_CUDA_ARCH_LIST:-$arch}"
  say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -n 1); torch $("$py" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
fi

for p in "${phases[@]}"; do
  case "$p" in
    build)
      run build env ATTNKERN_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
        "$py" setup.py build_ext --inplace
      run build-info "$py" -c 'import attnkern; print("attnkern", attnkern.__version__, attnkern.__file__,
"backends for CUDA tensors:", attnkern.available_backends("cuda"))' ;;
    test)
      # one autotune candidate per Triton kernel: the tests check correctness, and tuning would
      # compile every candidate of every specialisation
      targets=(tests)
      [[ ${#extra[@]} -gt 0 ]] && targets=("${extra[@]}")
      run test env ATTNKERN_TRITON_AUTOTUNE=0 "$py" -m pytest "${targets[@]}" -m gpu -q -rfE \
        -p no:cacheprovider --junitxml="$out_dir/gpu_tests-$(date -u +%H%M%S).xml" ;;
    bench)
      for preset in "${presets[@]}"; do
        stem="gpu-$card-${preset#gpu-}-$(date -u +%Y-%m-%d-%H%M)"
        run "bench $preset" "$py" -m attnkern bench "--$preset" --device cuda --no-progress \
          --json "$out_dir/$stem.json" --plot "$out_dir/plots/$stem" ${extra[@]+"${extra[@]}"}
      done ;;
    sanitize)
      if [[ -x csrc/cuda/sanitize.sh ]]; then
        run sanitize csrc/cuda/sanitize.sh "$out_dir"
      else
        say "sanitize: csrc/cuda/sanitize.sh not found; skipped"
      fi ;;
  esac
done

if [[ $failed -ne 0 ]]; then
  say "a phase failed or was stopped; see $log"
  exit 1
fi
say "done; results in $out_dir"
