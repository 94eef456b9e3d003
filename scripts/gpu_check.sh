#!/usr/bin/env bash
# The GPU check of attnkern, on a machine with an NVIDIA GPU and no network: build, GPU tests,
# GPU benchmarks, compute-sanitizer. Logs and results go to one folder.
#
#   scripts/gpu_check.sh [OUT_DIR] --phase PHASE [--preset NAME] [--dry-run] [--cpu-selftest] [-- ARGS...]
#
# OUT_DIR defaults to $OUT. The two timed phases are one command each and end inside
# GPU_CHECK_TOTAL_S seconds (default 500: a 9-minute call with margin):
#   first-run  (a) build only what is tested: sm_90a, bf16, head dims 64 and 128, MAX_JOBS=nproc
#              (b) smoke parity in bf16 against float64, pytest -x with per-test timeouts, one
#                  pytest per family: Triton fwd+bwd; CUDA sm80 fwd+bwd and split-KV decode;
#                  Hopper wgmma/TMA fwd+bwd (ATTNKERN_CUDA_WGMMA=1, the profiler checks they ran)
#              (c) short benchmark: attnkern bench --gpu-first (head dim 128 bf16, L = 4k, 16k,
#                  causal and not, fwd and fwd+bwd against the fastest torch SDPA kernel; decode
#                  L=1 S=32k GQA 8:1 against a copy's bandwidth), then window 1024 at L = 32k
#                  against FlexAttention (--gpu-window --where head_dim=128 len_q=32768 mode=fwd);
#                  Triton untuned (ATTNKERN_TRITON_AUTOTUNE=0) to save its compiles for the tests
#              (d) the rest of the GPU tests (-m gpu), then the CPU tests, with the time left
#   follow-up  the same build, compute-sanitizer memcheck and racecheck on small cases
#              (csrc/cuda/sanitize_workload.py), then --gpu-decode, --gpu-window, the full --gpu-dense,
#              Triton autotuned
# Every step runs under its own time guard (min of its budget and the time left) and, as soon as
# it ends, adds its status, duration, test outcomes (from junit) or bench cases to
# OUT_DIR/gpu_check-PHASE.json; all output goes to OUT_DIR/gpu_check-PHASE.log; each bench
# writes OUT_DIR/bench-*.json after every case. A step cut off by its guard gets SIGINT first, so
# pytest still writes its results. So a command stopped at its limit returns all that finished,
# in at most 5 files (the device tool returns 8). The last lines printed are a table of the steps.
# Budgets (seconds): GPU_CHECK_BUDGET_<STEP> overrides one (BUILD, SMOKE_TRITON, BENCH_FIRST, ...);
# GPU_CHECK_ONLY=build,bench-first runs only the steps named (the others are recorded as skipped).
#
# Through the device tool (one call, then give the machine back; the H200 has no network):
#   run(command='scripts/gpu_check.sh "$OUT" --phase first-run', timeout_s=540), then give_back
#   later, on a fresh machine: run(command='scripts/gpu_check.sh "$OUT" --phase follow-up', timeout_s=540)
# Read the JSON before spending more GPU time. Copy bench-*.json into benchmarks/results/ and run
# python benchmarks/make_results.py.
#
# --dry-run prints every step's command and budget without running anything. --cpu-selftest
# runs a timed phase on a machine without a GPU to prove its bookkeeping: the build is replaced
# by an import of the in-place build, the smoke and test selections run (their GPU tests skip,
# but a renamed test fails the step), the benchmarks run their scaled-down CPU grids (tested in
# tests/test_gpu_check.py).
#
# The single phases, for a longer session (each stops itself after PHASE_TIMEOUT seconds,
# default 540; they write gpu_check.log and gpu_check_summary.txt):
#   build     python setup.py build_ext --inplace: the CPU and CUDA extensions, every head dim,
#             for this GPU's arch; a CUDA extension that cannot be built fails the phase
#   test      pytest -m gpu over tests/; ARGS replace "tests", e.g. -- tests/test_cuda.py
#   bench     python -m attnkern bench --gpu-dense, --gpu-window, --gpu-decode (only --preset
#             NAME if given) with ARGS added, e.g. -- --where mode=bwd (attnkern bench --help):
#             OUT_DIR/gpu-<card>-<preset>-<UTC date and time>.json and plots/<same stem>/
#   sanitize  csrc/cuda/sanitize.sh OUT_DIR (memcheck, racecheck, synccheck, initcheck)
#   all       the four, in this order
# On an H100/H200 the Hopper wgmma/TMA kernels are opt-in with ATTNKERN_CUDA_WGMMA=1 until
# verified; once they pass, make them the default in csrc/cuda/dispatch.cu (wgmma_enabled).
#
# Environment: TORCH_CUDA_ARCH_LIST (default: this GPU's arch, 9.0a on Hopper), MAX_JOBS
# (default: nproc), PYTHON (default: python, else python3), PHASE_TIMEOUT, GPU_CHECK_TOTAL_S.
set -euo pipefail

