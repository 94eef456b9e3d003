"""``attnkern packed``: packed-sequence (varlen) and paged-decode benchmarks.

A client of the public API only. Every subject of a case is timed round-robin in the same run
(timing.measure), and the report gives each one's time relative to attnkern's:

* varlen: B documents, lengths uniform in [lo, hi] or long-tailed (log-uniform), packed, against
  (a) the same batch padded to the longest and run dense (attnkern and torch SDPA), (b) torch's
  own ``torch.nn.attention.varlen.varlen_attn`` and nested-jagged SDPA where they run here, and
  (c) FlexAttention with a document mask (compiled; compile time is not timed);
* decode: one new query per sequence against a KV cache: attnkern's contiguous cache, paged
  caches (pages of 16 and 256), and torch SDPA on the (already gathered) contiguous cache and on
  the cache as it lies ((B, S, H, D), the bytes attnkern reads).

Subjects that cannot run here are listed with the reason. Figures carry the thread count and
the load average: on a shared machine they are indicative only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import attnkern

from .report import device_info, format_table, versions
from .timing import Runner, TimingSettings, measure


def document_lengths(batch: int, lo: int, hi: int, dist: str, gen: torch.Generator) -> List[int]:
    u = torch.rand(batch, generator=gen, dtype=torch.float64)
    if dist == "uniform":
        return [int(lo + x * (hi - lo)) for x in u]
    # long-tailed: log-uniform, most documents short and a few long
    return [int(math.exp(math.log(lo) + x * (math.log(hi) - math.log(lo)))) for x in u]


def _cu(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def _padded(x: torch.Tensor, lengths: Sequence[int], longest: int) -> torch.Tensor:
    """(total, H, D) packed -> (B, H, longest, D), zeros past each length."""
    out = x.new_zeros(len(lengths), longest, *x.shape[1:])
    start = 0
    for b, n in enumerate(lengths):
        out[b, :n] = x[start:start + n]
        start += n
    return out.transpose(1, 2).contiguous()


def varlen_subjects(lengths, heads, heads_kv, dim, dtype, causal, grad, skip=()) -> Dict[str, object]:
    """name -> (fn, [tensors to differentiate]) or the reason it does not run here (or is skipped:
    a skipped subject is not even built, FlexAttention's compile being slow)."""
    total, longest = sum(lengths), max(lengths)
    cu = _cu(lengths)

    def leaf(*shape):
        return torch.randn(*shape, dtype=dtype).requires_grad_(grad)

    q, k, v = leaf(total, heads, dim), leaf(total, heads_kv, dim), leaf(total, heads_kv, dim)
    subjects: Dict[str, object] = {}
    subjects["attnkern-varlen"] = (
        lambda q, k, v: attnkern.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal), [q, k, v])
    # padded to the longest, dense; right padding under a top-left causal band leaves every real
    # query seeing only real keys (padded rows are computed and thrown away)
    qp, kp, vp = (_padded(t.detach(), lengths, longest).requires_grad_(grad) for t in (q, k, v))
    gqa = heads != heads_kv
    subjects["attnkern-padded"] = (
        lambda q, k, v: attnkern.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), [qp, kp, vp])
    subjects["sdpa-padded"] = (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa), [qp, kp, vp])
    import importlib.util

    if importlib.util.find_spec("torch.nn.attention.varlen") is None:
        subjects["torch-varlen_attn"] = "torch.nn.attention.varlen is not in this torch"
    elif q.device.type == "cpu":  # (not imported here: the import pulls in the compiler stack)
        subjects["torch-varlen_attn"] = "torch.nn.attention.varlen.varlen_attn has no CPU kernel in this torch"
    else:
        from torch.nn.attention.varlen import varlen_attn

        subjects["torch-varlen_attn"] = (
            lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest,
                                        window_size=(-1, 0) if causal else (-1, -1), enable_gqa=gqa), [q, k, v])
    if causal and q.device.type == "cpu":
        subjects["sdpa-nested-jagged"] = "torch's nested-jagged SDPA has no causal CPU path in this torch"
    elif gqa:
        subjects["sdpa-nested-jagged"] = "torch's nested-jagged SDPA takes no GQA here"
    else:
        offsets = cu.long()

        def njt(t):
            return torch.nested.nested_tensor_from_jagged(t, offsets).transpose(1, 2)

        subjects["sdpa-nested-jagged"] = (
            lambda q, k, v: F.scaled_dot_product_attention(njt(q), njt(k), njt(v), is_causal=causal).values(),
            [q, k, v])
    if "flex-document-mask" in skip:
        subjects["flex-document-mask"] = "skipped (--skip)"
        return subjects
    if grad and q.device.type == "cpu":
        subjects["flex-document-mask"] = "FlexAttention has no backward on CPU in this torch"
        return subjects
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))

        def document_mask(b, h, qi, ki):
            same = doc[qi] == doc[ki]
            return (same & (ki <= qi)) if causal else same

        block_mask = create_block_mask(document_mask, None, None, total, total, device=q.device.type)
        flex = torch.compile(flex_attention, dynamic=False)
        qf, kf, vf = (t.detach().transpose(0, 1)[None].contiguous().requires_grad_(grad) for t in (q, k, v))
        subjects["flex-document-mask"] = (
            lambda q, k, v: flex(q, k, v, block_mask=block_mask, enable_gqa=gqa), [qf, kf, vf])
    except Exception as exc:  # no FlexAttention, or no compiler for it here
        subjects["flex-document-mask"] = f"FlexAttention unavailable: {type(exc).__name__}: {exc}"[:200]
    return subjects


