"""fp32 on AMX tiles: the three-way bf16 split's accuracy and speed against the AVX-512 FMA path.

In the amx_bf16 kernel variant, the fp32 forward's block products run as sums of bf16 products
of split operands (csrc/cpu/gemm_amx.h, gemm_split); ``attnkern.ops._C._set_cpu_fp32_amx_terms``
switches the term count in this process (0: the FMA path, 6, 9; 1 and 3 for scale: a plain bf16
product and bf16x3).

    python benchmarks/bench_cpu_fp32_split.py accuracy --out benchmarks/quiet/cpu-fp32-split-accuracy.json
    python benchmarks/bench_cpu_fp32_split.py speed --threads 2 --out benchmarks/quiet/cpu-fp32-split-speed.json

accuracy: max abs and relative RMS error of the output (and max abs of the LSE) against the
float64 reference (backend="math"), on random inputs of several shapes, per term count.
speed: one process, subjects timed in turn, medians, ratios against the FMA path and torch
SDPA (fp32) in the same run; the load average before and after is recorded. The 1- and 3-term
subjects and the bf16 AMX path on the same values separate the split's own cost (packing the
pieces) from the cost per term.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

import attnkern
from attnkern import ops
from attnkern.bench.report import cpu_name, write_json

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_bf16_isa import interleaved_medians, make_step  # noqa: E402

TERMS = (0, 1, 3, 6, 9)
NAMES = {0: "fma", 1: "bf16 (1 term)", 3: "bf16x3", 6: "split 6 terms", 9: "split 9 terms"}
# (B, H, L, S, D, causal, q multiplier): tails (L, S not multiples of 16/32), large scores
ACCURACY_CASES = [
    (1, 4, 512, 512, 64, False, 1.0),
    (1, 4, 512, 512, 64, True, 1.0),
    (2, 2, 333, 517, 64, False, 1.0),
    (1, 4, 512, 512, 128, False, 1.0),
    (1, 4, 700, 700, 128, True, 1.0),
    (1, 4, 512, 512, 64, False, 8.0),
    (1, 4, 512, 512, 128, True, 8.0),
]


def setup(threads: int) -> dict:
    torch.set_num_threads(threads)
    if ops._C.cpu_isa() != "amx_bf16":
        raise SystemExit(f"the split runs in the amx_bf16 variant only; this process has {ops._C.cpu_isa()}")
    return {"cpu": cpu_name(), "cpus": os.cpu_count(), "isa": ops._C.cpu_isa(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "loadavg_before": os.getloadavg()}


def accuracy(args) -> dict:
    meta = setup(args.threads)
    rows = []
    for b, h, length, keys, d, causal, mult in ACCURACY_CASES:
        torch.manual_seed(args.seed + len(rows))
        q = torch.randn(b, length, h, d) * mult
        k, v = torch.randn(b, keys, h, d), torch.randn(b, keys, h, d)
        ref, ref_lse = attnkern.flash_attn_func(q.double(), k.double(), v.double(), causal=causal,
                                                             backend="math", return_lse=True)
        row = {"case": f"B{b} H{h} L={length} S={keys} D{d} {'causal' if causal else 'dense'} q*{mult:g}"}
        for terms in TERMS:
            ops._C._set_cpu_fp32_amx_terms(terms)
            out, lse = attnkern.flash_attn_func(q, k, v, causal=causal, backend="cpu", return_lse=True)
            diff = out.double() - ref
            row[NAMES[terms]] = {
                "max_abs": diff.abs().max().item(),
                "rel_rms": (diff.norm() / ref.norm()).item(),
                "lse_max_abs": (lse.double() - ref_lse).abs().max().item(),
            }
        ops._C._set_cpu_fp32_amx_terms(-1)
        rows.append(row)
        print(row, flush=True)
    summary = {}
    for name in ("split 6 terms", "split 9 terms", "bf16x3"):
        summary[f"{name} / fma, worst case, rel_rms"] = max(r[name]["rel_rms"] / r["fma"]["rel_rms"] for r in rows)
        summary[f"{name} / fma, worst case, max_abs"] = max(r[name]["max_abs"] / r["fma"]["max_abs"] for r in rows)
    print(summary)
    return {**meta, "what": "fp32 forward error vs float64 (backend='math') per fp32 product path", "cases": rows,
            "summary": summary}


def speed(args) -> dict:
    meta = setup(args.threads)
    cases = []
    for label, length, causal, backward in (("dense fwd L=2048", 2048, False, False),
                                            ("causal fwd+bwd L=1024", 1024, True, True),
                                            ("causal fwd L=2048", 2048, True, False)):
        torch.manual_seed(0)
        shape = (1, 8, length, 64)
        x = [torch.randn(shape, requires_grad=backward) for _ in range(3)]
        grad = torch.randn(shape)

        def ours(terms, causal=causal):
            def call(*t):
                ops._C._set_cpu_fp32_amx_terms(terms)
                return attnkern.scaled_dot_product_attention(*t, is_causal=causal, backend="cpu")
            return call

        subjects = {NAMES[t]: make_step(ours(t), x, grad, backward) for t in TERMS}
        # the bf16 AMX path on the same values: one product per block, no split (the split's cost
        # is about "bf16 (1 term)" minus this)
        xb = [t.detach().bfloat16().requires_grad_(backward) for t in x]
        subjects["bf16 inputs, amx_bf16"] = make_step(ours(0), xb, grad.bfloat16(), backward)
        subjects["torch sdpa"] = make_step(lambda *t, causal=causal: F.scaled_dot_product_attention(*t, is_causal=causal),
                                           x, grad, backward)
        med = interleaved_medians(subjects, args.rounds)
        ops._C._set_cpu_fp32_amx_terms(-1)
        row = {"case": f"fp32 B1 H8 D64 {label}", "median_s": med,
               "ratios": {f"{NAMES[t]} vs fma": med["fma"] / med[NAMES[t]] for t in TERMS[1:]}}
        row["ratios"].update({f"{n} vs torch sdpa": med["torch sdpa"] / med[n] for n in (NAMES[0], NAMES[6], NAMES[9])})
        cases.append(row)
        print(row, flush=True)
    return {**meta, "rounds": args.rounds, "cases": cases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("accuracy", "speed"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--label", default=None, help="e.g. 'loaded machine (load 2.1)'")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = accuracy(args) if args.mode == "accuracy" else speed(args)
    result.update({"benchmark": "benchmarks/bench_cpu_fp32_split.py " + args.mode,
                   "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "loadavg_after": os.getloadavg()})
    if args.label:
        result["label"] = args.label
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
