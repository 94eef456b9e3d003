"""The public attention functions. Each one normalises its arguments (attnkern._semantics)
and hands canonical tensors to the chosen backend (attnkern.dispatch)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import dispatch
from ._semantics import (causal_bias_alignment, check_backend, normalize_flash_layout, normalize_torch_layout,
                         with_modifiers)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    *,
    window_size: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, plus local windows.

    Layout ``(..., H, L, E)`` for query and ``(..., H_kv, S, E)`` / ``(..., H_kv, S, Ev)``
    for key and value. ``attn_mask`` is bool (True takes part) or float (added to the
    scores) and broadcasts to ``(..., L, S)``. ``is_causal`` and ``window_size=(left, right)``
    are top-left aligned: query i sees keys ``i - left <= j <= i + right`` (-1: unbounded).
    A query row that can see no key returns zeros. torch's ``CausalBias`` masks
    (``causal_upper_left``/``causal_lower_right``) mean causal in top-left/bottom-right alignment.

    Score modifiers: ``softcap`` (Gemma 2's logit cap, 0 for none), ``sinks`` (``(H,)``
    learned logits joining each row's softmax denominator, gpt-oss), ``alibi_slopes``
    (``(H,)`` or ``(B, H)`` fp32, for 4-D inputs) — see the README's Semantics table.
    """
    backend = check_backend(backend)
    bottom_right = causal_bias_alignment(attn_mask)
    if bottom_right is not None:
        if is_causal:
            raise ValueError("attn_mask is a CausalBias, which is already causal: do not pass is_causal=True too")
        attn_mask, is_causal = None, True
    q, k, v, mask, problem, out_shape = normalize_torch_layout(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, window_size, bool(bottom_right)
    )
    problem, sinks, alibi = with_modifiers(problem, q, softcap, sinks, alibi_slopes)
    out, _ = dispatch.run(problem, q, k, v, mask, backend, sinks, alibi)
    return out if out.shape == out_shape else out.reshape(out_shape)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window_size: Tuple[int, int],
    *,
    causal: bool = False,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Sliding-window attention in torch's layout ``(..., H, L, E)``, top-left aligned.

    Query i attends keys ``i - left <= j <= i + right`` with ``window_size=(left, right)``;
    ``causal=True`` also caps ``right`` at 0. Costs O(L * window), not O(L * S).
    Key/value heads may divide the query heads (GQA).
    """
    if window_size is None:
        raise TypeError("window_size must be a pair of ints (left, right), got None")
    enable_gqa = isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.dim() >= 3 and k.dim() >= 3 and (
        q.shape[-3] != k.shape[-3]
    )
    return scaled_dot_product_attention(
        q, k, v, None, 0.0, causal, scale, enable_gqa, window_size=window_size, backend=backend
    )


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: Tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Optional[torch.Tensor] = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    *,
    s_aux: Optional[torch.Tensor] = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Drop-in for flash-attn's ``flash_attn_func``: layout ``(batch, seqlen, heads, headdim)``.

    The positional order is flash-attn 2's exactly. Causal masks and windows are bottom-right
    aligned, as in flash-attn >= 2.1: query i sits at key position ``i + S - L``. MQA/GQA by
    passing fewer k/v heads. ``softcap`` and ``alibi_slopes`` (``(H,)`` or ``(B, H)`` fp32) as in
    flash-attn; ``s_aux`` are attention sinks (``(H,)`` logits, gpt-oss). Every backward is
    deterministic, so ``deterministic`` changes nothing. With ``return_lse=True`` (keyword
    only) returns ``(out, lse)``, lse of shape ``(batch, heads, seqlen_q)`` fp32 (natural log;
    -inf for rows that see no key and have no sink). ``return_attn_probs=True`` is not
    supported (attnkern never materialises the probabilities).
    """
    backend = check_backend(backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    if return_attn_probs is not False:
        raise ValueError("return_attn_probs=True is not supported: use return_lse=True for the softmax statistics")
    qt, kt, vt, _, problem, _ = normalize_flash_layout(q, k, v, dropout_p, softmax_scale, causal, window_size)
    problem, sinks, alibi = with_modifiers(problem, qt, softcap, s_aux, alibi_slopes, "s_aux")
    out, lse = dispatch.run(problem, qt, kt, vt, None, backend, sinks, alibi)
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
