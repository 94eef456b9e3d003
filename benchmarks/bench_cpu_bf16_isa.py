"""bf16 on the CPU: attnkern's kernel variants against each other, attnkern fp32 and torch SDPA.

One process, subjects timed in turn (A B C ... A B C ...), medians; each attnkern variant is
switched in with ``attnkern.ops._C._set_cpu_isa`` right before its call. Cases (issue 10,
item 5): B=1 H=8 D=64, L=S=2048 dense and L=S=1024 causal, forward and forward+backward.

    python benchmarks/bench_cpu_bf16_isa.py --threads 2 --out benchmarks/quiet/cpu-bf16-isa.json

The ratios are the figures to quote; the load average before and after the run is recorded
(on a shared machine, label the figures with it). Where AVX512_BF16 is present the run also
records ``dot_rate`` (benchmarks/bench_cpu_dot_rate.py): vdpbf16ps's multiply rate against fp32
FMA on this CPU, which bounds what the avx512_bf16 variant can gain over the conversion path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import attnkern
from attnkern import ops
from attnkern.bench.flops import attention_flops
from attnkern.bench.report import cpu_name, write_json

VARIANTS = ("amx_bf16", "avx512", "avx512_bf16")


def available_variants() -> list:
    found = []
    for isa in VARIANTS:
        try:
            ops._C._set_cpu_isa(isa)
            found.append(isa)
        except RuntimeError:
            pass
    ops._C._set_cpu_isa("auto")
    return found


def make_step(fn, tensors, grad, backward: bool):
    if not backward:
        return lambda: fn(*tensors)

    def run():
        out = fn(*tensors)
        torch.autograd.grad(out, tensors, grad)

    return run


def case_subjects(length: int, causal: bool, backward: bool, variants: list) -> dict:
    torch.manual_seed(0)
    shape = (1, 8, length, 64)
    fp32 = [torch.randn(shape, requires_grad=backward) for _ in range(3)]
    bf16 = [t.detach().bfloat16().requires_grad_(backward) for t in fp32]
    g32, g16 = torch.randn(shape), torch.randn(shape).bfloat16()

    def ours(isa):
        def call(*x):
            ops._C._set_cpu_isa(isa)
            return attnkern.scaled_dot_product_attention(*x, is_causal=causal, backend="cpu")

        return call

    def sdpa(*x):
        return F.scaled_dot_product_attention(*x, is_causal=causal)

    subjects = {f"attnkern bf16 {isa}": make_step(ours(isa), bf16, g16, backward) for isa in variants}
    subjects["attnkern fp32"] = make_step(ours("avx512" if "avx512" in variants else "auto"), fp32, g32, backward)
    subjects["torch sdpa bf16"] = make_step(sdpa, bf16, g16, backward)
    subjects["torch sdpa fp32"] = make_step(sdpa, fp32, g32, backward)
    return subjects


def interleaved_medians(fns: dict, rounds: int) -> dict:
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants = available_variants()
    load_before = os.getloadavg()
    cases = []
    for length, causal in ((2048, False), (1024, True)):
        for backward in (False, True):
            medians = interleaved_medians(case_subjects(length, causal, backward, variants), args.rounds)
            flops = attention_flops(1, 8, length, length, 64, causal=causal, mode="fwd+bwd" if backward else "fwd")
            best = f"attnkern bf16 {variants[0]}" if variants else None
            row = {
                "case": f"B1 H8 L=S={length} D64 {'causal' if causal else 'dense'} {'fwd+bwd' if backward else 'fwd'}",
                "median_s": medians,
                "gflops": {k: flops / t / 1e9 for k, t in medians.items()},
                "ratios": {
                    f"{v} vs avx512 conversion path": medians["attnkern bf16 avx512"] / medians[f"attnkern bf16 {v}"]
                    for v in variants if v != "avx512" and "avx512" in variants
                },
            }
            # (the bf16 target against fp32 is for each bf16 variant: avx512_bf16 on CPUs without AMX)
            for v in variants:
                if v != "avx512":
                    row["ratios"][f"{v} bf16 vs attnkern fp32"] = medians["attnkern fp32"] / medians[f"attnkern bf16 {v}"]
            if best:
                row["ratios"][f"{variants[0]} bf16 vs torch sdpa bf16"] = medians["torch sdpa bf16"] / medians[best]
            cases.append(row)
            print(json.dumps(row, indent=1), flush=True)
    ops._C._set_cpu_isa("auto")
    result = {
        "benchmark": "benchmarks/bench_cpu_bf16_isa.py",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count(),
                    "default_isa": ops._C.cpu_isa(), "amx": ops._C.cpu_amx()},
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "torch": torch.__version__,
        "cases": cases,
    }
    if "avx512_bf16" in variants:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_cpu_dot_rate import measure

        result["dot_rate"] = measure()
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
