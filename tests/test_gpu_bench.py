"""The GPU benchmarks (``attnkern bench --gpu-dense/--gpu-window/--gpu-decode``, run by
scripts/gpu_check.sh) without a GPU: the grids the issues ask for, the figures derived from a
run (fastest SDPA kernel, ratios, decoding bandwidth, growth with L) against hand-computed
rows, the correctness check on sampled rows, the whole path on CPU tensors (the presets'
scaled-down CPU grids) down to RESULTS.md, and the script's plan. No timing is asserted."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
import torch

from attnkern import dispatch
from attnkern.bench import cli, derived, sweep
from attnkern.bench.cases import PRESETS, Case
from attnkern.bench.subjects import Subject, all_subjects
from attnkern.bench.timing import TimingSettings, nominal_bandwidth_gbps
from test_bench import _make_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_PRESETS = ("gpu-dense", "gpu-window", "gpu-decode")
FAST = TimingSettings(budget_s=0.01, min_reps=2, max_reps=3, warmup_s=0.0)
needs_cpu_backend = pytest.mark.skipif("cpu" not in dispatch.available_backends("cpu"),
                                       reason="attnkern C++ extension not built")


# ---------------------------------------------------------------------------------------
# the grids


def test_gpu_dense_is_the_issue_grid():
    preset = PRESETS["gpu-dense"]("cuda")
    got = {(c.head_dim, c.len_q, c.causal, c.mode) for c in preset.cases}
    assert got == {(d, n, causal, mode) for d in (64, 128) for n in (1024, 4096, 16384) for causal in (False, True)
                   for mode in ("fwd", "bwd")}
    for c in preset.cases:
        assert (c.dtype, c.len_k, c.window, c.gqa) == ("bfloat16", c.len_q, None, False)
        assert c.batch * c.len_q == 16384 and c.heads_q * c.head_dim == 2048
    assert (preset.baseline, preset.check) == ("sdpa-fastest", True)
    for name in ("attnkern-triton", "attnkern-cuda", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn"):
        assert name not in preset.exclude


def test_gpu_window_is_the_issue_grid():
    preset = PRESETS["gpu-window"]("cuda")
    got = {(c.head_dim, c.len_q, c.mode) for c in preset.cases}
    assert got == {(d, n, mode) for d in (64, 128) for n in (8192, 16384, 32768, 65536) for mode in ("fwd", "bwd")}
    for c in preset.cases:
        assert (c.dtype, c.batch, c.heads_q, c.heads_kv, c.len_k, c.band) == ("bfloat16", 1, 16, 16, c.len_q, (1023, 0))
    for name in ("attnkern-triton", "attnkern-cuda", "flex", "sdpa-efficient", "sdpa-cudnn"):
        assert name not in preset.exclude
    # torch's CUDA flash kernel takes no mask: SDPA meets the window through its masked kernels
    assert all_subjects()["sdpa-flash"].limits(preset.cases[0], "cuda") is not None
    assert all_subjects()["sdpa-efficient"].limits(preset.cases[0], "cuda") is None


def test_gpu_decode_is_the_issue_case():
    (case,) = PRESETS["gpu-decode"]("cuda").cases
    assert (case.batch, case.heads_q, case.heads_kv, case.len_q, case.len_k, case.head_dim, case.mode) == \
        (16, 32, 4, 1, 32768, 128, "fwd")
    assert derived.is_decode(case)
    assert case.kv_bytes() == 2 * 16 * 4 * 32768 * 128 * 2  # K and V, bf16


@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_preset_cases_are_served_by_triton(name, monkeypatch):
    """The Triton capability row accepts every GPU case (on an sm90 device; no GPU needed)."""
    monkeypatch.setattr(dispatch.torch.cuda, "get_device_capability", lambda *args: (9, 0))
    row = dataclasses.replace(dispatch.CAPABILITIES["triton"], available=lambda: None)
    for case in PRESETS[name]("cuda").cases:
        assert row.why_not(case.problem("cuda")) is None, case.label()


def test_dry_run_lists_the_gpu_grid_without_a_gpu(capsys):
    assert cli.main(["bench", "--gpu-window", "--device", "cuda", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "16 cases; baseline sdpa-fastest; check against float64: yes" in out
    assert "bfloat16 B1 H16 L65536 D128 causal win(1023,0) bwd" in out
    assert cli.main(["bench", "--gpu-decode", "--device", "cuda", "--dry-run"]) == 0
    assert "1.07" in capsys.readouterr().out  # GB of K and V


def test_forwards_come_first():
    for name in ("gpu-dense", "gpu-window"):
        modes = [c.mode for c in PRESETS[name]("cuda").cases]
        assert modes == sorted(modes, key=("fwd", "bwd").index), name


def test_where_splits_a_preset(capsys):
    assert cli.main(["bench", "--gpu-window", "--device", "cuda", "--dry-run", "--where", "mode=bwd",
                     "--where", "len_q=32768,65536"]) == 0
    out = capsys.readouterr().out
    assert "4 cases" in out and " fwd" not in out and "L8192" not in out
    assert cli.main(["bench", "--gpu-dense", "--device", "cuda", "--dry-run", "--where", "causal=yes",
                     "--where", "dtype=bf16", "--where", "head_dim=64"]) == 0
    assert "6 cases" in capsys.readouterr().out  # 3 lengths x fwd, bwd
    with pytest.raises(SystemExit, match="keeps none of the cases"):
        cli.main(["bench", "--gpu-window", "--dry-run", "--where", "causal=no"])
    for bad in ("head_dims=64", "mode", "causal=maybe", "dtype=int8"):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--gpu-window", "--dry-run", "--where", bad])
        assert "--where" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_timed_gpu_run_without_gpu_says_so():
    with pytest.raises(SystemExit, match="no CUDA device"):
        cli.main(["bench", "--gpu-dense", "--device", "cuda"])


def test_sdpa_fastest_baseline_needs_an_sdpa_kernel():
    with pytest.raises(SystemExit, match="sdpa-fastest needs one of"):
        cli.main(["bench", "--backends", "attnkern-math", "--baseline", "sdpa-fastest", "--seqlens", "16"])


# ---------------------------------------------------------------------------------------
# derived figures, on hand-made rows


def _row(case: Case, backend: str, time_ms: float, status: str = "ok") -> dict:
    row = case.to_dict()
    row.update(backend=backend, status=status, reason="", flops=case.flops())
    if status == "ok":
        row.update(time_ms=time_ms, tflops=case.flops() / (time_ms * 1e-3) / 1e12)
    return row


def test_speedups_against_each_baseline_and_the_fastest_sdpa():
    one = Case("bfloat16", 1, 2, 2, 64, 64, 16)
    two = Case("bfloat16", 1, 2, 2, 128, 128, 16)
    times = {"attnkern-triton": 1.0, "attnkern-cuda": 0.5, "sdpa-flash": 2.0, "sdpa-efficient": 3.0,
             "sdpa-cudnn": 1.5, "flex": 4.0}
    rows = [_row(one, name, t) for name, t in times.items()]
    rows += [_row(two, "attnkern-cuda", 1.0), _row(two, "sdpa-flash", 3.0), _row(two, "sdpa-cudnn", 0, "error")]
    derived.add_ratios(rows, "sdpa-fastest", {"bfloat16": 100.0})
    by = {(r["len_q"], r["backend"]): r for r in rows}
    cuda, triton = by[(64, "attnkern-cuda")], by[(64, "attnkern-triton")]
    assert cuda["sdpa_fastest"] == "sdpa-cudnn"
    assert cuda["speedups"] == {"attnkern-triton": 2.0, "sdpa-flash": 4.0, "sdpa-efficient": 6.0, "sdpa-cudnn": 3.0,
                                "flex": 8.0, "sdpa-fastest": 3.0}
    assert triton["speedups"]["sdpa-fastest"] == 1.5 and triton["speedups"]["attnkern-cuda"] == 0.5
    assert cuda["speedup"] == 3.0 and by[(64, "sdpa-cudnn")]["speedup"] == 1.0
    assert "speedups" not in by[(64, "flex")]  # ratios to each baseline are attnkern's
    assert by[(128, "attnkern-cuda")]["sdpa_fastest"] == "sdpa-flash"  # cuDNN failed on that case
    assert by[(128, "attnkern-cuda")]["speedup"] == 3.0
    assert "speedup" not in by[(128, "sdpa-cudnn")]


def test_decode_bandwidth_against_copy_and_nominal():
    case = PRESETS["gpu-decode"]("cuda").cases[0]
    rows = [_row(case, "attnkern-cuda", 0.5), _row(case, "sdpa-flash", 0, "skip")]
    derived.add_bandwidth(rows, copy_gbps=3000.0, nominal_gbps=3350.0)
    # 2 (K, V) x 16 x 4 x 32768 x 128 x 2 bytes = 2^30 bytes in 0.5 ms
    assert rows[0]["kv_bytes"] == 1 << 30
    assert rows[0]["kv_gbps"] == pytest.approx(2147.483648)
    assert rows[0]["pct_copy_bw"] == pytest.approx(100 * 2147.483648 / 3000)
    assert rows[0]["pct_nominal_bw"] == pytest.approx(100 * 2147.483648 / 3350)
    assert "kv_gbps" not in rows[1]
    dense = Case("bfloat16", 1, 2, 2, 16, 16, 16)  # as short as a decode step but not over a longer cache
    assert not derived.is_decode(dense)
    assert nominal_bandwidth_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert nominal_bandwidth_gbps("NVIDIA H100 PCIe") == 2000.0
    assert nominal_bandwidth_gbps("NVIDIA H200") == 4800.0
    assert nominal_bandwidth_gbps("NVIDIA GH200 480GB") is None
    assert nominal_bandwidth_gbps("NVIDIA GeForce RTX 4090") is None


def test_linearity_fits_time_against_length():
    lengths = [8192, 16384, 32768, 65536]
    rows = []
    for n in lengths:
        window = Case("bfloat16", 1, 16, 16, n, n, 64, causal=True, window=(1023, 0))
        rows += [_row(window, "attnkern-triton", 0.25 * n / 8192), _row(window, "sdpa-efficient", (n / 8192) ** 2)]
        rows.append(_row(Case("bfloat16", 1, 16, 16, n, n, 64), "attnkern-triton", 1.0))  # no window: not fitted
    fits = {f["backend"]: f for f in derived.linearity(rows)}
    assert set(fits) == {"attnkern-triton", "sdpa-efficient"}
    linear = fits["attnkern-triton"]
    assert linear["lengths"] == lengths and linear["exponent"] == pytest.approx(1.0)
    assert linear["us_per_row"] == pytest.approx([0.25e3 / 8192] * 4)
    assert (linear["time_ratio"], linear["length_ratio"]) == (pytest.approx(8.0), 8.0)
    assert fits["sdpa-efficient"]["exponent"] == pytest.approx(2.0)


# ---------------------------------------------------------------------------------------
# the check against float64 on sampled rows


def _without_window(case: Case, device: str):
    from attnkern import scaled_dot_product_attention

    def fn(q, k, v):
        return scaled_dot_product_attention(q, k, v, enable_gqa=case.gqa, backend="cpu")
    return fn


@needs_cpu_backend
def test_check_on_sampled_rows_is_exact_and_can_fail(monkeypatch, seed):
    """Rows sampled (the reference's budget shrunk): a right kernel still matches float64 in
    the output and in dQ, dK, dV; one that ignores the window does not."""
    monkeypatch.setattr(sweep, "CHECK_SCORE_BYTES", 4 * 96 * 8 * 20)  # 20 rows of 4 heads x 96 keys in float64
    case = Case("float32", 2, 4, 2, 96, 96, 16, causal=True, window=(9, 0), mode="bwd")
    rows_checked = sweep.check_rows(case)
    assert rows_checked is not None and len(rows_checked) == 20
    assert rows_checked[0] == 0 and rows_checked[-1] == 95
    broken = Subject("no-window", "ignores the window", lambda d: None, lambda c, d: None, _without_window)
    rows = {r["backend"]: r for r in sweep.run_sweep([case], [all_subjects()["attnkern-cpu"], broken], "cpu", FAST,
                                                     check=True)}
    ok = rows["attnkern-cpu"]
    assert ok["check_rows"] == len(rows_checked)
    for key in ("error", "error_dq", "error_dk", "error_dv"):
        assert ok[key] < 1e-5, (key, ok)
    for key in ("error", "error_dq", "error_dk", "error_dv"):
        assert rows["no-window"][key] > 0.1, (key, rows["no-window"])


# ---------------------------------------------------------------------------------------
# the whole path on CPU tensors, into RESULTS.md as a GPU section


@needs_cpu_backend
@pytest.mark.parametrize("name", GPU_PRESETS)
def test_gpu_preset_end_to_end_on_cpu(name, tmp_path, capsys):
    out = tmp_path / "results" / f"gpu-synthetic-{name}.json"
    out.parent.mkdir()  # attnkern bench refuses a --json path in a missing directory
    rc = cli.main(["bench", f"--{name}", "--device", "cpu", "--json", str(out), "--budget", "0.01", "--min-reps", "2",
                   "--max-reps", "3", "--warmup", "0.001", "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "attnkern against each baseline" in shown
    doc = json.loads(out.read_text())
    assert (doc["preset"], doc["baseline"]) == (name, "sdpa-fastest")
    assert doc["cases_done"] == doc["cases_planned"] == len(PRESETS[name]("cpu").cases)
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"attnkern-cpu", "sdpa-flash"}
    for r in ok:
        assert r["check_rows"] == r["len_q"] and r["error"] < 2e-2  # bfloat16 against float64
        if r["mode"] != "fwd":
            assert max(r["error_dq"], r["error_dk"], r["error_dv"]) < 2e-2
        if r["backend"] == "attnkern-cpu":
            assert r["sdpa_fastest"] == "sdpa-flash"
            assert r["speedups"]["sdpa-fastest"] == pytest.approx(r["speedup"])
    if name == "gpu-window":
        assert {f["backend"] for f in doc["linearity"]} == {"attnkern-cpu", "sdpa-flash"}
        assert all(f["lengths"] == [128, 256, 512, 1024] for f in doc["linearity"])
    if name == "gpu-decode":
        assert doc["copy_gbps"] > 0 and doc["nominal_hbm_gbps"] is None
        assert all(r["kv_gbps"] > 0 and r["pct_copy_bw"] > 0 for r in ok)

    # the same file as a GPU run would write it: make_results renders it as a GPU section
    doc["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "capability": "9.0"}
    if name == "gpu-decode":
        doc["nominal_hbm_gbps"] = 3350.0
    out.write_text(json.dumps(doc))
    text = _make_results().render(str(out.parent), str(tmp_path / "RESULTS.md"))
    assert f"## NVIDIA H100 80GB HBM3 (cuda, capability 9.0): attnkern bench --{name}" in text
    assert "No GPU results" not in text
    assert "attnkern against each baseline" in text and "relative error against the float64 reference" in text
    assert ("time against sequence length" in text) == (name == "gpu-window")
    assert ("decoding: bandwidth of reading K and V once" in text) == (name == "gpu-decode")
    assert "Run cut short" not in text


def test_results_page_says_when_a_run_was_cut_short(tmp_path):
    from attnkern.bench.report import document, write_json

    case = Case("bfloat16", 1, 2, 2, 64, 64, 16)
    doc = document("bench", "cpu", {}, [_row(case, "sdpa-flash", 1.0)], preset="gpu-dense",
                   baseline="sdpa-fastest", cases_planned=24, cases_done=1)
    doc["device"] = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3"}
    write_json(str(tmp_path / "gpu.json"), doc)
    text = _make_results().render(str(tmp_path), str(tmp_path / "RESULTS.md"))
    assert "Run cut short: 1 of 24 cases measured." in text


# ---------------------------------------------------------------------------------------
# scripts/gpu_check.sh: the plan of every phase (no GPU needed)


def _gpu_check(tmp_path, *args):
    return subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_gpu_check_plans_every_phase(tmp_path):
    proc = _gpu_check(tmp_path, "--phase", "all", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    build = next(line for line in lines if "build: " in line)
    assert "ATTNKERN_REQUIRE_CUDA=1" in build and "build_ext --inplace" in build
    assert "ATTNKERN_CUDA_HDIMS" not in proc.stdout  # every head dim is built
    assert any("-m pytest tests -m gpu" in line for line in lines)
    for preset in GPU_PRESETS:
        stem = f"gpu-card-{preset[len('gpu-'):]}-"
        bench = next(line for line in lines if f"bench {preset}:" in line)
        assert f"-m attnkern bench --{preset} --device cuda" in bench
        assert f"--json {tmp_path}/{stem}" in bench and f"--plot {tmp_path}/plots/{stem}" in bench
    assert any(line.endswith(f"csrc/cuda/sanitize.sh {tmp_path}") for line in lines)
    one = _gpu_check(tmp_path, "--phase", "test", "--dry-run", "--", "tests/test_cuda.py")
    assert "-m pytest tests/test_cuda.py -m gpu" in one.stdout
    part = _gpu_check(tmp_path, "--phase", "bench", "--preset", "gpu-window", "--dry-run", "--", "--where", "mode=bwd")
    (bench,) = [line for line in part.stdout.splitlines() if "bench gpu-" in line]
    assert "--gpu-window" in bench and bench.endswith("--where mode=bwd")


@pytest.mark.parametrize("args", [["--phase", "nope"], [], ["--phase", "bench", "--preset", "gpu-sparse"],
                                  ["--phase", "all", "--", "-x"]])
def test_gpu_check_rejects_bad_arguments(tmp_path, args):
    proc = _gpu_check(tmp_path, *args)
    assert proc.returncode == 2 and "gpu_check:" in proc.stderr
