"""A communication model for context-parallel attention: bytes per rank, and the
compute/communication ratio at a given link bandwidth and attention throughput.

Bytes are exactly what :mod:`attnkern.distributed` sends (tests/test_distributed.py checks
them against ``count_communication`` on gloo); times are a model:

* compute time = attention FLOPs of the rank's (query, key) pairs / ``flops_per_s``
  (forward 4 * pairs * E per head, backward 2.5x that, flash-style with recompute);
* transfer time = latency + bytes / bandwidth per message;
* a ring overlaps each hop's transfer with that hop's compute, so a hop costs
  max(compute, transfer); halo overlaps its transfer with the attention of the rank's own rows
  (everything but the pairs that reach into the halo), so it costs
  max(own-rows compute, transfer) + halo-pairs compute; all-gather and all-to-all transfers
  are counted as exposed (not overlapped).

Run ``python -m attnkern.distributed.cost_model`` for the table in README.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Dict, Optional, Tuple

from .._semantics import attended_pairs
from .attention import _fits_halo, halo_pieces, ring_hops
from .layout import chunks_per_rank


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s, one direction, per rank
    latency: float  # s per message


# Per-GPU, one direction. NVLink 4 (H100 SXM): 900 GB/s bidirectional -> 450 GB/s each way.
# InfiniBand NDR: 400 Gb/s per NIC, one NIC per GPU -> 50 GB/s.
LINKS = {
    "nvlink": Link("NVLink (H100, 450 GB/s)", 450e9, 3e-6),
    "ib": Link("InfiniBand NDR (50 GB/s)", 50e9, 6e-6),
}
# Achieved attention throughput of one H100 in bf16 (flash-attention forward reaches roughly
# 40-70% of the 989 TFLOP/s dense peak); an assumption, change it with ``flops_per_s``.
H100_ATTENTION_FLOPS = 400e12


@dataclass(frozen=True)
class Config:
    seq_len: int
    world: int
    batch: int = 1
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 128
    dtype_bytes: int = 2
    window: Tuple[int, int] = (-1, 0)  # (left, right) on global positions, -1 unbounded; causal: right 0
    layout: str = "zigzag"

    @property
    def local_len(self) -> int:
        return self.seq_len // self.world

    def kv_row_bytes(self, element_bytes: Optional[int] = None) -> int:
        """Bytes of one token's K|V over the kv heads (element size: the dtype's, or fp32 for gradients)."""
        return self.batch * self.kv_heads * 2 * self.head_dim * (element_bytes or self.dtype_bytes)


def hops(cfg: Config) -> Tuple[int, int]:
    """Ring hops each way (exact geometry up to 64 ranks; beyond, windows need the hops they need
    at 64 ranks and unbounded bands need P-1)."""
    if cfg.world <= 64:
        return ring_hops(cfg.world, cfg.local_len, cfg.layout, *cfg.window)
    fwd, back = ring_hops(64, cfg.local_len, cfg.layout, *cfg.window)
    return (cfg.world - 1, 0) if fwd + back >= 63 else (fwd, back)


def halo_rows(cfg: Config) -> int:
    """Most K|V rows any rank receives (= sends) in a halo exchange."""
    if cfg.world <= 64:
        pieces = halo_pieces(cfg.world, cfg.local_len, cfg.layout, *cfg.window)
        per_rank = [sum(p.length for p in pieces if p.owner == r and p.receiver != r) for r in range(cfg.world)]
        return max(per_rank)
    return halo_rows(replace(cfg, world=64, seq_len=cfg.local_len * 64))


def bytes_per_rank(strategy: str, cfg: Config) -> Dict[str, int]:
    """Bytes one rank sends (the busiest rank), forward and backward, as attnkern sends them."""
    shard = cfg.local_len * cfg.kv_row_bytes()
    grad_shard = cfg.local_len * cfg.kv_row_bytes(4)  # dK|dV accumulators travel in fp32
    p = cfg.world
    if p == 1:
        return {"forward": 0, "backward": 0}
    if strategy == "ring":
        n = sum(hops(cfg))
        return {"forward": n * shard, "backward": n * (shard + grad_shard)}
    if strategy == "allgather":
        return {"forward": (p - 1) * shard, "backward": (p - 1) * grad_shard}
    if strategy == "halo":
        rows = halo_rows(cfg)
        return {"forward": rows * cfg.kv_row_bytes(), "backward": rows * cfg.kv_row_bytes(4)}
    if strategy == "ulysses":
        q_bytes = cfg.batch * cfg.heads * cfg.local_len * cfg.head_dim * cfg.dtype_bytes
        lse_bytes = cfg.batch * cfg.heads * cfg.local_len * 4
        part = (p - 1) / p
        fwd = part * (q_bytes + shard + q_bytes + lse_bytes)  # q, k|v to head shards; out, lse back
        bwd = part * (q_bytes + q_bytes + shard)  # dout in; dq, dk|dv back (no LSE gradient)
        return {"forward": int(fwd), "backward": int(bwd)}
    raise ValueError(f"unknown strategy {strategy!r}")


def pairs_per_rank(cfg: Config) -> int:
    """(query, key) pairs a rank computes, assuming the balanced share (zigzag balances causal)."""
    total = attended_pairs(cfg.seq_len, cfg.seq_len, cfg.window[0], cfg.window[1], 0) if cfg.seq_len <= 1 << 16 \
        else _pairs_closed_form(cfg)
    return math.ceil(total / cfg.world)


def _pairs_closed_form(cfg: Config) -> int:
    n, (left, right) = cfg.seq_len, cfg.window
    left = n - 1 if left < 0 else min(left, n - 1)
    right = n - 1 if right < 0 else min(right, n - 1)
    # each row sees left + right + 1 keys, minus those cut off at the sequence ends
    return n * (left + right + 1) - left * (left + 1) // 2 - right * (right + 1) // 2


def halo_pair_fraction(cfg: Config) -> float:
    """Share of a rank's (query, key) pairs whose key is a halo row (about W^2/2 per chunk side)."""
    left, right = (max(w, 0) for w in cfg.window)
    chunks = chunks_per_rank(cfg.layout)
    return min(1.0, chunks * (left * (left + 1) + right * (right + 1)) / 2 / pairs_per_rank(cfg))


