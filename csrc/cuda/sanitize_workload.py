"""A small forward + backward of every CUDA kernel, for compute-sanitizer (csrc/cuda/sanitize.sh).

Covers the prefill forward (fast and masked/dropout variants), the split-KV decode forward and
its merge, the delta, dK/dV (both passes at head dim 256) and dQ kernels, with odd lengths,
GQA, windows in both alignments, a broadcast float mask with its gradient, and dropout.
On compute capability 9.0 with a 9.0a build, the calls with head dims up to 128 (not decoding)
run once more through the Hopper wgmma kernels (ATTNKERN_CUDA_WGMMA=1; their TMA, mbarrier and
named-barrier traffic under racecheck and synccheck). Shapes are small so the sanitizers finish
in minutes. Exit status 0 if every call ran; the numbers are checked by tests/test_cuda.py, not
here.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

import attnkern  # noqa: E402


def run(head_dim, len_q, len_k, heads_q=4, heads_kv=2, window=None, causal=False, mask=None, dropout_p=0.0,
        flash=False, dtype=torch.bfloat16):
    torch.manual_seed(0)
    dev = "cuda"
    q = torch.randn(2, heads_q, len_q, head_dim, device=dev, dtype=dtype, requires_grad=True)
    k = torch.randn(2, heads_kv, len_k, head_dim, device=dev, dtype=dtype, requires_grad=True)
    v = torch.randn(2, heads_kv, len_k, head_dim, device=dev, dtype=dtype, requires_grad=True)
    inputs = [q, k, v]
    if flash:  # bottom-right alignment, (B, L, H, D) layout
        qf, kf, vf = (t.detach().transpose(1, 2).contiguous().requires_grad_(True) for t in (q, k, v))
        out = attnkern.flash_attn_func(qf, kf, vf, causal=causal, window_size=window or (-1, -1), backend="cuda")
        inputs = [qf, kf, vf]
    else:
        m = None
        if mask == "float":
            m = torch.randn(1, 1, len_q, len_k, device=dev, dtype=dtype, requires_grad=True)
            inputs.append(m)
        elif mask == "bool":
            m = torch.rand(2, heads_q, len_q, len_k, device=dev) > 0.3
        out = attnkern.scaled_dot_product_attention(q, k, v, attn_mask=m, dropout_p=dropout_p, is_causal=causal,
                                                    enable_gqa=heads_q != heads_kv, window_size=window,
                                                    backend="cuda")
    grads = torch.autograd.grad(out, inputs, torch.randn_like(out))
    torch.cuda.synchronize()
    return [out, *grads]


def main() -> int:
    calls = [
        dict(head_dim=64, len_q=77, len_k=130),
        dict(head_dim=128, len_q=150, len_k=150, causal=True, heads_q=2, heads_kv=2),
        dict(head_dim=64, len_q=200, len_k=170, window=(20, 5)),
        dict(head_dim=96, len_q=90, len_k=60, window=(8, 0), causal=True, flash=True),
        dict(head_dim=64, len_q=70, len_k=90, mask="float", causal=True),
        dict(head_dim=32, len_q=70, len_k=90, mask="bool", dropout_p=0.2, dtype=torch.float16),
        dict(head_dim=256, len_q=40, len_k=70, causal=True),
        dict(head_dim=40, len_q=33, len_k=65),  # padded head dim: 40 runs in the 64 bucket
        dict(head_dim=128, len_q=1, len_k=3000, heads_q=8, heads_kv=1),  # split-KV decode + merge
        dict(head_dim=64, len_q=16, len_k=900, heads_q=8, heads_kv=2, causal=True, flash=True),
    ]
    def not_built(kwargs):  # a trimmed build (ATTNKERN_CUDA_HDIMS / _DTYPES) left this call out
        return attnkern.ops._C_cuda.why_not(kwargs["head_dim"], kwargs["head_dim"],
                                            str(kwargs.get("dtype", torch.bfloat16)).replace("torch.", ""))

    for kwargs in calls:
        reason = not_built(kwargs)
        if reason:
            print(f"skipped {kwargs}: {reason}")
            continue
        results = run(**kwargs)
        assert all(torch.isfinite(t).all() for t in results), f"non-finite result for {kwargs}"
        print(f"ran {kwargs}")
    hopper = torch.cuda.get_device_capability() == (9, 0) and attnkern.ops._C_cuda.sm90_instances()
    if hopper:
        os.environ["ATTNKERN_CUDA_WGMMA"] = "1"
        for kwargs in calls:
            if kwargs["head_dim"] > 128 or kwargs["len_q"] <= 16 or not_built(kwargs):
                continue  # served by the sm80 kernels, run above, or not built
            results = run(**kwargs)
            assert all(torch.isfinite(t).all() for t in results), f"non-finite result for {kwargs} (wgmma)"
            print(f"ran {kwargs} with the wgmma kernels")
        del os.environ["ATTNKERN_CUDA_WGMMA"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
