"""GPU benchmarks of attnkern's Triton backend against torch's attention, in one run.

Run by scripts/gpu_check.sh; usable alone:

    python benchmarks/gpu_bench.py --out DIR [--quick] [--only dense|window] [--dry-run]

Cases, all bfloat16 in torch's (B, H, L, D) layout:
  dense   head dim 64 and 128, L = S in {1k, 4k, 16k}, causal and not, B * L = 16k tokens and
          H = 2048 / D heads (the FlashAttention papers' setting, enough blocks to fill an H100);
          baseline: torch SDPA's flash, memory-efficient and cuDNN backends, each timed, the
          fastest taken.
  window  window (1023, 0) (W = 1024 keys, causal) at L = S in {8k, 16k, 32k, 64k}, B = 1,
          H = 16, head dim 64 and 128; baselines: FlexAttention (compiled) with the equivalent
          sliding-window mask_mod and block mask, and torch SDPA given the dense (L, S) bool mask.
Forward and backward are timed separately: CUDA events around a batch of back-to-back calls
(so host overhead overlaps the GPU work), after warm-up; the median over samples is kept.
TFLOP/s use attnkern.bench.flops (causal dense halved, windows by exact pairs, backward 2.5x),
the same count for every implementation, so ratios are ratios of times. Correctness is the
relative-norm error (tests/conftest.py's measure) of attnkern's output and gradients against
the fastest baseline's on the same inputs: both are bf16, so it bounds the sum of both errors.

Results go to DIR/<device>_<date>.json (rewritten after every case, so a run cut short keeps
what it measured). Without a GPU, --dry-run lists the cases and FLOPs, and --smoke runs tiny
cases on CPU tensors (Triton under TRITON_INTERPRET=1, wall-clock timing) to exercise this
script's code paths; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from attnkern.bench.flops import attention_flops  # noqa: E402

TOKENS = 16 * 1024
HIDDEN = 2048
WINDOW = (1023, 0)


@dataclass
class BenchCase:
    kind: str  # "dense" or "window"
    batch: int
    heads: int
    length: int
    head_dim: int
    causal: bool
    window: Optional[Tuple[int, int]] = None
    name: str = field(default="")

    def __post_init__(self):
        if not self.name:
            band = f"window{self.window[0]}-{self.window[1]}" if self.window else ("causal" if self.causal else "full")
            self.name = f"{self.kind}-d{self.head_dim}-L{self.length}-{band}"

    def flops(self, mode: str) -> float:
        return attention_flops(self.batch, self.heads, self.length, self.length, self.head_dim, causal=self.causal,
                               window=self.window, mode=mode)


def plan(quick: bool, only: Optional[str], head_dims: List[int], smoke: bool = False) -> List[BenchCase]:
    if smoke:
        return [BenchCase("dense", 1, 2, 64, 16, False), BenchCase("dense", 1, 2, 64, 16, True),
                BenchCase("window", 1, 2, 96, 16, True, (31, 0))]
    cases = []
    if only in (None, "dense"):
        for d in head_dims:
            for length in ([1024, 4096] if quick else [1024, 4096, 16384]):
                for causal in (False, True):
                    cases.append(BenchCase("dense", max(1, TOKENS // length), HIDDEN // d, length, d, causal))
    if only in (None, "window"):
        for d in head_dims:
            for length in ([8192, 16384] if quick else [8192, 16384, 32768, 65536]):
                cases.append(BenchCase("window", 1, 16, length, d, True, WINDOW))
    return cases


# ---------------------------------------------------------------------------------------
# timing


class _WallClock:
    """Stand-in for CUDA events on CPU tensors (--smoke)."""

    def __init__(self, enable_timing=True):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


def time_ms(fn: Callable[[], object], device: str, min_sample_ms: float = 20.0, samples: int = 7) -> float:
    """Median milliseconds per call of ``fn``: CUDA events around batches of back-to-back calls."""
    event = torch.cuda.Event if device == "cuda" else _WallClock
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(3):  # warm-up: compilation, autotuning, allocator
        fn()
    sync()
    start, end = event(enable_timing=True), event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    calls = max(1, min(200, math.ceil(min_sample_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(samples):
        start, end = event(enable_timing=True), event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """tests/conftest.py's measure: ||out - ref|| / max(||ref||, 0.1 * sqrt(numel))."""
    out, ref = out.double(), ref.double()
    denom = max(ref.norm().item(), 0.1 * math.sqrt(ref.numel()))
    return (out - ref).norm().item() / denom


# ---------------------------------------------------------------------------------------
# implementations: each returns fwd(q, k, v) -> out, or raises if it cannot run the case


def attnkern_triton(case: BenchCase):
    import attnkern

    def fwd(q, k, v):
        return attnkern.scaled_dot_product_attention(q, k, v, is_causal=case.causal, window_size=case.window,
                                                     backend="triton")

    return fwd