usage() { sed -n '2,/^$/p' "$0" | sed -e '/^set /,$d' -e 's/^# \{0,1\}//'; }

out_dir="${OUT:-}"
phase=""
presets=(gpu-dense gpu-window gpu-decode)
dry_run=0
selftest=0
extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --phase) phase="${2:?--phase needs a value}"; shift 2 ;;
    --preset) presets=("${2:?--preset needs a value}"); shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --cpu-selftest) selftest=1; shift ;;
    --) shift; extra=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "gpu_check: unknown option $1" >&2; exit 2 ;;
    *) out_dir="$1"; shift ;;
  esac
done
timed=0
case "$phase" in
  build|test|bench|sanitize) phases=("$phase") ;;
  all) phases=(build test bench sanitize) ;;
  first-run|follow-up) timed=1; phases=() ;;
  *) echo "gpu_check: --phase must be first-run, follow-up, build, test, bench, sanitize or all (got '${phase}')" >&2
     exit 2 ;;
esac
if [[ ( "$phase" == all || $timed -eq 1 ) && ${#extra[@]} -gt 0 ]]; then
  echo "gpu_check: arguments after -- go to one phase's command; give --phase test or bench" >&2; exit 2
fi
if [[ $selftest -eq 1 && $timed -eq 0 ]]; then
  echo "gpu_check: --cpu-selftest goes with --phase first-run or follow-up" >&2; exit 2
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
export PYTHONUNBUFFERED=1
py="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
jobs="${MAX_JOBS:-$(nproc)}"

# ---------------------------------------------------------------------------------------------
# the timed phases: steps with time guards, bookkept by scripts/gpu_check_record.py

if [[ $timed -eq 1 ]]; then
  total_s="${GPU_CHECK_TOTAL_S:-500}"
  reserve_s=15     # kept back for the last records and the table
  min_step_s=20    # a step that would get less is skipped
  summary="$out_dir/gpu_check-$phase.json"
  log="$out_dir/gpu_check-$phase.log"
  scratch="$(mktemp -d)"
  trap 'rm -rf "$scratch"' EXIT
  record() { "$py" "$repo/scripts/gpu_check_record.py" "$@"; }
  say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$log"; }
  pytest_timeout=()
  if [[ $dry_run -eq 1 ]] || "$py" -c 'import pytest_timeout' 2>/dev/null; then
    pytest_timeout=(--timeout=90)  # per test: a hang costs 90 s, not the call
  fi

  # budget NAME DEFAULT: GPU_CHECK_BUDGET_<NAME> or DEFAULT
  budget() { local var="GPU_CHECK_BUDGET_$(echo "$1" | tr 'a-z-' 'A-Z_')"; echo "${!var:-$2}"; }

  # step NAME BUDGET [--junit] [--bench FILE] -- CMD...: run CMD under min(BUDGET, time left), its
  # output into the log, then record it. Never fatal.
  step() {
    local name="$1" budget_s="$2"; shift 2
    local junit="" bench=""
    while [[ "$1" != "--" ]]; do
      case "$1" in
        --junit) junit="$scratch/$name.xml"; shift ;;
        --bench) bench="$2"; shift 2 ;;
      esac
    done
    shift
    local cmd=("$@")
    [[ -n "$junit" ]] && cmd+=(--junitxml="$junit")
    local left=$(( deadline - SECONDS - reserve_s ))
    local limit=$(( budget_s < left ? budget_s : left ))
    if [[ $dry_run -eq 1 ]]; then
      say "$name (budget ${budget_s} s): $(printf '%q ' "${cmd[@]}")"
      return 0
    fi
    local skip=""
    if [[ -n "${GPU_CHECK_ONLY:-}" && ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
      skip="skipped: not in GPU_CHECK_ONLY=$GPU_CHECK_ONLY"
    elif [[ $left -lt $min_step_s ]]; then
      skip="skipped: ${left} s left of GPU_CHECK_TOTAL_S=$total_s"
    fi
    if [[ -n "$skip" ]]; then
      say "$name: $skip"
      record step "$summary" --name "$name" --status skipped --rc -1 --seconds 0 --budget "$budget_s" \
        --limit "$limit" --note "$skip"
      return 0
    fi
    say "$name (limit ${limit} s of ${budget_s}): ${cmd[*]}"
    local start=$SECONDS rc status
    set +e
    # SIGINT first: pytest then writes its junit and summary; KILL 10 s later if it does not stop
    timeout --signal=INT --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee -a "$log"
    rc=${PIPESTATUS[0]}
    set -e
    local seconds=$(( SECONDS - start ))
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then status=timed_out
    elif [[ $rc -eq 0 ]]; then status=ok
    else status=failed; fi
    say "$name: $status (exit $rc) after $seconds s"
    local args=(--name "$name" --status "$status" --rc "$rc" --seconds "$seconds" --budget "$budget_s" --limit "$limit")
    [[ -n "$junit" ]] && args+=(--junit "$junit")
    [[ -n "$bench" ]] && args+=(--bench "$bench")
    record step "$summary" "${args[@]}" || say "$name: could not record the step"
  }

  pytest_cmd=(env ATTNKERN_TRITON_AUTOTUNE=0 "$py" -m pytest -q -rfE -p no:cacheprovider "${pytest_timeout[@]}")
  # the smoke selection, bf16, a few cases per kernel family (tests/test_gpu_check.py checks the ids exist)
  smoke_triton=(
    "tests/test_triton_gpu.py::test_parity[dense-torch.bfloat16]"
    "tests/test_triton_gpu.py::test_parity[window(256,0)-torch.bfloat16]"
    "tests/test_triton_gpu.py::test_parity[long-causal-gqa-torch.bfloat16]"
  )
  smoke_cuda=(
    "tests/test_cuda.py::test_gpu_parity[dense-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_parity[causal-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_parity[window(256,0)-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_head_dims[128-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_larger_shapes[decode-L1-gqa8]"
    "tests/test_cuda.py::test_gpu_larger_shapes[decode-L16]"
  )
  smoke_hopper=(
    "tests/test_cuda.py::test_gpu_wgmma_parity[d128-gqa-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_wgmma_parity[causal-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_wgmma_parity[window-torch.bfloat16]"
    "tests/test_cuda.py::test_gpu_wgmma_parity[2k-causal-torch.bfloat16]"
  )
  deselect=()
  for id in "${smoke_triton[@]}" "${smoke_cuda[@]}" "${smoke_hopper[@]}"; do deselect+=(--deselect "$id"); done

  if [[ $selftest -eq 1 ]]; then
    device=cpu
    build_cmd=("$py" -c 'import attnkern; print("cpu self-test: the build step imports", attnkern.__file__)')
    bench_fast=(--budget 0.01 --min-reps 2 --max-reps 3 --warmup 0.001)
    window_len=512   # the CPU grid of --gpu-window divides lengths by 64
  else
    device=cuda
    # (a) only what the first run tests: the Hopper arch, bf16, head dims 64 and 128; the sm80
    # mma.sync kernels are compiled for 9.0a too, so both CUDA families are in it
    build_cmd=(env ATTNKERN_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0a}"
               ATTNKERN_CUDA_HDIMS="${ATTNKERN_CUDA_HDIMS:-64,128}" ATTNKERN_CUDA_DTYPES="${ATTNKERN_CUDA_DTYPES:-bf16}"
               MAX_JOBS="$jobs" "$py" setup.py build_ext --inplace)
    bench_fast=()
    window_len=32768
  fi
  bench_cmd=("$py" -m attnkern bench --device "$device" --no-progress "${bench_fast[@]}")

  if [[ "$phase" == first-run ]]; then
    plan=(build env smoke-triton smoke-cuda smoke-hopper bench-first bench-window tests-gpu tests-cpu)
  else
    plan=(build env sanitize bench-decode bench-window bench-dense)
  fi
  deadline=$(( SECONDS + total_s ))
  if [[ $dry_run -eq 0 ]]; then
    : > "$log"
    record start "$summary" --phase "$phase" --mode "$([[ $selftest -eq 1 ]] && echo cpu-selftest || echo gpu)" \
      --total-s "$total_s" --plan "$(IFS=,; echo "${plan[*]}")"
    if [[ $selftest -eq 0 ]] && ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
      say "torch sees no CUDA device; nvidia-smi says: $(nvidia-smi -L 2>&1 | head -n 3)"
      record finish "$summary" | tee -a "$log"
      exit 3
    fi
    say "phase $phase, $(nproc) cores, time guard ${total_s} s; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)"
  else
    say() { echo "[gpu_check] $*"; }
    say "phase $phase: steps ${plan[*]}; time guard ${total_s} s, each step min(budget, time left)"
  fi

  step build "$(budget build 180)" -- "${build_cmd[@]}"
  step env "$(budget env 60)" -- "$py" "$repo/scripts/gpu_check_record.py" env "$summary" --python "$py"
  if [[ "$phase" == first-run ]]; then
    # (b) one pytest per family, so a failure in one does not hide the others
    step smoke-triton "$(budget smoke-triton 75)" --junit -- "${pytest_cmd[@]}" -x "${smoke_triton[@]}"
    step smoke-cuda "$(budget smoke-cuda 45)" --junit -- "${pytest_cmd[@]}" -x "${smoke_cuda[@]}"
    step smoke-hopper "$(budget smoke-hopper 45)" --junit -- "${pytest_cmd[@]}" -x "${smoke_hopper[@]}"
    # (c) every subject checked against float64 on sampled rows; Triton untuned here (its
    # autotuner would compile every candidate of every specialisation first), tuned in follow-up
    untuned=(env ATTNKERN_TRITON_AUTOTUNE=0)
    note="first run: ATTNKERN_TRITON_AUTOTUNE=0, the first fitting config of each Triton kernel"
    step bench-first "$(budget bench-first 160)" --bench "$out_dir/bench-first.json" -- \
      "${untuned[@]}" "${bench_cmd[@]}" --gpu-first --note "$note" --json "$out_dir/bench-first.json"
    step bench-window "$(budget bench-window 80)" --bench "$out_dir/bench-window32k.json" -- \
      "${untuned[@]}" "${bench_cmd[@]}" --gpu-window --where head_dim=128 --where "len_q=$window_len" \
      --where mode=fwd --note "$note" --json "$out_dir/bench-window32k.json"
    # (d) with the time left
    step tests-gpu "$(budget tests-gpu 600)" --junit -- "${pytest_cmd[@]}" tests -m gpu "${deselect[@]}"
    step tests-cpu "$(budget tests-cpu 600)" --junit -- "${pytest_cmd[@]}" tests -m "not gpu"
  else
    # small cases under memcheck and racecheck; the reports go into the log (few files come back)
    step sanitize "$(budget sanitize 150)" -- env SANITIZE_TOOLS="memcheck racecheck" SANITIZE_ECHO=1 \
      csrc/cuda/sanitize.sh "$scratch/sanitize"
    step bench-decode "$(budget bench-decode 45)" --bench "$out_dir/bench-decode.json" -- \
      "${bench_cmd[@]}" --gpu-decode --json "$out_dir/bench-decode.json"
    step bench-window "$(budget bench-window 150)" --bench "$out_dir/bench-window.json" -- \
      "${bench_cmd[@]}" --gpu-window --json "$out_dir/bench-window.json"
    step bench-dense "$(budget bench-dense 600)" --bench "$out_dir/bench-dense.json" -- \
      "${bench_cmd[@]}" --gpu-dense --json "$out_dir/bench-dense.json"
  fi
  [[ $dry_run -eq 1 ]] && exit 0
  say "done in $SECONDS s; results in $out_dir"
  set +e
  record finish "$summary" | tee -a "$log"
  exit "${PIPESTATUS[0]}"
fi

# ---------------------------------------------------------------------------------------------
# the single phases

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
      run build env ATTNKERN_REQUIRE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$jobs" \
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
