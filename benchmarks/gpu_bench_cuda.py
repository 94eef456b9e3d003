"""GPU benchmarks of attnkern's CUDA backend, against torch SDPA and attnkern's Triton backend,
measured side by side in one run (the issue's targets, csrc/cuda).

    python benchmarks/gpu_bench_cuda.py --out DIR [--quick] [--only dense|window|decode] [--dry-run]

Cases, bfloat16, torch's (B, H, L, D) layout:
  dense   head dim 64 and 128, L = S = 16k, B = 1, H = 2048 / D, causal and not; forward and
          backward; baselines torch SDPA (flash, memory-efficient and cuDNN backends, each timed,
          the fastest kept) and attnkern's Triton backend.
  window  window (1023, 0) (W = 1024 keys) at L = S in {16k, 32k, 64k}, B = 1, H = 16, head dim 64
          and 128; against attnkern's Triton backend; the time per query row at each L shows
          whether the cost is linear in L.
  decode  L = 1, S = 32k, 32 query heads over 4 kv heads (GQA 8:1), batch 16, head dim 128;
          forward only; the bandwidth of reading K and V once, as a fraction of a device-to-device
          copy's bandwidth measured in the same run (and of the nominal HBM figure when the
          device is known); baselines SDPA (enable_gqa) and Triton.
Timing: CUDA events around back-to-back calls after warm-up, the median over samples. TFLOP/s
use attnkern.bench.flops for every implementation, so ratios are ratios of times. Each
implementation's output is compared with the baseline's (relative-norm error, both bf16).
Results go to DIR/cuda_<device>_<date>.json, rewritten after every case. --dry-run lists the
cases and their FLOPs without a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from attnkern.bench.flops import attention_flops  # noqa: E402

# nominal HBM bandwidth (bytes/s) by device name fragment, for the decode case's second ratio
NOMINAL_HBM = {"H100 SXM": 3.35e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H200": 4.8e12,
               "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12, "A100 80GB PCIe": 1.94e12}


@dataclass
class Case:
    kind: str  # dense | window | decode
    batch: int
    heads_q: int
    heads_kv: int
    len_q: int
    len_k: int
    head_dim: int
    causal: bool = False
    window: Optional[Tuple[int, int]] = None
    modes: Tuple[str, ...] = ("fwd", "bwd")
    name: str = field(default="")

    def __post_init__(self):
        if not self.name:
            band = f"w{self.window[0]}-{self.window[1]}" if self.window else ("causal" if self.causal else "full")
            self.name = f"{self.kind}-d{self.head_dim}-L{self.len_q}-S{self.len_k}-{band}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads_q, self.len_q, self.len_k, self.head_dim, causal=self.causal,
                               window=self.window, mode=mode)

    def kv_bytes(self) -> int:
        return 2 * self.batch * self.heads_kv * self.len_k * self.head_dim * 2  # K and V, bf16


def plan(quick: bool, only: Optional[str]) -> List[Case]:
    cases: List[Case] = []
    for d in (64, 128):
        for causal in (False, True):
            length = 4096 if quick else 16384
            cases.append(Case("dense", 1, 2048 // d, 2048 // d, length, length, d, causal=causal))
    for d in (64, 128):
        for length in ((16384,) if quick else (16384, 32768, 65536)):
            cases.append(Case("window", 1, 16, 16, length, length, d, window=(1023, 0)))
    cases.append(Case("decode", 16, 32, 4, 1, 8192 if quick else 32768, 128, modes=("fwd",)))
    return [c for c in cases if only is None or c.kind == only]


# ---------------------------------------------------------------------------------------------
# implementations: each returns f(q, k, v) -> out, differentiable


def attnkern_backend(case: Case, backend: str) -> Callable:
    import attnkern

    def fwd(q, k, v):
        return attnkern.scaled_dot_product_attention(q, k, v, is_causal=case.causal, window_size=case.window,
                                                     enable_gqa=case.heads_q != case.heads_kv, backend=backend)

    return fwd


def sdpa(case: Case, kernel) -> Callable:
    from torch.nn.attention import sdpa_kernel

    def fwd(q, k, v):
        with sdpa_kernel([kernel]):
            return torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=case.causal, enable_gqa=case.heads_q != case.heads_kv)

    return fwd


def implementations(case: Case) -> Dict[str, Callable]:
    impls = {"attnkern-cuda": attnkern_backend(case, "cuda")}
    import attnkern

    if "triton" in attnkern.available_backends("cuda"):
        impls["attnkern-triton"] = attnkern_backend(case, "triton")
    if case.window is None:  # SDPA has no window short of a dense mask (the Triton bench times that)
        from torch.nn.attention import SDPBackend

        for name, kernel in (("sdpa-flash", SDPBackend.FLASH_ATTENTION), ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
            impls[name] = sdpa(case, kernel)
    return impls


# ---------------------------------------------------------------------------------------------
# timing


def time_ms(fn: Callable[[], object], min_sample_ms: float = 20.0, samples: int = 7) -> float:
    """Median milliseconds per call: CUDA events around enough back-to-back calls to fill a sample."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    reps = max(1, int(min_sample_ms / max(start.elapsed_time(end), 1e-3)))
    times = []
    for _ in range(samples):
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes/s of a 2 GiB device-to-device copy (read + write), the decode case's yardstick."""
    src = torch.empty(1 << 30, dtype=torch.int16, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), samples=5)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * (1 << 31) / (ms * 1e-3)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_case(case: Case) -> Dict:
    torch.manual_seed(0)
    q = torch.randn(case.batch, case.heads_q, case.len_q, case.head_dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(case.batch, case.heads_kv, case.len_k, case.head_dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    grad = torch.randn(case.batch, case.heads_q, case.len_q, case.head_dim, device="cuda", dtype=torch.bfloat16)
    entry: Dict = {"case": asdict(case), "results": {}}
    outputs: Dict[str, torch.Tensor] = {}
    for name, fn in implementations(case).items():
        res: Dict = {}
        try:
            for mode in case.modes:
                if mode == "fwd":
                    with torch.no_grad():
                        ms = time_ms(lambda: fn(q, k, v))
                        outputs[name] = fn(q, k, v)
                else:
                    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
                    out = fn(qg, kg, vg)
                    ms = time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), grad, retain_graph=True))
                    del out
                res[mode] = {"ms": ms, "tflops": case.flops(mode) / (ms * 1e-3) / 1e12}
        except Exception as exc:  # an implementation that cannot run this case is reported, not fatal
            res["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
        entry["results"][name] = res
        torch.cuda.empty_cache()
    _summarise(case, entry, outputs)
    return entry


def _summarise(case: Case, entry: Dict, outputs: Dict[str, torch.Tensor]) -> None:
    """Speedups of attnkern-cuda (>1: faster) over torch SDPA's fastest backend and over Triton,
    per mode, and its output's distance from the baseline's."""
    res = entry["results"]
    mine = res.get("attnkern-cuda", {})
    for mode in case.modes:
        if mode not in mine:
            continue
        sdpa_ms = [res[n][mode]["ms"] for n in res if n.startswith("sdpa") and mode in res[n]]
        if sdpa_ms:
            entry[f"speedup_{mode}_vs_sdpa_fastest"] = min(sdpa_ms) / mine[mode]["ms"]
        if mode in res.get("attnkern-triton", {}):
            entry[f"speedup_{mode}_vs_triton"] = res["attnkern-triton"][mode]["ms"] / mine[mode]["ms"]
    timed = [n for n in outputs if n != "attnkern-cuda"]
    sdpa_timed = [n for n in timed if n.startswith("sdpa")]
    baseline = min(sdpa_timed, key=lambda n: res[n]["fwd"]["ms"]) if sdpa_timed else (timed[0] if timed else None)
    entry["baseline"] = baseline
    if baseline and "attnkern-cuda" in outputs:
        entry["rel_err_vs_baseline"] = rel_err(outputs["attnkern-cuda"], outputs[baseline])
    if case.kind == "decode" and "fwd" in mine:
        bw = case.kv_bytes() / (mine["fwd"]["ms"] * 1e-3)
        entry["kv_bytes"] = case.kv_bytes()
        entry["kv_bandwidth_GBps"] = bw / 1e9
        copy = copy_bandwidth()
        entry["copy_bandwidth_GBps"] = copy / 1e9
        entry["fraction_of_copy_bandwidth"] = bw / copy
        name = torch.cuda.get_device_name()
        nominal = next((v for key, v in NOMINAL_HBM.items() if key in name), None)
        if nominal:
            entry["nominal_hbm_GBps"] = nominal / 1e9
            entry["fraction_of_nominal_hbm"] = bw / nominal


def window_scaling(records: List[Dict]) -> Dict:
    """Per head dim and implementation: forward ms per query row at each L (flat = linear in L)."""
    out: Dict = {}
    for r in records:
        c = r["case"]
        if c["kind"] != "window":
            continue
        for name, res in r["results"].items():
            if "fwd" in res:
                out.setdefault(f"d{c['head_dim']}", {}).setdefault(name, {})[c["len_q"]] = \
                    res["fwd"]["ms"] / c["len_q"] * 1e3  # microseconds per 1000 rows
    return out


def environment() -> Dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        info["commit"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count)
        import attnkern.ops

        if attnkern.ops._C_cuda is not None:
            info["cuda_extension"] = {"archs": attnkern.ops._C_cuda.archs(),
                                      "instances": attnkern.ops._C_cuda.instances()}
    return info


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for the JSON (default $OUT or .)")
    parser.add_argument("--quick", action="store_true", help="smaller lengths, for a first look")
    parser.add_argument("--only", choices=("dense", "window", "decode"))
    parser.add_argument("--dry-run", action="store_true", help="list the cases and FLOPs; no GPU needed")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cases = plan(args.quick, args.only)
    if args.dry_run:
        for c in cases:
            flops = ", ".join(f"{m} {c.flops(m) / 1e12:.2f} TFLOP" for m in c.modes)
            extra = f", K+V {c.kv_bytes() / 1e9:.2f} GB" if c.kind == "decode" else ""
            print(f"{c.name}: B={c.batch} Hq={c.heads_q} Hkv={c.heads_kv}: {flops}{extra}")
        return 0
    if not torch.cuda.is_available():
        print("gpu_bench_cuda: no CUDA device (use --dry-run to list the cases)", file=sys.stderr)
        return 2
    info = environment()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"cuda_{info.get('device', 'gpu').replace(' ', '_')}_{info['date'][:10]}.json")
    records: List[Dict] = []
    failed = False
    for case in cases:
        print(f"[gpu_bench_cuda] {case.name}", flush=True)
        try:
            records.append(run_case(case))
        except Exception:
            failed = True
            records.append({"case": asdict(case), "error": traceback.format_exc()[-2000:]})
        summary = {k: v for k, v in records[-1].items() if k not in ("case", "results")}
        print(json.dumps(summary), flush=True)
        with open(path, "w") as f:
            json.dump({"environment": info, "records": records, "window_scaling": window_scaling(records)}, f,
                      indent=1)
    print(f"[gpu_bench_cuda] results in {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
