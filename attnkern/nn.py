"""Attention modules on attnkern's kernels.

* :class:`MultiheadAttention`: ``torch.nn.MultiheadAttention`` (same constructor, forward
  signature, parameters and state-dict keys, so checkpoints load both ways) plus
  ``window_size``.
* :class:`LocalSelfAttention`: sliding-window self-attention with GQA.
* :class:`AdditiveAttention` (Bahdanau et al., 2015) and :class:`LuongAttention` (Luong et
  al., 2015): the sequence-to-sequence attentions that predate the Transformer.

Dot-product scores run on attnkern's fused kernels; additive (``concat``) scores, Luong's
``local-p`` Gaussian window and ``need_weights=True`` (which must return the weights) use an
explicit softmax. Padding masks follow torch's ``key_padding_mask`` convention everywhere:
bool ``True`` marks a key to ignore, a float mask is added to the scores. A query that can
see no key gets a zero output.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._semantics import band_mask, check_backend, check_softcap, normalize_window
from .integrations._attend import attend, checked_window, masked_softmax

__all__ = ["AdditiveAttention", "LocalSelfAttention", "LuongAttention", "MultiheadAttention"]


def _keep_encoder_fast_path_off(module, args):
    """Forward pre-hook that does nothing; see MultiheadAttention.__init__ for why it exists."""
    return None


def _check_float_or_bool(mask: Optional[Tensor], name: str) -> None:
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool or floating tensor, got {mask.dtype}")


def _torch_mask_to_additive_or_allowed(masks, dtype):
    """Combine torch-convention masks (bool True = ignore; float = added) into one attnkern mask.

    All bool: a bool mask, True where a key takes part. Any float: one additive float mask,
    with -inf where a bool mask said ignore.
    """
    masks = [m for m in masks if m is not None]
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        ignored = masks[0]
        for m in masks[1:]:
            ignored = ignored | m
        return ~ignored
    total = None
    for m in masks:
        add = torch.zeros((), dtype=dtype, device=m.device).masked_fill(m, float("-inf")) if m.dtype == torch.bool \
            else m.to(dtype)
        total = add if total is None else total + add
    return total


def _plain_weights(q, k, mask, scale, window, dropout_p):
    """Explicit softmax(q k^T * scale + mask) restricted to the band: ``(..., L, S)`` weights."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    allowed = None
    if window is not None and (window[0] >= 0 or window[1] >= 0):
        allowed = band_mask(q.shape[-2], k.shape[-2], window[0], window[1], 0, device=q.device)
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask if allowed is None else allowed & mask
        else:
            scores = scores + mask
            finite = scores > float("-inf")
            allowed = finite if allowed is None else allowed & finite
    probs = masked_softmax(scores, None if allowed is None else allowed.expand_as(scores))
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` on attnkern's kernels, plus ``window_size``.

    Constructor, forward signature, parameters and state-dict keys are torch's (this is a
    subclass), so ``load_state_dict`` works in both directions. Differences:

    * ``window_size=(left, right)``: query i attends keys ``i - left .. i + right`` (top-left
      aligned; -1 unbounded), intersected with ``is_causal`` and the masks.
    * ``is_causal=True`` works without ``attn_mask`` (torch requires one as a hint); with
      one, both apply.
    * ``need_weights=True`` (torch's default) must return the weights, so, as in torch, the
      attention is then computed explicitly; pass ``need_weights=False`` to run the kernels.
    * A query row that can see no key outputs zeros (torch gives NaN).
    * Nested-tensor inputs are not supported.

    ``backend`` picks attnkern's backend (see ``attnkern.available_backends()``).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *,
                 window_size: Optional[Tuple[int, int]] = None, backend: str = "auto") -> None:
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim, vdim, batch_first,
                         device, dtype)
        self.window_size = checked_window(window_size)
        self.backend = check_backend(backend)
        # nn.TransformerEncoderLayer's eval fast path (torch._transformer_encoder_layer_fwd)
        # reads self_attn's weights and never calls this forward, which would drop
        # window_size and attnkern; that path declines when any submodule has a hook.
        self.register_forward_pre_hook(_keep_encoder_fast_path_off)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, backend={self.backend!r}"

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        for t, name in ((query, "query"), (key, "key"), (value, "value")):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
            if t.is_nested:
                raise NotImplementedError(f"attnkern.nn.MultiheadAttention does not take nested tensors ({name})")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 2-D (L, E) or 3-D (batched), got shape {tuple(query.shape)}")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(
                f"query, key and value must have the same number of dims, got {query.dim()}, {key.dim()}, {value.dim()}"
            )
        if not isinstance(is_causal, bool):
            raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
        _check_float_or_bool(key_padding_mask, "key_padding_mask")
        _check_float_or_bool(attn_mask, "attn_mask")
        self_attention = query is key and key is value
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        out, weights = self._attention(query, key, value, key_padding_mask, need_weights, attn_mask,
                                       average_attn_weights, is_causal, self_attention)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _project(self, query, key, value, self_attention):
        if self._qkv_same_embed_dim and self_attention:
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        if self._qkv_same_embed_dim:
            weights = self.in_proj_weight.chunk(3)
        else:
            weights = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        biases = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return tuple(F.linear(x, w, b) for x, w, b in zip((query, key, value), weights, biases))

    def _attention(self, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
                   is_causal, self_attention):
        batch, len_q, embed = query.shape
        len_k = key.shape[1]
        heads, head_dim = self.num_heads, self.head_dim
        if embed != self.embed_dim:
            raise ValueError(f"query embedding dim {embed} does not match embed_dim {self.embed_dim}")
        if key.shape[0] != batch or value.shape[0] != batch:
            raise ValueError(f"batch sizes differ: query {batch}, key {key.shape[0]}, value {value.shape[0]}")
        if value.shape[1] != len_k:
            raise ValueError(f"key length {len_k} does not match value length {value.shape[1]}")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, len_k):
            raise ValueError(
                f"key_padding_mask must have shape (batch, S) = {(batch, len_k)}, got {tuple(key_padding_mask.shape)}"
            )
        if attn_mask is not None:
            if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (len_q, len_k):
                attn_mask = attn_mask.view(1, 1, len_q, len_k)
            elif attn_mask.dim() == 3 and tuple(attn_mask.shape) == (batch * heads, len_q, len_k):
                attn_mask = attn_mask.view(batch, heads, len_q, len_k)
            else:
                raise ValueError(
                    f"attn_mask must have shape (L, S) = {(len_q, len_k)} or (batch * num_heads, L, S) = "
                    f"{(batch * heads, len_q, len_k)}, got {tuple(attn_mask.shape)}"
                )
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.view(batch, 1, 1, len_k)

        q, k, v = self._project(query, key, value, self_attention)
        extra_keys = int(self.bias_k is not None) + int(self.add_zero_attn)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(batch, 1, embed)], dim=1)
            v = torch.cat([v, self.bias_v.expand(batch, 1, embed)], dim=1)
        q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
        if self.add_zero_attn:
            zeros = k.new_zeros(batch, heads, 1, head_dim)
            k, v = torch.cat([k, zeros], dim=2), torch.cat([v, zeros.to(v.dtype)], dim=2)
        if extra_keys:  # the appended keys are attended by every query
            attn_mask, key_padding_mask = (
                None if m is None else F.pad(m, (0, extra_keys), value=False if m.dtype == torch.bool else 0.0)
                for m in (attn_mask, key_padding_mask)
            )
        window_size = self.window_size
        outside_band = None
        if extra_keys and (is_causal or window_size is not None):
            # the band (causal, window) is over the source keys; the appended keys stay visible to
            # every query, as above (torch's masked path; its SDPA fast path drops them under is_causal)
            left, right = normalize_window(window_size, is_causal)
            outside_band = ~F.pad(band_mask(len_q, len_k, left, right, 0, device=q.device), (0, extra_keys), value=True)
            window_size, is_causal = None, False
        mask = _torch_mask_to_additive_or_allowed((attn_mask, key_padding_mask, outside_band), q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            window = normalize_window(window_size, is_causal)
            probs = _plain_weights(q, k, mask, 1.0 / math.sqrt(head_dim), window, dropout_p)
            out = torch.matmul(probs, v)
            weights = probs.mean(dim=1) if average_attn_weights else probs
        else:
            out = attend(q, k, v, mask, dropout_p=dropout_p, is_causal=is_causal, window_size=window_size,
                         backend=self.backend)
            weights = None
        out = out.transpose(1, 2).reshape(batch, len_q, embed)
        return F.linear(out, self.out_proj.weight, self.out_proj.bias), weights


def alibi_slopes(num_heads: int, device=None) -> Tensor:
    """The ALiBi slopes of Press et al. (2022), fp32 ``(num_heads,)``: ``2^(-8 i / n)`` for
    ``i = 1..n`` with ``n`` the largest power of two <= num_heads, then every other slope of
    the ``2n`` sequence for the remaining heads."""
    if num_heads <= 0:
        raise ValueError(f"num_heads must be >= 1, got {num_heads}")
    n = 1 << (num_heads.bit_length() - 1)
    slopes = [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]
    slopes += [2.0 ** (-8.0 * i / (2 * n)) for i in range(1, 2 * n + 1, 2)][: num_heads - n]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


class LocalSelfAttention(torch.nn.Module):
    """Sliding-window multi-head self-attention: token i attends tokens ``i - left .. i + right``.

    ``window_size`` is an int ``w`` (``w`` on each side) or a pair ``(left, right)``;
    ``causal=True`` caps ``right`` at 0. ``num_kv_heads`` (default ``num_heads``) below
    ``num_heads`` gives grouped-query attention without repeating keys. Input
    ``(N, L, E)`` (``(L, N, E)`` with ``batch_first=False``); returns the same shape.
    Cost is O(L * window), not O(L^2).

    Score modifiers: ``softcap`` caps the scores (Gemma 2), ``sinks=True`` adds a learned
    per-head sink logit (``self.sinks``, gpt-oss; initialised to 0), ``alibi=True`` applies
    the standard ALiBi slopes (:func:`alibi_slopes`, buffer ``self.alibi_slopes``).
    """

    def __init__(self, embed_dim: int, num_heads: int, window_size: Union[int, Tuple[int, int]], *,
                 causal: bool = False, num_kv_heads: Optional[int] = None, bias: bool = True, dropout: float = 0.0,
                 batch_first: bool = True, softcap: float = 0.0, sinks: bool = False, alibi: bool = False,
                 device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a positive multiple of num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if num_kv_heads <= 0 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        if isinstance(window_size, int) and not isinstance(window_size, bool):
            window_size = (window_size, window_size)
        self.window_size = normalize_window(window_size, causal)
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.dropout, self.batch_first, self.backend = dropout, batch_first, check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.qkv_proj = torch.nn.Linear(embed_dim, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.softcap = check_softcap(softcap)
        self.sinks = torch.nn.Parameter(torch.zeros(num_heads, **factory)) if sinks else None
        self.register_buffer("alibi_slopes", alibi_slopes(num_heads, device=device) if alibi else None)

    def extra_repr(self) -> str:
        mods = "".join([f", softcap={self.softcap}" if self.softcap else "",
                        ", sinks=True" if self.sinks is not None else "",
                        ", alibi=True" if self.alibi_slopes is not None else ""])
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"window_size={self.window_size}{mods}")

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 3:
            raise ValueError(f"x must be 3-D (batch, L, embed_dim), got shape {tuple(x.shape)}")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, length, _ = x.shape
        _check_float_or_bool(key_padding_mask, "key_padding_mask")
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (batch, length):
            raise ValueError(
                f"key_padding_mask must have shape (batch, L) = {(batch, length)}, got {tuple(key_padding_mask.shape)}"
            )
        sizes = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.num_kv_heads * self.head_dim)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)).transpose(1, 2)
                   for t in self.qkv_proj(x).split(sizes, dim=-1))
        mask = None if key_padding_mask is None else _torch_mask_to_additive_or_allowed(
            (key_padding_mask.view(batch, 1, 1, length),), q.dtype)
        out = attend(q, k, v, mask, dropout_p=self.dropout if self.training else 0.0, window_size=self.window_size,
                     softcap=self.softcap, sinks=self.sinks, backend=self.backend,
                     # module.to(dtype) converts the buffer; the slopes are fp32 by definition
                     alibi_slopes=None if self.alibi_slopes is None else self.alibi_slopes.float())
        out = self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))
        return out if self.batch_first else out.transpose(0, 1)


# ---------------------------------------------------------------------------------------
# sequence-to-sequence attention (Bahdanau 2015, Luong 2015)


def _seq2seq_inputs(query, keys, values, key_padding_mask):
    """Canonical (N, L, Dq) query, (N, S, Dk) keys, (N, S, Dv) values, (N, 1, S) allowed-mask."""
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be (N, Dq) or (N, L, Dq), got shape {tuple(query.shape)}")
    single = query.dim() == 2
    if single:
        query = query.unsqueeze(1)
    if keys.dim() != 3:
        raise ValueError(f"keys must be (N, S, Dk), got shape {tuple(keys.shape)}")
    values = keys if values is None else values
    if values.dim() != 3 or values.shape[:2] != keys.shape[:2]:
        raise ValueError(f"values must be (N, S, Dv) matching keys {tuple(keys.shape[:2])}, got {tuple(values.shape)}")
    if keys.shape[0] != query.shape[0]:
        raise ValueError(f"batch sizes differ: query {query.shape[0]}, keys {keys.shape[0]}")
    allowed = None
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be a bool tensor (True = padding), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != tuple(keys.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape (N, S) = {tuple(keys.shape[:2])}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        allowed = ~key_padding_mask.unsqueeze(1)
    return query, keys, values, allowed, single


def _additive_scores(projected_query: Tensor, projected_keys: Tensor, score_proj: torch.nn.Linear) -> Tensor:
    """``v^T tanh(Wq_i + Uk_j)`` for every pair: (N, L, H) and (N, S, H) -> (N, L, S)."""
    return score_proj(torch.tanh(projected_query.unsqueeze(2) + projected_keys.unsqueeze(1))).squeeze(-1)


def _finish(context, weights, single, need_weights):
    if single:
        context = context.squeeze(1)
        weights = None if weights is None else weights.squeeze(1)
    return context, weights if need_weights else None


class AdditiveAttention(torch.nn.Module):
    """Bahdanau attention: ``score(q, k_j) = v^T tanh(W q + U k_j)``, softmax over j.

    ``forward(query, keys, values=None, key_padding_mask=None, need_weights=False)`` with
    query ``(N, Dq)`` (one decoder step) or ``(N, L, Dq)``, keys ``(N, S, Dk)``, values
    (default: keys) ``(N, S, Dv)``; returns ``(context, weights or None)``, context
    ``(N, Dv)`` or ``(N, L, Dv)``. The score is not a dot product, so this runs an explicit
    softmax (memory O(N * L * S * hidden_dim)).
    """

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, hidden_dim: Optional[int] = None, *,
                 bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        key_dim = query_dim if key_dim is None else key_dim
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        factory = {"device": device, "dtype": dtype}
        self.query_proj = torch.nn.Linear(query_dim, hidden_dim, bias=False, **factory)  # W
        self.key_proj = torch.nn.Linear(key_dim, hidden_dim, bias=bias, **factory)  # U
        self.score_proj = torch.nn.Linear(hidden_dim, 1, bias=False, **factory)  # v

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False):
        query, keys, values, allowed, single = _seq2seq_inputs(query, keys, values, key_padding_mask)
        scores = _additive_scores(self.query_proj(query), self.key_proj(keys), self.score_proj)
        weights = masked_softmax(scores, None if allowed is None else allowed.expand_as(scores))
        return _finish(torch.matmul(weights, values), weights, single, need_weights)


class LuongAttention(torch.nn.Module):
    """Luong attention: ``dot``/``general``/``concat`` scores, ``global``/``local-m``/``local-p`` modes.

    Scores: ``dot`` ``h_t . h_s``; ``general`` ``h_t . W_a h_s``; ``concat``
    ``v_a^T tanh(W_a [h_t; h_s])``. Modes: ``global`` attends every source position;
    ``local-m`` attends ``p_t - D .. p_t + D`` with ``p_t = t`` (the decoder step, counted
    from ``query_offset``); ``local-p`` predicts ``p_t = S * sigmoid(v_p^T tanh(W_p h_t))``
    (S: the source length without padding), attends ``|s - p_t| <= D`` and multiplies the
    weights by ``exp(-(s - p_t)^2 / (2 sigma^2))``, ``sigma = D / 2``. ``D`` is ``window``.

    ``forward(query, keys, values=None, key_padding_mask=None, need_weights=False,
    query_offset=0)`` as in :class:`AdditiveAttention`; returns ``(context, weights or None)``.
    The context is ``c_t``; Luong's attentional state ``tanh(W_c [c_t; h_t])`` is the
    caller's. ``dot``/``general`` scores in ``global`` and ``local-m`` mode run on attnkern's
    kernels (unscaled scores, ``local-m`` as a window); the rest, and ``need_weights=True``,
    use an explicit softmax.
    """

    SCORES = ("dot", "general", "concat")
    MODES = ("global", "local-m", "local-p")

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, *, score: str = "general",
                 mode: str = "global", window: Optional[int] = None, hidden_dim: Optional[int] = None,
                 device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        key_dim = query_dim if key_dim is None else key_dim
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        if score == "dot" and key_dim != query_dim:
            raise ValueError(f"score='dot' needs key_dim == query_dim, got {key_dim} and {query_dim}")
        if mode == "global":
            if window is not None:
                raise ValueError("window is only used by mode='local-m' or 'local-p'")
        elif isinstance(window, bool) or not isinstance(window, int) or window < (1 if mode == "local-p" else 0):
            raise ValueError(
                f"mode={mode!r} needs window (D) as an int >= {1 if mode == 'local-p' else 0}, got {window!r}"
            )
        self.score, self.mode, self.window, self.backend = score, mode, window, check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        if score == "general":
            self.key_proj = torch.nn.Linear(key_dim, query_dim, bias=False, **factory)  # W_a
        elif score == "concat":  # W_a [h_t; h_s] = W_q h_t + W_k h_s
            self.query_proj = torch.nn.Linear(query_dim, hidden_dim, bias=False, **factory)
            self.key_proj = torch.nn.Linear(key_dim, hidden_dim, bias=False, **factory)
            self.score_proj = torch.nn.Linear(hidden_dim, 1, bias=False, **factory)  # v_a
        if mode == "local-p":
            self.position_proj = torch.nn.Linear(query_dim, hidden_dim, bias=False, **factory)  # W_p
            self.position_score = torch.nn.Linear(hidden_dim, 1, bias=False, **factory)  # v_p

    def extra_repr(self) -> str:
        return f"score={self.score!r}, mode={self.mode!r}, window={self.window}"

    @property
    def uses_kernels(self) -> bool:
        """True when forward (with need_weights=False) runs on attnkern's kernels."""
        return self.score in ("dot", "general") and self.mode in ("global", "local-m")

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, need_weights: bool = False, query_offset: int = 0):
        if isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
            raise ValueError(f"query_offset must be an int >= 0, got {query_offset!r}")
        query, keys, values, allowed, single = _seq2seq_inputs(query, keys, values, key_padding_mask)
        len_q, len_k = query.shape[1], keys.shape[1]
        window = None
        if self.mode == "local-m":
            if query_offset == 0 and self.uses_kernels and not need_weights:
                window = (self.window, self.window)  # as a window the kernels skip what lies outside
            else:
                band = band_mask(len_q, len_k, self.window, self.window, query_offset, device=query.device)
                allowed = band.unsqueeze(0) if allowed is None else allowed & band
        if self.uses_kernels and not need_weights:
            projected = keys if self.score == "dot" else self.key_proj(keys)
            mask = None if allowed is None else allowed.unsqueeze(1)
            context = attend(query.unsqueeze(1), projected.unsqueeze(1), values.unsqueeze(1), mask, scale=1.0,
                             window_size=window, backend=self.backend).squeeze(1)
            return _finish(context, None, single, False)
        scores = self._scores(query, keys)
        gaussian = None
        if self.mode == "local-p":
            lengths = keys.new_full((keys.shape[0], 1, 1), float(len_k)) if allowed is None else \
                allowed.sum(dim=-1, keepdim=True).to(keys.dtype)
            centre = lengths * torch.sigmoid(self.position_score(torch.tanh(self.position_proj(query))))  # (N, L, 1)
            offsets = torch.arange(len_k, device=keys.device, dtype=keys.dtype) - centre
            inside = offsets.abs() <= self.window
            allowed = inside if allowed is None else allowed & inside
            sigma = self.window / 2.0
            gaussian = torch.exp(-offsets.square() / (2.0 * sigma * sigma))
        weights = masked_softmax(scores, None if allowed is None else allowed.expand_as(scores))
        if gaussian is not None:
            weights = weights * gaussian
        return _finish(torch.matmul(weights, values), weights, single, need_weights)

    def _scores(self, query: Tensor, keys: Tensor) -> Tensor:
        if self.score == "dot":
            return torch.matmul(query, keys.transpose(1, 2))
        if self.score == "general":
            return torch.matmul(query, self.key_proj(keys).transpose(1, 2))
        return _additive_scores(self.query_proj(query), self.key_proj(keys), self.score_proj)


# Hard attention lives in its own file and uses the helpers above.
from .nn_hard import HardAttention, HardAttentionOutput  # noqa: E402