def sdpa_backend(case: BenchCase, backend_name: str):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def fwd(q, k, v):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

    return fwd


def sdpa_dense_mask(case: BenchCase, device: str):
    import torch.nn.functional as F

    from attnkern._semantics import band_mask

    left, right = case.window
    mask = band_mask(case.length, case.length, left, right, 0, device=device)

    def fwd(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return fwd


_flex_compiled = None


def flex_window(case: BenchCase, device: str):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    left, right = case.window

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx >= q_idx - left) & (kv_idx <= q_idx + right)

    block_mask = create_block_mask(sliding_window, B=None, H=None, Q_LEN=case.length, KV_LEN=case.length,
                                   device=device)

    def fwd(q, k, v):
        return _flex_compiled(q, k, v, block_mask=block_mask)

    return fwd


def implementations(case: BenchCase, device: str) -> Dict[str, Callable]:
    impls = {"attnkern_triton": lambda: attnkern_triton(case)}
    if case.kind == "dense":
        for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            impls["sdpa_" + name.split("_")[0].lower()] = (lambda n=name: sdpa_backend(case, n))
    else:
        impls["flex"] = lambda: flex_window(case, device)
        impls["sdpa_dense_mask"] = lambda: sdpa_dense_mask(case, device)
    return impls


# ---------------------------------------------------------------------------------------
# one case


