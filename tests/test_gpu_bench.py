"""benchmarks/gpu_bench.py without a GPU: its argument checks and the case plan (--dry-run).

The timed runs need a GPU (scripts/gpu_check.sh); `--smoke` exercises them on CPU by hand.
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_bench  # noqa: E402


def test_dry_run_plans_the_issue_cases(tmp_path):
    assert gpu_bench.main(["--out", str(tmp_path), "--dry-run"]) == 0
    plan = json.loads((tmp_path / "gpu_bench_plan.json").read_text())
    cases = [c["case"] for c in plan["cases"]]
    dense = {(c["head_dim"], c["length"], c["causal"]) for c in cases if c["kind"] == "dense"}
    assert dense == {(d, n, causal) for d in (64, 128) for n in (1024, 4096, 16384) for causal in (False, True)}
    window = {(c["head_dim"], c["length"], tuple(c["window"])) for c in cases if c["kind"] == "window"}
    assert window == {(d, n, (1023, 0)) for d in (64, 128) for n in (8192, 16384, 32768, 65536)}
    for c in cases:
        assert c["batch"] * c["length"] >= 16384 or c["kind"] == "window"


@pytest.mark.parametrize("argv", [["--head-dims", "64,x"], ["--head-dims", "0"], ["--only", "sparse"], []])
def test_bad_arguments_are_rejected(argv, tmp_path):
    with pytest.raises(SystemExit) as exc:
        gpu_bench.main((["--out", str(tmp_path)] if argv else []) + argv)
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_timed_run_without_gpu_says_so(tmp_path, capsys):
    assert gpu_bench.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
