"""Launch configurations: a few autotune candidates per GPU architecture, pruned per problem.

Autotuning is keyed on the padded head dims, the dtype (the autotuner adds tensor dtypes itself),
the band kind (dense / causal-like / local window), the mask and dropout specialisations
and power-of-two length buckets, so one tuning serves a whole shape family. Each set has
at most four candidates so a family's first call compiles in seconds, not minutes.
Candidates whose tiles cannot fit the device's shared memory are pruned before compiling.

ATTNKERN_TRITON_AUTOTUNE=0 turns tuning off: each kernel takes the first candidate that fits,
one compile per specialisation (the GPU tests use it to stay within minutes).

Under TRITON_INTERPRET=1 there is no tuning: one small fixed tile keeps the CPU tests fast
and still gives several blocks per sequence, so edge and interior blocks are both exercised.
"""

from __future__ import annotations

import os
from typing import Dict, List

import triton

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture and padded head dim (64, 128, 256).
# BLOCK_M is the query tile and BLOCK_N the key tile in every pass. Every entry was compiled for
# its architecture (bf16) with Triton 3.6 and 3.8, the ends of the supported range: its shared
# memory fits (227 KiB on sm90, 163 KiB on sm80) and ptxas spills at most 256 bytes;
# tests/test_triton_compile.py's slow sweep checks both, and CI runs it with each version.
# Triton 3.6 spills more in the dK/dV pass (dK and dV accumulate in registers): its
# (32, 128, 8, 3) at head dim 128 on sm90 spilled 504 bytes, (64, 64, 8, 2) on sm80 268 and
# (16, 64, 8, 2) at head dim 256 on sm90 276. Their replacements, (16, 128, 8, 3), (64, 32, 8, 2)
# and (32, 32, 8, 3), spill 80 / 8, 52 / 0 and 140 / 64 bytes with Triton 3.6 / 3.8.
# Which entry is fastest is for the autotuner to find on the GPU.
_FWD = {
    "sm90": {
        64: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
        128: [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
        256: [(64, 64, 8, 3), (128, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 2)],
    },
    "sm80": {
        64: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3)],
        128: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2)],
        256: [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 4, 2)],
    },
}
_BWD_DKDV = {  # key tile resident (dK, dV accumulate in registers), query tiles streamed
    "sm90": {
        64: [(32, 128, 8, 3), (32, 64, 4, 3), (16, 128, 8, 2)],
        128: [(16, 128, 8, 3), (32, 64, 8, 2), (16, 128, 8, 2)],
        256: [(32, 32, 8, 2), (16, 32, 8, 2), (32, 32, 8, 3)],
    },
    "sm80": {
        64: [(16, 128, 8, 2), (16, 64, 4, 3), (32, 128, 8, 3)],
        128: [(32, 64, 8, 2), (16, 128, 8, 2), (64, 32, 8, 2)],
        256: [(16, 32, 8, 2), (32, 32, 8, 2), (16, 64, 8, 2)],
    },
}
_BWD_DQ = {  # query tile resident, key tiles streamed
    "sm90": {
        64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
        128: [(128, 64, 8, 3), (64, 64, 8, 3), (128, 32, 8, 3)],
        256: [(128, 32, 8, 2), (64, 32, 8, 2), (32, 32, 4, 2)],
    },
    "sm80": {
        64: [(128, 32, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
        128: [(64, 64, 8, 3), (64, 32, 4, 3), (128, 32, 8, 2)],
        256: [(64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)],
    },
}
PREPROCESS = {"BLOCK_M": 64, "num_warps": 4}
INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 16}

AUTOTUNE_KEY = ["BLOCK_D", "BLOCK_DV", "MASK_KIND", "HAS_DROPOUT", "band_kind", "len_q_bucket", "len_k_bucket"]

BAND_DENSE, BAND_CAUSAL, BAND_LOCAL = 0, 1, 2


def arch_name(capability) -> str:
    """Config family for a CUDA compute capability (major, minor): Hopper or the Ampere set."""
    return "sm90" if capability[0] >= 9 else "sm80"


def band_kind(window_left: int, window_right: int) -> int:
    """Autotune key for the band: a left bound makes work O(L * W); a right bound alone halves it."""
    if window_left >= 0:
        return BAND_LOCAL
    return BAND_CAUSAL if window_right >= 0 else BAND_DENSE


def length_bucket(n: int) -> int:
    """Power-of-two bucket (128 .. 65536) of a sequence length: one tuning per bucket."""
    return 1 << min(16, max(7, (max(n, 1) - 1).bit_length()))


def _configs(table) -> List[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table]


def head_class(block_d: int, block_dv: int) -> int:
    """Which head-dim table serves padded head dims (block_d, block_dv): 64, 128 or 256."""
    return min(c for c in (64, 128, 256) if c >= max(block_d, block_dv))


def _smem_bytes(config: triton.Config, args: Dict, kind: str) -> int:
    """Shared memory of a config: the resident tile plus ``num_stages`` buffers of the streamed
    tiles (and of the mask tile). Matches what Triton 3.8 allocates for these kernels on sm80/sm90
    when the loads are pipelined (checked against compiled kernels' metadata)."""
    elem = args["Q"].element_size()
    d, dv = args["BLOCK_D"], args["BLOCK_DV"]
    m, n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
    mask_elem = args["Mask"].element_size() if args["MASK_KIND"] else 0
    streamed = stages * (elem * (m if kind == "dkdv" else n) * (d + dv) + mask_elem * m * n)
    if kind == "dkdv":  # the streamed rows' LSE and delta
        streamed += stages * m * 8
    streamed += 1024  # barriers and small scratch
    if args.get("HAS_DROPOUT"):  # the keep mask's layout conversion: 4 KiB more on sm90 with Triton 3.8
        streamed += 4096  # (measured: packed dK/dV 16x128 and forward 64x64 tiles; nothing more on sm80)
    if kind == "fwd":  # Q resident, K and V streamed
        return elem * m * d + streamed
    if kind == "dkdv":  # K and V resident, Q and dO streamed
        return elem * n * (d + dv) + streamed
    return elem * m * (d + dv) + streamed  # dq: Q and dO resident, K and V streamed


def _pruner(kind: str, smem_limit: int, tune: bool):
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        fits = [c for c in configs if _smem_bytes(c, args, kind) <= smem_limit]
        # tiles longer than the sequence only add masked work
        short = [c for c in fits if c.kwargs["BLOCK_M"] <= max(64, args["len_q_bucket"])
                 and c.kwargs["BLOCK_N"] <= max(64, args["len_k_bucket"])]
        chosen = short or fits
        if not chosen:  # nothing fits the estimate: keep the smallest and let the compiler decide
            chosen = [min(configs, key=lambda c: _smem_bytes(c, args, kind))]
        return chosen if tune else chosen[:1]  # a single candidate is launched without benchmarking

    return prune


_TABLES = {"fwd": _FWD, "dkdv": _BWD_DKDV, "dq": _BWD_DQ}


def tuning_enabled() -> bool:
    return os.environ.get("ATTNKERN_TRITON_AUTOTUNE", "1") != "0"


def autotuned(kernel, kind: str, arch: str, head: int, smem_limit: int, tune: bool = True):
    """The autotuned launcher of ``kernel`` ("fwd", "dkdv" or "dq") for one architecture and head class."""
    return triton.autotune(
        configs=_configs(_TABLES[kind][arch][head]),
        key=AUTOTUNE_KEY,
        prune_configs_by={"early_config_prune": _pruner(kind, smem_limit, tune)},
    )(kernel)