def run_case(case: BenchCase, seed: int, device: str) -> Dict:
    torch.manual_seed(seed)
    # bf16 on the GPU; the interpreter's bf16 dot is wrong, so --smoke runs float16
    dtype = torch.bfloat16 if device == "cuda" else torch.float16
    shape = (case.batch, case.heads, case.length, case.head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    grad_out = torch.randn(shape, device=device, dtype=dtype)
    record = {"case": asdict(case), "fwd": {"flops": case.flops("fwd"), "results": {}},
              "bwd": {"flops": case.flops("bwd"), "results": {}}}
    outputs = {}
    for name, make in implementations(case, device).items():
        for mode in ("fwd", "bwd"):
            record[mode]["results"][name] = _measure(name, make, mode, q, k, v, grad_out, case, outputs, device)
            _free(device)
    for mode in ("fwd", "bwd"):
        _summarise(record[mode], outputs, mode)
    return record


def _free(device: str) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()


def _measure(name, make, mode, q, k, v, grad_out, case, outputs, device) -> Dict:
    try:
        fwd = make()
        if mode == "fwd":
            with torch.no_grad():
                out = fwd(q, k, v)
                outputs[(name, "fwd")] = [out.float()]
                ms = time_ms(lambda: fwd(q, k, v), device)
        else:
            qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
            out = fwd(qg, kg, vg)
            grads = torch.autograd.grad(out, (qg, kg, vg), grad_out, retain_graph=True)
            outputs[(name, "bwd")] = [g.float() for g in grads]
            ms = time_ms(lambda: torch.autograd.grad(out, (qg, kg, vg), grad_out, retain_graph=True), device)
            del out
        return {"ms": ms, "tflops": case.flops(mode) / (ms * 1e-3) / 1e12}
    except Exception as exc:  # a baseline that cannot run this case (OOM, unsupported) is recorded, not fatal
        _free(device)
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        print(f"    {name} {mode}: {message}", flush=True)
        return {"error": message}


def _summarise(entry: Dict, outputs: Dict, mode: str) -> None:
    results = entry["results"]
    ours = results.get("attnkern_triton", {})
    timed = {n: r["ms"] for n, r in results.items() if "ms" in r and n != "attnkern_triton"}
    sdpa = {n: t for n, t in timed.items() if n.startswith("sdpa_") and n != "sdpa_dense_mask"}
    if sdpa:
        entry["best_sdpa"] = min(sdpa, key=sdpa.get)
    if "ms" in ours:
        # ratio > 1: attnkern is faster than that baseline
        entry["speedup_vs"] = {n: t / ours["ms"] for n, t in timed.items()}
        if sdpa:
            entry["speedup_vs"]["sdpa_best"] = sdpa[entry["best_sdpa"]] / ours["ms"]
    reference = entry.get("best_sdpa") or ("flex" if "flex" in timed else next(iter(timed), None))
    if reference and ("attnkern_triton", mode) in outputs and (reference, mode) in outputs:
        names = ["out"] if mode == "fwd" else ["dq", "dk", "dv"]
        entry["error"] = {"vs": reference}
        for label, a, b in zip(names, outputs[("attnkern_triton", mode)], outputs[(reference, mode)]):
            entry["error"][label] = rel_err(a, b)
    for key in [key for key in outputs if key[1] == mode]:
        del outputs[key]


# ---------------------------------------------------------------------------------------
# run


def environment() -> Dict:
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                     timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    info["autotune"] = os.environ.get("ATTNKERN_TRITON_AUTOTUNE", "1") != "0"
    return info


def window_scaling(records: List[Dict]) -> Dict:
    """attnkern's time per window case, relative to the shortest length: linear scaling gives L / L_min."""
    scaling = {}
    for mode in ("fwd", "bwd"):
        for d in sorted({r["case"]["head_dim"] for r in records if r["case"]["kind"] == "window"}):
            rows = sorted((r["case"]["length"], r[mode]["results"].get("attnkern_triton", {}).get("ms"))
                          for r in records if r["case"]["kind"] == "window" and r["case"]["head_dim"] == d)
            rows = [(length, ms) for length, ms in rows if ms is not None]
            if len(rows) > 1:
                base_len, base_ms = rows[0]
                scaling[f"{mode}-d{d}"] = [{"length": length, "ms": ms, "time_ratio": ms / base_ms,
                                            "length_ratio": length / base_len} for length, ms in rows]
    return scaling


def result_path(out_dir: str, info: Dict) -> str:
    device = re.sub(r"[^A-Za-z0-9]+", "-", info.get("device", "nodevice")).strip("-").lower()
    return os.path.join(out_dir, f"{device}_{info['date'][:10]}.json")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for the JSON results (created if missing)")
    parser.add_argument("--quick", action="store_true", help="shorter lengths only (1k/4k dense, 8k/16k window)")
    parser.add_argument("--only", choices=("dense", "window"), help="run one group of cases")
    parser.add_argument("--head-dims", default="64,128", help="comma-separated head dims (default 64,128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="list the cases and their FLOPs; no GPU needed")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny cases, on CPU tensors without a GPU (set TRITON_INTERPRET=1); numbers mean nothing")
    args = parser.parse_args(argv)
    try:
        args.head_dims = [int(x) for x in args.head_dims.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--head-dims must be comma-separated integers, got {args.head_dims!r}")
    if not args.head_dims or any(d <= 0 or HIDDEN % d for d in args.head_dims):
        parser.error(f"--head-dims must be positive divisors of {HIDDEN}, got {args.head_dims}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    cases = plan(args.quick, args.only, args.head_dims, args.smoke)
    info = environment()
    if args.dry_run:
        info["dry_run"] = True
        payload = {"environment": info, "cases": [{"case": asdict(c), "fwd_flops": c.flops("fwd"),
                                                   "bwd_flops": c.flops("bwd")} for c in cases]}
        path = os.path.join(args.out, "gpu_bench_plan.json")
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
        for c in cases:
            print(f"{c.name:36s} B={c.batch:<3d} H={c.heads:<3d} fwd {c.flops('fwd') / 1e12:8.2f} TFLOP")
        print(f"{len(cases)} cases planned; wrote {path}")
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("gpu_bench: no CUDA device visible to torch (--dry-run lists the cases, --smoke runs tiny ones on CPU)",
              file=sys.stderr)
        return 2
    if device == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        print("gpu_bench: --smoke without a GPU needs TRITON_INTERPRET=1 in the environment", file=sys.stderr)
        return 2
    info["smoke"] = args.smoke
    path = result_path(args.out, info)
    records = []
    for number, case in enumerate(cases, 1):
        print(f"[{number}/{len(cases)}] {case.name} (B={case.batch}, H={case.heads})", flush=True)
        try:
            record = run_case(case, args.seed, device)
        except Exception:  # keep going: one broken case must not lose the others
            record = {"case": asdict(case), "error": traceback.format_exc(limit=3)}
            print(record["error"], flush=True)
        records.append(record)
        _print_record(record)
        with open(path, "w") as f:
            json.dump({"environment": info, "cases": records, "window_scaling": window_scaling(records)}, f, indent=2)
    print(f"wrote {path}")
    ours_failed = [r["case"]["name"] for r in records if "error" in r
                   or any("error" in r[m]["results"]["attnkern_triton"] for m in ("fwd", "bwd"))]
    if ours_failed:
        print(f"attnkern failed on: {', '.join(ours_failed)}", file=sys.stderr)
    return 1 if ours_failed else 0


def _print_record(record: Dict) -> None:
    for mode in ("fwd", "bwd"):
        entry = record.get(mode)
        if not entry:
            continue
        parts = []
        for name, r in entry["results"].items():
            parts.append(f"{name} {r['tflops']:.1f}" if "tflops" in r else f"{name} n/a")
        speed = entry.get("speedup_vs", {})
        err = entry.get("error", {})
        print(f"    {mode} TFLOP/s: " + ", ".join(parts)
              + (f" | attnkern x{speed['sdpa_best']:.2f} vs best SDPA" if "sdpa_best" in speed else "")
              + (f" | x{speed['flex']:.2f} vs flex" if "flex" in speed else "")
              + (f" | err vs {err['vs']}: " + ", ".join(f"{k} {v:.1e}" for k, v in err.items() if k != "vs")
                 if err else ""), flush=True)


if __name__ == "__main__":
    sys.exit(main())
