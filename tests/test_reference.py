"""The oracle itself, checked against independent definitions: torch's SDPA (float64),
a per-row brute-force loop for windows, published Philox test vectors, and counting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnkern
from attnkern import reference
from attnkern._semantics import attended_pairs, band_mask
from attnkern.bench.flops import attention_flops


def _ref(q, k, v, **kw):
    return attnkern.scaled_dot_product_attention(q, k, v, backend="math", **kw)


# torch does not combine attn_mask with is_causal, so neither do these comparisons
@pytest.mark.parametrize("causal,mask", [(False, None), (True, None), (False, "bool"), (False, "float")])
@pytest.mark.parametrize("gqa", [False, True])
def test_matches_torch_sdpa_float64(causal, mask, gqa, seed):
    B, H, L, S, E = 2, 4, 13, 13 if causal else 21, 8
    Hkv = 2 if gqa else H
    q = torch.randn(B, H, L, E, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, E, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, 5, dtype=torch.float64)
    m = None
    if mask == "bool":
        m = torch.rand(B, 1, L, S) > 0.3
        m[..., 0] = True  # torch gives NaN for rows with no key; keep every row non-empty
    elif mask == "float":
        m = torch.randn(1, H, L, S, dtype=torch.float64)
    ours = _ref(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa, scale=0.3)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal, enable_gqa=gqa, scale=0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_bottom_right_matches_torch_causal_lower_right(seed):
    from torch.nn.attention.bias import causal_lower_right

    q = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    k = torch.randn(2, 3, 19, 8, dtype=torch.float64)
    v = torch.randn(2, 3, 19, 8, dtype=torch.float64)
    theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(7, 19))
    ours = attnkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                                    backend="math").transpose(1, 2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window,causal,bottom_right", [((3, 5), False, False), ((0, 0), False, True),
                                                        ((4, -1), True, False), ((-1, 2), False, True)])
def test_window_matches_row_by_row_loop(window, causal, bottom_right, seed):
    L, S, E = 9, 14, 4
    q = torch.randn(1, 1, L, E, dtype=torch.float64)
    k = torch.randn(1, 1, S, E, dtype=torch.float64)
    v = torch.randn(1, 1, S, 3, dtype=torch.float64)
    if bottom_right:
        out = attnkern.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal,
                                       window_size=window, backend="math").transpose(1, 2)
    else:
        out = _ref(q, k, v, is_causal=causal, window_size=window)
    left, right = window
    offset = S - L if bottom_right else 0
    for i in range(L):
        pos = i + offset
        keys = [j for j in range(S) if (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
                and (not causal or j <= pos)]
        if not keys:
            assert torch.equal(out[0, 0, i], torch.zeros(3, dtype=torch.float64))
            continue
        scores = torch.stack([q[0, 0, i] @ k[0, 0, j] for j in keys]) / E**0.5
        expected = torch.softmax(scores, 0) @ v[0, 0, keys]
        torch.testing.assert_close(out[0, 0, i], expected, rtol=1e-12, atol=1e-12)


def test_philox_known_answers():
    """Random123's published Philox4x32-10 test vectors."""
    t = lambda x: torch.tensor([x], dtype=torch.int64)  # noqa: E731
    vectors = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for ctr, key, expected in vectors:
        got = reference.philox4x32(*(t(c) for c in ctr), key)
        assert tuple(int(x) for x in got) == expected


def test_dropout_mask_rate_and_layout():
    keep = reference.dropout_keep_mask(seed=42, p=0.25, batch=2, heads=3, len_q=50, len_k=64)
    assert keep.shape == (2, 3, 50, 64)
    assert abs(keep.double().mean().item() - 0.75) < 0.02
    # the (b, h) slices use different counters, so they differ
    assert not torch.equal(keep[0, 0], keep[1, 2])


@pytest.mark.parametrize("L,S,left,right,offset", [(10, 10, -1, -1, 0), (10, 10, -1, 0, 0), (7, 20, 3, 2, 13),
                                                   (20, 7, 0, 0, -13), (15, 15, 255, 0, 0), (5, 9, -1, 17, 0)])
def test_attended_pairs_counts_the_band(L, S, left, right, offset):
    brute = int(band_mask(L, S, left, right, offset).sum())
    assert attended_pairs(L, S, left, right, offset) == brute


def test_flops_hand_computed():
    # dense: 4 * B * H * L * S * D
    assert attention_flops(2, 3, 5, 7, 8) == 4 * 2 * 3 * 5 * 7 * 8
    # causal is counted as half; backward 2.5x, fwd+bwd 3.5x
    assert attention_flops(1, 1, 4, 4, 2, causal=True) == 4 * 4 * 4 * 2 / 2
    assert attention_flops(1, 1, 4, 4, 2, mode="fwd+bwd") == 3.5 * 4 * 4 * 4 * 2
    # window (1, 0) on L = S = 4: rows see 1, 2, 2, 2 keys = 7 pairs; E = Ev = 2 -> 2 * 7 * 4
    assert attention_flops(1, 1, 4, 4, 2, window=(1, 0)) == 2 * 7 * 4
    # Ev differs: 2 * pairs * (E + Ev)
    assert attention_flops(1, 2, 3, 3, 4, head_dim_v=6) == 2 * 2 * 9 * 10
