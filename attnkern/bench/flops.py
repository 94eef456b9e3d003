"""FLOP accounting for attention: the one definition every benchmark and report uses.

Forward FLOPs are ``2 * pairs * (E + Ev)`` per (batch, head): one multiply-add per
(query, key, dim) for Q K^T and one for P V, where ``pairs`` is the number of attended
(query, key) pairs. Dense attention has ``L * S`` pairs; plain causal attention is
counted as half of that (the convention of FlashAttention's and PyTorch's published
figures); any other window counts its exact pairs (attnkern._semantics.attended_pairs).
Backward is 2.5x the forward (five matrix products instead of two).
"""

from __future__ import annotations

from typing import Optional, Tuple

from .._semantics import attended_pairs, normalize_window

MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attended(len_q: int, len_k: int, causal: bool = False, window: Optional[Tuple[int, int]] = None,
             bottom_right: bool = False) -> float:
    """Attended (query, key) pairs per head under the accounting convention above."""
    if window is None or tuple(window) == (-1, -1):
        return len_q * len_k / 2 if causal else float(len_q * len_k)
    left, right = normalize_window(window, causal)
    offset = len_k - len_q if bottom_right else 0
    return float(attended_pairs(len_q, len_k, left, right, offset))


def attention_flops(batch: int, heads: int, len_q: int, len_k: int, head_dim: int, head_dim_v: Optional[int] = None,
                    causal: bool = False, window: Optional[Tuple[int, int]] = None, bottom_right: bool = False,
                    mode: str = "fwd") -> float:
    """FLOPs of one attention call; ``mode`` is "fwd", "bwd" or "fwd+bwd"."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {tuple(MODE_FACTOR)}, got {mode!r}")
    dv = head_dim if head_dim_v is None else head_dim_v
    pairs = attended(len_q, len_k, causal, window, bottom_right)
    return 2.0 * batch * heads * pairs * (head_dim + dv) * MODE_FACTOR[mode]
