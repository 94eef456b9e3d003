#!/bin/sh
# Regenerate the committed CPU results, their plots, the pytest-benchmark baseline and RESULTS.md.
# Run from the repository root with attnkern built (see the README); pass --note "..." through
# NOTE="..." to record what else ran on the machine.
set -e
NOTE=${NOTE:-}
python -m attnkern.bench.cli bench --quick --no-progress ${NOTE:+--note "$NOTE"} \
    --json benchmarks/results/cpu-quick.json --plot benchmarks/results/plots/cpu-quick
python -m attnkern.bench.cli memory --quick --no-progress ${NOTE:+--note "$NOTE"} \
    --json benchmarks/results/cpu-memory-quick.json --plot benchmarks/results/plots/cpu-memory-quick
rm -rf benchmarks/results/pytest
python -m pytest benchmarks/ --benchmark-only -q \
    --benchmark-storage=file://benchmarks/results/pytest --benchmark-save=cpu-quick
python benchmarks/make_results.py
