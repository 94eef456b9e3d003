"""Bad input raises ValueError/TypeError/RuntimeError naming the argument, never crashes."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import ops

sdpa = attnkern.scaled_dot_product_attention


def qkv(B=2, H=4, L=8, S=8, E=16, Ev=None, Hkv=None, dtype=torch.float32):
    Hkv = H if Hkv is None else Hkv
    return (torch.randn(B, H, L, E, dtype=dtype), torch.randn(B, Hkv, S, E, dtype=dtype),
            torch.randn(B, Hkv, S, E if Ev is None else Ev, dtype=dtype))


def raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_mismatched_batch():
    q, k, v = qkv()
    # batch dims broadcast as in torch (size 1 expands); other mismatches are refused
    k3, v3 = (torch.cat([t, t[:1]]) for t in (k, v))
    raises(ValueError, "batch dims do not broadcast", sdpa, q, k3, v3)
    raises(ValueError, "batch dims do not broadcast", sdpa, q, k, v3)


def test_mismatched_heads():
    q, k, v = qkv()
    raises(ValueError, "value heads", sdpa, q, k, v[:, :2])
    raises(ValueError, "enable_gqa", sdpa, q, k[:, :2], v[:, :2])


def test_gqa_heads_must_divide():
    q, k, v = qkv(H=4, Hkv=3)
    raises(ValueError, "multiple of key/value heads", sdpa, q, k, v, enable_gqa=True)
    fq, fk, fv = (t.transpose(1, 2) for t in qkv(H=4, Hkv=3))
    raises(ValueError, "multiple of k/v heads", attnkern.flash_attn_func, fq, fk, fv)


def test_mismatched_head_dim_and_lengths():
    q, k, v = qkv()
    raises(ValueError, "key head dim", sdpa, q, k[..., :8], v)
    raises(ValueError, "value length", sdpa, q, k, v[:, :, :5])


def test_wrong_ndim():
    q, k, v = qkv()
    raises(ValueError, "query must have at least 2 dimensions", sdpa, q[0, 0, 0], k[0, 0], v[0, 0])
    raises(ValueError, "q must be 4-D", attnkern.flash_attn_func, q[0], k, v)


def test_dtype_and_device_mismatch():
    q, k, v = qkv()
    raises(TypeError, "share a dtype", sdpa, q, k.half(), v)
    raises(TypeError, "query must be a floating tensor", sdpa, q.long(), k.long(), v.long())
    raises(TypeError, "key must be a floating tensor", sdpa, q, k.int(), v)
    raises(TypeError, "query must be a torch.Tensor", sdpa, q.tolist(), k, v)
    meta = torch.randn(2, 4, 8, 16, device="meta")
    raises(ValueError, "one device", sdpa, q, meta, v)


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), "ab", 5, (1.0, 2), (True, 2), (-2, 0), (0, -5), [None, 1]])
def test_bad_window(window):
    q, k, v = qkv()
    with pytest.raises((TypeError, ValueError), match="window_size"):
        sdpa(q, k, v, window_size=window)
    with pytest.raises((TypeError, ValueError), match="window_size"):
        attnkern.local_attention(q, k, v, window)


def test_window_accepts_lists_and_numpy_ints():
    import numpy as np

    q, k, v = qkv()
    a = sdpa(q, k, v, window_size=[np.int64(2), 3])
    b = sdpa(q, k, v, window_size=(2, 3))
    assert torch.equal(a, b)


def test_mask_that_does_not_broadcast():
    q, k, v = qkv(L=8, S=10)
    raises(ValueError, "attn_mask of shape", sdpa, q, k, v, attn_mask=torch.ones(8, 9, dtype=torch.bool))
    raises(ValueError, "attn_mask of shape", sdpa, q, k, v, attn_mask=torch.ones(3, 1, 8, 10, dtype=torch.bool))
    raises(TypeError, "attn_mask must be bool or floating", sdpa, q, k, v, attn_mask=torch.ones(8, 10, dtype=torch.int32))
    raises(TypeError, "attn_mask must be a torch.Tensor", sdpa, q, k, v, attn_mask=[[1]])


@pytest.mark.parametrize("p", [-0.1, 1.5, float("nan")])
def test_dropout_out_of_range(p):
    q, k, v = qkv()
    raises(ValueError, "dropout_p", sdpa, q, k, v, dropout_p=p)


def test_dropout_wrong_type():
    q, k, v = qkv()
    raises(TypeError, "dropout_p", sdpa, q, k, v, dropout_p="0.1")


def test_unknown_or_unusable_backend():
    q, k, v = qkv()
    raises(ValueError, "backend must be one of", sdpa, q, k, v, backend="flash")
    raises(ValueError, "backend must be one of", attnkern.flash_attn_func, q, k, v, backend=None)
    if "cuda" not in attnkern.available_backends():
        raises(RuntimeError, "backend='cuda' cannot run", sdpa, q, k, v, backend="cuda")
    raises(RuntimeError, "float64", sdpa, q.double(), k.double(), v.double(), backend="cpu")


def test_bad_scale_and_flags():
    q, k, v = qkv()
    raises(TypeError, "scale", sdpa, q, k, v, scale="x")
    raises(ValueError, "scale must be finite", sdpa, q, k, v, scale=float("inf"))
    raises(TypeError, "is_causal", sdpa, q, k, v, is_causal=1)
    raises(TypeError, "enable_gqa", sdpa, q, k, v, enable_gqa="yes")
    raises(TypeError, "return_lse", attnkern.flash_attn_func, q, k, v, return_lse=1)


@pytest.mark.skipif(ops.native_fwd is None, reason="C++ extension not built")
def test_op_level_checks_name_arguments():
    """Calling the op directly (as C++ or compiled graphs do) is checked at the C++ edge too."""
    q, k, v = qkv()
    fwd = torch.ops.attnkern.fwd
    raises(ValueError, "query must be 4-D", fwd, q[0], k, v, None, None, 0.25, -1, -1, False, 0.0)
    raises(ValueError, "attn_mask must have shape", fwd, q, k, v, torch.ones(1, 1, 8, 8, dtype=torch.bool), None,
           0.25, -1, -1, False, 0.0)
    raises(ValueError, "rng_seed", fwd, q, k, v, None, None, 0.25, -1, -1, False, 0.5)
    raises(ValueError, "window_left/window_right", fwd, q, k, v, None, None, 0.25, -3, -1, False, 0.0)
    raises(ValueError, "dropout_p", fwd, q, k, v, None, None, 0.25, -1, -1, False, 1.0)
    raises(TypeError, "must be float32, float16 or bfloat16", fwd, q.double(), k.double(), v.double(), None, None,
           0.25, -1, -1, False, 0.0)
    raises(TypeError, "attn_mask must be bool, float32", fwd, q, k, v, torch.ones(2, 4, 8, 8, dtype=torch.float64),
           None, 0.25, -1, -1, False, 0.0)
    out, lse = fwd(q, k, v, None, None, 0.25, -1, -1, False, 0.0)
    raises(ValueError, "lse must be float32", torch.ops.attnkern.bwd, out, None, q, k, v, out, lse[:, :, :3], None,
           None, 0.25, -1, -1, False, 0.0, False)
    raises(ValueError, "grad_out must have shape", torch.ops.attnkern.bwd, out[:, :1], None, q, k, v, out, lse, None,
           None, 0.25, -1, -1, False, 0.0, False)