def decode_subjects(batch, cache_len, heads, heads_kv, dim, dtype) -> Dict[str, object]:
    """One query per sequence against cache_len cached keys (all sequences equally long, so the SDPA
    baseline needs no mask)."""
    q = torch.randn(batch, 1, heads, dim, dtype=dtype)
    kc = torch.randn(batch, cache_len, heads_kv, dim, dtype=dtype)
    vc = torch.randn(batch, cache_len, heads_kv, dim, dtype=dtype)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32)
    subjects: Dict[str, object] = {
        "attnkern-kvcache": (lambda q, k, v: attnkern.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens), [q, kc, vc])
    }
    for page in (16, 256):
        pages_per_seq = -(-cache_len // page)
        perm = torch.randperm(batch * pages_per_seq).view(batch, pages_per_seq).to(torch.int32)
        kp = torch.zeros(batch * pages_per_seq, page, heads_kv, dim, dtype=dtype)
        vp = torch.zeros_like(kp)
        flat = perm.flatten().long()
        padded = pages_per_seq * page
        kp[flat] = F.pad(kc, (0, 0, 0, 0, 0, padded - cache_len)).view(batch * pages_per_seq, page, heads_kv, dim)
        vp[flat] = F.pad(vc, (0, 0, 0, 0, 0, padded - cache_len)).view(batch * pages_per_seq, page, heads_kv, dim)
        subjects[f"attnkern-paged{page}"] = (
            lambda q, k, v, table=perm: attnkern.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens,
                                                                         block_table=table), [q, kp, vp])
    qt, kt, vt = q.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous(), vc.transpose(1, 2).contiguous()
    subjects["sdpa-gathered"] = (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, enable_gqa=heads != heads_kv), [qt, kt, vt])
    # the same bytes attnkern-kvcache reads: a head's rows heads_kv * dim elements apart. The
    # gathered copy's adjacent rows read faster at one query row per item (stop 20, README), so
    # only this row compares the kernels on equal memory
    subjects["sdpa-inplace"] = (
        lambda q, k, v: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                       enable_gqa=heads != heads_kv), [q, kc, vc])
    return subjects


