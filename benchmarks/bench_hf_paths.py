"""The Hugging Face integration's routes for padded batches, timed against each other in one run.

* prefill / training (no cache, L == S), causal, rows left-padded by a share of S drawn per row:
  "mask" (the dense op, the padding as a stride-0 (B, 1, 1, S) bool mask) against "unpad" (the
  real tokens gathered, the varlen op, the output scattered back), forward and forward+backward.
  The rule in attnkern/integrations/hf.py (UNPAD_MAX_WORK) is read off the work ratio
  sum(L_b^2) / (B S^2) where the two cross.
* decoding (one query per row against Hugging Face's (B, Hk, S, D) cache, left-padded): "mask"
  against "leftpad" (flash_attn_with_kvcache reading the cache in place with cache_leftpad), and
  both without padding ("mask" with no mask, "kvcache" without cache_leftpad).

Every subject is the integration's attention function itself (the route forced through
hf.UNPAD_MAX_WORK / hf.DECODE_VIA_KVCACHE), inputs in the layout Hugging Face hands over, so the
figures include the gathers, scatters and copies each route costs. Every subject of a case is timed round-robin
(attnkern.bench.timing); the JSON records torch's thread count and the load average.

    python benchmarks/bench_hf_paths.py --json benchmarks/packed/hf-paths-loaded.json
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from attnkern.bench.packed import _print, run_case
from attnkern.bench.report import device_info, versions
from attnkern.bench.timing import TimingSettings
from attnkern.integrations import hf


def left_padding(batch: int, length: int, share: float, gen: torch.Generator) -> torch.Tensor:
    """(B, S) bool: row b keeps its last S - pad_b tokens, pad_b uniform in [0, 2 * share * S]."""
    pads = (torch.rand(batch, generator=gen) * 2 * share * length).long().clamp_max(length - 1)
    return torch.arange(length)[None, :] >= pads[:, None]


class _Module(torch.nn.Module):
    is_causal = True


def _hf_layout(batch, heads, length, dim, grad=False):
    """(B, H, S, D) as Hugging Face's attention layers hand it over: a transposed view of a
    (B, S, H, D) projection."""
    return torch.randn(batch, length, heads, dim).requires_grad_(grad).transpose(1, 2)


def _route(attention, mask, **switches):
    """The integration's attention function with its padded-batch route forced (round-robin timing
    calls the subjects alternately, so each call sets the switches it needs)."""
    def run(q, k, v):
        for name, value in switches.items():
            setattr(hf, name, value)
        return attention(_Module(), q, k, v, mask)[0]
    return run


def prefill_subjects(padding, heads, heads_kv, dim, window, grad):
    B, S = padding.shape
    q, k, v = _hf_layout(B, heads, S, dim, grad), _hf_layout(B, heads_kv, S, dim, grad), _hf_layout(B, heads_kv, S, dim, grad)
    attention = hf._make_attention_function("auto")
    mask = hf.BandMask(window[0], window[1], True, padding, S)
    return {
        "mask": (_route(attention, mask, UNPAD_MAX_WORK=-1.0), [q, k, v]),
        "unpad": (_route(attention, mask, UNPAD_MAX_WORK=1.0), [q, k, v]),
    }


def decode_subjects(padding, heads, heads_kv, dim):
    B, S = padding.shape
    q = _hf_layout(B, heads, 1, dim)
    # a DynamicCache's keys are torch.cat results: contiguous (B, Hk, S, D)
    k, v = torch.randn(B, heads_kv, S, dim), torch.randn(B, heads_kv, S, dim)
    attention = hf._make_attention_function("auto")
    padded, full = hf.BandMask(-1, 0, True, padding, S), hf.BandMask(-1, 0, True, None, S)
    return {
        "mask": (_route(attention, padded, DECODE_VIA_KVCACHE=False), [q, k, v]),
        "leftpad": (_route(attention, padded, DECODE_VIA_KVCACHE=True), [q, k, v]),
        "mask-unpadded": (_route(attention, full), [q, k, v]),
        "kvcache-unpadded": (lambda q, k, v: hf._leftpad_attention(q, k, v, torch.ones_like(padding), (-1, 0), None,
                                                                    "auto", {}), [q, k, v]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=1024, help="prefill S")
    p.add_argument("--shares", default="0,0.1,0.2,0.35,0.5", help="mean padding share of S per row")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--cache-lens", default="512,4096")
    p.add_argument("--decode-heads", default="32:8:128", help="H:Hk:D of the decoding cases")
    p.add_argument("--budget", type=float, default=1.5, help="measuring seconds per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    settings = TimingSettings(budget_s=args.budget, min_reps=3, max_reps=50, warmup_s=0.2, rotate=False)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    results = []
    for share in (float(x) for x in args.shares.split(",")):
        padding = left_padding(args.batch, args.length, share, gen)
        lengths = padding.sum(1).double()
        work = float((lengths ** 2).sum()) / (args.batch * args.length ** 2)
        for mode in args.modes.split(","):
            name = (f"prefill B={args.batch} S={args.length} pad share={share} work={work:.3f} "
                    f"H={args.heads}/{args.kv_heads} D={args.dim} causal")
            subjects = prefill_subjects(padding, args.heads, args.kv_heads, args.dim, (-1, 0), mode != "fwd")
            result = run_case(name, subjects, mode, settings, "mask")
            result.update(work=work, share=share)
            results.append(result)
            _print(result)
    heads, heads_kv, dim = (int(x) for x in args.decode_heads.split(":"))
    for cache_len in (int(x) for x in args.cache_lens.split(",")):
        padding = left_padding(args.batch, cache_len, 0.25, gen)
        name = f"decode B={args.batch} S={cache_len} left pad share 0.25 H={heads}/{heads_kv} D={dim}"
        result = run_case(name, decode_subjects(padding, heads, heads_kv, dim), "fwd", settings, "mask")
        results.append(result)
        _print(result)
    info = device_info("cpu")
    print(f"threads {info['threads']}, load average (1 min) {info.get('loadavg_1m')} (loaded machine), {info['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=info, versions=versions(), label="loaded machine", results=results), f, indent=1)
    return 1 if any(r["errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
