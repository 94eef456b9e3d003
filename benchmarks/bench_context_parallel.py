"""Context parallelism on CPU (gloo): per-rank time and bytes sent for ring, allgather and halo.

    python benchmarks/bench_context_parallel.py [--worlds 2 4] [--seq 4096] [--json out.json]

For each group size P it spawns P ranks (one thread each), runs forward+backward of
``context_parallel_attention`` per strategy and band, and reports per rank: the median time,
the bytes sent (``count_communication``) next to the communication model's bytes
(``attnkern.distributed.cost_model``), and the time relative to one process running the whole
sequence with attnkern in the same run (``vs 1 proc``: per-rank time x P / single time; 1.0
would be perfect scaling of the work, on an idle machine with a core per rank). The load
average and thread count are recorded; on a shared machine the times are noisy, the bytes are
exact.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import attnkern  # noqa: E402
import attnkern.distributed as cp  # noqa: E402
from attnkern.distributed import cost_model  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 2, 64
WINDOW = 256
CASES = (  # (strategy, band name, causal, window)
    ("ring", "causal", True, None),
    ("allgather", "causal", True, None),
    ("ring", f"causal W={WINDOW}", True, (WINDOW - 1, 0)),
    ("allgather", f"causal W={WINDOW}", True, (WINDOW - 1, 0)),
    ("halo", f"causal W={WINDOW}", True, (WINDOW - 1, 0)),
)


def _inputs(seq):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(1, h, seq, HEAD_DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS, HEADS)]


def _time(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank(rank, world, store, seq, reps, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    q, k, v, dout = _inputs(seq)
    rows = []
    for strategy, band, causal, window in CASES:
        ql, kl, vl = (cp.shard_sequence(t, dim=2).requires_grad_(True) for t in (q, k, v))
        dl = cp.shard_sequence(dout, dim=2)

        def step():
            out = cp.context_parallel_attention(ql, kl, vl, causal=causal, window_size=window, strategy=strategy)
            out.backward(dl)

        dist.barrier()
        seconds = _time(step, reps)
        with cp.count_communication() as log:
            step()
        rows.append({"strategy": strategy, "band": band, "rank": rank, "seconds": seconds,
                     "bytes": cp.bytes_sent(log)})
    torch.save(rows, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def single_process(seq, reps):
    torch.set_num_threads(1)
    q, k, v, dout = _inputs(seq)
    found = {}
    for _, band, causal, window in CASES:
        if band in found:
            continue
        qs, ks, vs = (t.clone().requires_grad_(True) for t in (q, k, v))

        def step():
            attnkern.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, enable_gqa=True,
                                                  window_size=window).backward(dout)

        found[band] = _time(step, reps)
    return found


def run(worlds, seq, reps):
    single = single_process(seq, reps)
    results = []
    for world in worlds:
        with tempfile.TemporaryDirectory() as tmp:
            mp.start_processes(_rank, args=(world, os.path.join(tmp, "store"), seq, reps, tmp), nprocs=world,
                               start_method="spawn")
            rows = [row for r in range(world) for row in torch.load(os.path.join(tmp, f"rank{r}.pt"))]
        for strategy, band, causal, window in CASES:
            mine = [r for r in rows if r["strategy"] == strategy and r["band"] == band]
            cfg = cost_model.Config(seq, world, heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype_bytes=4,
                                    window=(window or (-1, 0))[0:1] + (0,))
            model = sum(cost_model.bytes_per_rank(strategy, cfg).values())
            slowest = max(r["seconds"] for r in mine)
            results.append({
                "world": world, "strategy": strategy, "band": band, "seconds_per_rank_max": slowest,
                "bytes_per_rank_max": max(r["bytes"] for r in mine), "model_bytes_per_rank": model,
                "single_process_seconds": single[band], "vs_single": slowest * world / single[band],
            })
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    results = run(args.worlds, args.seq, args.reps)
    header = (f"context parallelism, CPU gloo, L={args.seq}, B=1, H={HEADS}, H_kv={KV_HEADS}, E={HEAD_DIM}, fp32, "
              f"1 thread per rank, load avg {load:.1f} -> {os.getloadavg()[0]:.1f}")
    print(header)
    print("| P | strategy | band | s/rank (fwd+bwd) | vs 1 proc | bytes/rank | model bytes |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['world']} | {r['strategy']} | {r['band']} | {r['seconds_per_rank_max']:.3f} | "
              f"{r['vs_single']:.2f} | {r['bytes_per_rank_max']} | {r['model_bytes_per_rank']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "threads_per_rank": 1, "load_avg_start": load, "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