def run_case(name: str, subjects: Dict[str, object], mode: str, settings: TimingSettings, reference: str) -> dict:
    runners, skipped, errors = {}, {}, {}
    for subject, entry in subjects.items():
        if isinstance(entry, str):
            skipped[subject] = entry
            continue
        fn, tensors = entry
        grad = [torch.randn_like(fn(*tensors).detach())] if mode != "fwd" else [None]
        runners[subject] = Runner(fn, mode, [list(tensors) + grad])
    stats = measure(runners, "cpu", settings, lambda s, exc, _: errors.__setitem__(s, f"{type(exc).__name__}: {exc}"[:200]))
    base = stats.get(reference)
    rows = []
    for subject, st in stats.items():
        rows.append(dict(case=name, subject=subject, mode=mode, median_ms=st.median_s * 1e3, iqr_ms=st.iqr_s * 1e3,
                         reps=st.reps, vs_attnkern=(st.median_s / base.median_s) if base else None))
    return dict(case=name, mode=mode, rows=rows, skipped=skipped, errors=errors)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="attnkern packed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=("varlen", "decode", "all"), default="all")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lengths", default="64:4096", help="lo:hi document lengths (default 64:4096)")
    p.add_argument("--dist", choices=("uniform", "longtail"), default=None, help="default: both")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--cache-len", type=int, default=4096)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--budget", type=float, default=2.0, help="measuring seconds per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--causal", choices=("both", "causal", "full"), default="both")
    p.add_argument("--skip", default="", help="comma-separated subjects not to run (e.g. sdpa-nested-jagged, "
                                              "whose CPU path is slow and memory-hungry at large sizes)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    dtype = getattr(torch, args.dtype)
    settings = TimingSettings(budget_s=args.budget, min_reps=3, max_reps=50, warmup_s=0.2, rotate=False)
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    lo, hi = (int(x) for x in args.lengths.split(":"))
    skip = [x for x in args.skip.split(",") if x]
    results = []
    if args.suite in ("varlen", "all"):
        for dist in ([args.dist] if args.dist else ["uniform", "longtail"]):
            lengths = document_lengths(args.batch, lo, hi, dist, gen)
            for causal in {"both": (True, False), "causal": (True,), "full": (False,)}[args.causal]:
                for mode in args.modes.split(","):
                    name = (f"varlen {dist} B={args.batch} tokens={sum(lengths)} longest={max(lengths)} "
                            f"H={args.heads}/{args.kv_heads} D={args.dim} {'causal' if causal else 'full'}")
                    subjects = varlen_subjects(lengths, args.heads, args.kv_heads, args.dim, dtype, causal,
                                               mode != "fwd", skip)
                    subjects.update({s: "skipped (--skip)" for s in skip if s in subjects})
                    results.append(run_case(name, subjects, mode, settings, "attnkern-varlen"))
                    _print(results[-1])
    if args.suite in ("decode", "all"):
        name = (f"decode B={args.decode_batch} cache={args.cache_len} H={args.heads}/{args.kv_heads} D={args.dim}")
        subjects = decode_subjects(args.decode_batch, args.cache_len, args.heads, args.kv_heads, args.dim, dtype)
        subjects.update({s: "skipped (--skip)" for s in skip if s in subjects})
        results.append(run_case(name, subjects, "fwd", settings, "attnkern-kvcache"))
        _print(results[-1])
    info = device_info("cpu")
    print(f"threads {info['threads']}, load average (1 min) {info.get('loadavg_1m')}, {info['name']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=info, versions=versions(), dtype=args.dtype, results=results), f, indent=1)
    return 1 if any(r["errors"] for r in results) else 0


def _print(result: dict) -> None:
    print(f"\n{result['case']}  [{result['mode']}]")
    body = [[r["subject"], f"{r['median_ms']:.2f}", f"{r['iqr_ms']:.2f}",
             "" if r["vs_attnkern"] is None else f"{r['vs_attnkern']:.2f}x"] for r in result["rows"]]
    print(format_table(["subject", "median ms", "iqr ms", "time / attnkern's"], body, "lrrr"))
    for subject, why in {**result["skipped"], **result["errors"]}.items():
        print(f"  {subject}: {why}")