def evaluate(strategy: str, cfg: Config, link: Link, flops_per_s: float = H100_ATTENTION_FLOPS) -> Dict[str, float]:
    """Per-rank forward+backward compute and communication time, their ratio, and the
    efficiency (compute time / modelled time) for one attention layer."""
    flops_fwd = 4 * cfg.batch * cfg.heads * cfg.head_dim * pairs_per_rank(cfg)
    compute = {"forward": flops_fwd / flops_per_s, "backward": 2.5 * flops_fwd / flops_per_s}
    sent = bytes_per_rank(strategy, cfg)
    comm, total = {}, {}
    for phase in ("forward", "backward"):
        if strategy == "ring" and sum(hops(cfg)):
            steps = sum(hops(cfg)) + 1  # hops plus the rank's own shard
            per_step_compute = compute[phase] / steps
            per_step_comm = link.latency + sent[phase] / sum(hops(cfg)) / link.bandwidth
            comm[phase] = per_step_comm * sum(hops(cfg))
            total[phase] = sum(hops(cfg)) * max(per_step_compute, per_step_comm) + per_step_compute
        else:
            messages = 0 if not sent[phase] else 2
            comm[phase] = messages * link.latency + sent[phase] / link.bandwidth
            edge = halo_pair_fraction(cfg) if strategy == "halo" else 1.0  # the compute that must wait
            total[phase] = max(compute[phase] * (1 - edge), comm[phase]) + compute[phase] * edge
    compute_s, comm_s, total_s = (sum(d.values()) for d in (compute, comm, total))
    return {
        "bytes": sum(sent.values()),
        "compute_s": compute_s,
        "comm_s": comm_s,
        "compute_over_comm": compute_s / comm_s if comm_s else math.inf,
        "comm_fraction": comm_s / compute_s,
        "exposed_fraction": (total_s - compute_s) / compute_s,
        "efficiency": compute_s / total_s,
    }


