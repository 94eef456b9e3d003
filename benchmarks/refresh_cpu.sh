#!/bin/sh
# Regenerate every committed CPU result under benchmarks/results/ (JSON, plots, the
# pytest-benchmark baseline) and RESULTS.md, in one go: about 10 minutes on a quiet 2-core
# machine. Run from the repository root with attnkern built (see the README). Every JSON
# records torch's thread count and the load average; NOTE="..." adds a note (what else ran).
# THREADS=n sets torch's thread count (default: torch's own, i.e. one per core).
set -e
NOTE=${NOTE:-}
THREADS=${THREADS:-}
start=$(date +%s)
step() {
    echo "== $1 ($(( $(date +%s) - start )) s in; load average $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null))"
}
python -c "import attnkern.ops as o; print('attnkern CPU kernels:', o._C.cpu_isa(), '|', o._C.cpu_parallel(), '|', o._C.cpu_threads(), 'threads')"
BENCH="python -m attnkern.bench.cli"
COMMON="--no-progress ${THREADS:+--threads $THREADS}"
step "attnkern bench --quick"
$BENCH bench --quick $COMMON ${NOTE:+--note "$NOTE"} \
    --json benchmarks/results/cpu-quick.json --plot benchmarks/results/plots/cpu-quick
step "attnkern bench --cpu-targets (issue 10's cases; FlexAttention compiles on the causal and window cases)"
$BENCH bench --cpu-targets $COMMON ${NOTE:+--note "$NOTE"} --json benchmarks/results/cpu-targets.json
step "attnkern bench --llm"
$BENCH bench --llm $COMMON ${NOTE:+--note "$NOTE"} \
    --json benchmarks/results/cpu-llm.json --plot benchmarks/results/plots/cpu-llm
step "attnkern memory --quick"
$BENCH memory --quick $COMMON ${NOTE:+--note "$NOTE"} \
    --json benchmarks/results/cpu-memory-quick.json --plot benchmarks/results/plots/cpu-memory-quick
step "benchmarks/test_cpu_vs_torch.py (targets against torch and FlexAttention, thread scaling 1 -> 2, backward RSS, decode)"
[ -n "$THREADS" ] && export OMP_NUM_THREADS=$THREADS
python -m pytest benchmarks/test_cpu_vs_torch.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-json=benchmarks/results/cpu-vs-torch.json
step "benchmarks/test_attention.py (the pytest-benchmark baseline)"
rm -rf benchmarks/results/pytest
python -m pytest benchmarks/test_attention.py --benchmark-only -q -p no:cacheprovider \
    --benchmark-storage=file://benchmarks/results/pytest --benchmark-save=cpu-quick
step "RESULTS.md"
python benchmarks/make_results.py
step "done"
