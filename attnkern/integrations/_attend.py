"""The two ways the integrations compute attention.

``attend`` runs attnkern's kernels (through the capability table) in torch's layout, with
the one thing the public functions do not expose together: a mask *and* bottom-right
alignment, which a KV cache needs. ``plain_attention`` is the explicit softmax used where a
caller needs the attention weights or the score is not a dot product.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import dispatch
from .._semantics import check_backend, normalize_torch_layout, normalize_window, with_modifiers


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    *,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = None,
    bottom_right: bool = False,
    softcap: float = 0.0,
    sinks: Optional[torch.Tensor] = None,
    alibi_slopes: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """attnkern attention in torch's layout ``(..., H, L, E)``; GQA when key/value have fewer heads.

    ``mask`` follows attnkern's convention (bool True takes part, float is added). With
    ``bottom_right=True`` query row i sits at key position ``i + S - L`` for ``is_causal`` and
    the window, as after a KV cache. ``softcap``, ``sinks`` and ``alibi_slopes`` are the score
    modifiers of :func:`attnkern.scaled_dot_product_attention`.
    """
    backend = check_backend(backend)
    enable_gqa = query.dim() >= 3 and key.dim() >= 3 and key.shape[-3] != query.shape[-3]
    q, k, v, mask, problem, out_shape = normalize_torch_layout(
        query, key, value, mask, dropout_p, is_causal, scale, enable_gqa, window_size, bottom_right=bottom_right
    )
    problem, sinks, alibi = with_modifiers(problem, q, softcap, sinks, alibi_slopes)
    out, _ = dispatch.run(problem, q, k, v, mask, backend, sinks, alibi)
    return out.reshape(out_shape)


def masked_softmax(scores: torch.Tensor, allowed: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim restricted to ``allowed``; rows with no allowed entry give zeros.

    Disallowed scores become the dtype's lowest finite value rather than -inf, so a row with
    nothing allowed yields finite (uniform) values that are then zeroed, and autograd never
    multiplies a NaN by zero.
    """
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    lowest = torch.finfo(scores.dtype).min
    probs = torch.softmax(scores.masked_fill(~allowed, lowest), dim=-1)
    return probs.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


def checked_window(window_size, name: str = "window_size") -> Optional[Tuple[int, int]]:
    """``None`` or a validated ``(left, right)`` pair of ints (-1: unbounded), as given."""
    if window_size is None:
        return None
    return normalize_window(window_size, False, name)