def auto_strategy(cfg: Config) -> str:
    return "halo" if _fits_halo(cfg.world, cfg.local_len, cfg.layout, *cfg.window) else "ring"


def table(flops_per_s: float = H100_ATTENTION_FLOPS) -> str:
    """The README table: L up to 1M tokens, P up to 1024, NVLink and InfiniBand."""
    lines = [
        "| L | P | S/rank | band | strategy | MB/rank (fwd+bwd) | NVLink comp/comm | NVLink eff. | IB comp/comm "
        "| IB eff. |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seq_len, world, window in (
        (131072, 16, (-1, 0)), (131072, 16, (4095, 0)), (1 << 20, 128, (-1, 0)), (1 << 20, 128, (4095, 0)),
        (1 << 20, 1024, (-1, 0)), (1 << 20, 1024, (4095, 0)), (1 << 20, 16, (4095, 0)), (1 << 20, 64, (-1, -1)),
    ):
        cfg = Config(seq_len, world, window=window)
        strategies = ["ring", "allgather"] + (["halo"] if auto_strategy(cfg) == "halo" else [])
        band = "full" if window == (-1, -1) else "causal" if window[0] < 0 else f"causal W={window[0] + 1}"
        for strategy in strategies:
            nv, ib = (evaluate(strategy, cfg, LINKS[k], flops_per_s) for k in ("nvlink", "ib"))
            lines.append(
                f"| {seq_len} | {world} | {cfg.local_len} | {band} | {strategy} | {nv['bytes'] / 1e6:.1f} | "
                f"{nv['compute_over_comm']:.1f} | {nv['efficiency']:.0%} | {ib['compute_over_comm']:.1f} | "
                f"{ib['efficiency']:.0%} |"
            )
    return "\n".join(lines)


def targets(flops_per_s: float = H100_ATTENTION_FLOPS) -> str:
    """The issue's two targets, evaluated by the model (bf16, head dim 128)."""
    out = []
    for kv_heads, name in ((32, "MHA (32 kv heads)"), (8, "GQA 32/8")):
        for link_key in ("nvlink", "ib"):
            worst = exposed = 0.0
            for world in (2, 8, 64, 1024):
                for local in (16384, 65536):  # S_local = 4W and 16W with W = 4096
                    cfg = Config(local * world, world, kv_heads=kv_heads, window=(4095, 0), layout="contiguous")
                    result = evaluate("halo", cfg, LINKS[link_key], flops_per_s)
                    worst = max(worst, result["comm_fraction"])
                    exposed = max(exposed, result["exposed_fraction"])
            out.append(f"halo, W=4096, S_local >= 4W, {name}, {LINKS[link_key].name}: "
                       f"communication <= {worst:.1%} of attention time ({exposed:.1%} left exposed by the overlap)")
    for link_key in ("nvlink", "ib"):
        for kv_heads, name in ((32, "MHA"), (8, "GQA 32/8")):
            cfg = Config(8192 * 8, 8, kv_heads=kv_heads)
            eff = evaluate("ring", cfg, LINKS[link_key], flops_per_s)["efficiency"]
            out.append(f"zigzag ring, causal, 8k tokens/rank, P=8, {name}, {LINKS[link_key].name}: "
                       f"{eff:.0%} of single-device throughput per rank")
    return "\n".join(out)


if __name__ == "__main__":
    print(f"attention throughput assumed: {H100_ATTENTION_FLOPS / 1e12:.0f} TFLOP/s per rank (bf16, head dim 128, "
          f"32 query heads, 8 kv heads, batch 1)\n")
    print(table())
    print()
    print(targets())
