"""Hugging Face transformers: ``attn_implementation="attnkern"``.

:func:`register` adds "attnkern" to transformers' ``AttentionInterface`` (the attention
function every modern HF model calls) and to its ``AttentionMaskInterface`` (the function
that builds each layer type's mask). The mask function does not build a dense mask: for the
patterns it recognises (causal, bidirectional, Mistral/Qwen2/Gemma/gpt-oss sliding windows
and the bidirectional sliding window) it returns a :class:`BandMask` holding attnkern's
``window_size``, the alignment, and the (batch, keys) padding mask. Each layer gets the mask
of its own layer type, so per-layer sliding windows (``config.layer_types``) come out right.

Alignment. HF places query row i at absolute position ``q_offset + i`` and key j at
``kv_offset + j``; the band is exact when ``q_offset - kv_offset`` is ``S - L`` (a dynamic
cache, including the sliding-window cache that keeps only the last W-1 keys, and prefill)
or 0. Anything else -- a static cache (whose offsets are tensors), packed sequences,
custom ``or``/``and`` mask functions, chunked attention, an older transformers -- gets
HF's own dense boolean mask, which attnkern also runs, exactly.

GQA runs without repeating K/V. Padding masks become a stride-0 bool mask. Logit
softcapping (``softcap``, Gemma 2), attention sinks (``s_aux``, gpt-oss: the module's
``sinks`` Parameter gets its gradient) and ALiBi slopes (an ``alibi_slopes`` keyword, where a
model passes one) run on attnkern's kernels. Features they lack -- ``output_attentions``,
T5-style ``position_bias`` -- fall back, with a one-time warning, to the model's own
``eager_attention_forward`` with the mask materialised; a model without one raises
``NotImplementedError`` naming the feature.

Tested with transformers 5.23.0.
"""

from __future__ import annotations

import sys
import warnings
from typing import Optional

import torch

from .._semantics import band_mask, check_backend
from ._attend import attend

NAME = "attnkern"
_UNSUPPORTED = (  # keyword HF passes -> what it is
    ("position_bias", "an additive position bias"),
)
_warned = set()


class BandMask:
    """What the "attnkern" mask function hands each attention layer instead of a dense mask.

    ``window_left``/``window_right`` are attnkern's window (causality folded in as right = 0;
    -1 unbounded), ``bottom_right`` the alignment (query row i at key ``i + S - L``),
    ``padding`` a ``(batch, S)`` bool tensor (True: the key is a real token) or None, and
    ``kv_length`` the key count S it was built for.
    """

    __slots__ = ("window_left", "window_right", "bottom_right", "padding", "kv_length", "sequence_index")

    def __init__(self, window_left: int, window_right: int, bottom_right: bool, padding: Optional[torch.Tensor],
                 kv_length: int, sequence_index: Optional[torch.Tensor] = None) -> None:
        self.window_left = window_left
        self.window_right = window_right
        self.bottom_right = bottom_right
        self.padding = padding
        self.kv_length = kv_length
        # packed documents: (batch, S) index of the document each token belongs to (HF's
        # packed_sequence_mask); the band then applies within each document
        self.sequence_index = sequence_index

    # generate() prepares masks ahead of the forward for static caches: it calls
    # .contiguous() on them, and the model's mask creation reads .ndim (2 would mean a
    # padding mask) before handing the prepared mask back to band_mask_function
    ndim = 4

    def contiguous(self) -> "BandMask":
        return self

    def dense(self, len_q: int) -> torch.Tensor:
        """The same mask as a ``(batch or 1, 1, L, S)`` bool tensor (True: attend)."""
        offset = self.kv_length - len_q if self.bottom_right else 0
        device = None if self.padding is None else self.padding.device
        allowed = band_mask(len_q, self.kv_length, self.window_left, self.window_right, offset, device=device)
        allowed = allowed.view(1, 1, len_q, self.kv_length)
        if self.sequence_index is not None:  # (L == S): position_ids restart inside each document
            idx = self.sequence_index
            starts = torch.cummax(torch.where(_document_starts(idx), torch.arange(idx.shape[1], device=idx.device), 0), 1)[0]
            pos = torch.arange(idx.shape[1], device=idx.device) - starts  # position inside the document
            qp, kp = pos[:, :, None], pos[:, None, :]
            same = idx[:, :, None] == idx[:, None, :]
            inside = torch.ones_like(same)
            if self.window_left >= 0:
                inside &= kp >= qp - self.window_left
            if self.window_right >= 0:
                inside &= kp <= qp + self.window_right
            allowed = (same & inside)[:, None]
        return allowed if self.padding is None else allowed & self.padding[:, None, None, :]

    def __repr__(self) -> str:
        padded = None if self.padding is None else tuple(self.padding.shape)
        return (f"BandMask(window=({self.window_left}, {self.window_right}), bottom_right={self.bottom_right}, "
                f"padding={padded}, kv_length={self.kv_length})")


# ---------------------------------------------------------------------------------------
# the mask function


def _intersect(a, b):
    """Intersection of two windows ``(left, right)`` (-1: unbounded)."""
    def bound(x, y):
        return y if x < 0 else x if y < 0 else min(x, y)
    return bound(a[0], b[0]), bound(a[1], b[1])


def _closure_value(fn, name):
    code = getattr(fn, "__code__", None)
    if code is None or name not in code.co_freevars or fn.__closure__ is None:
        return None
    return fn.__closure__[code.co_freevars.index(name)].cell_contents


def _known_band(mask_function):
    """The window ``(left, right)`` that ``mask_function`` is, or None if it is not a plain band.

    HF composes mask functions from a few known pieces with ``and_masks``; this reads them
    back (function identity and code objects, so no guessing from names): the causal and
    bidirectional bases, ``sliding_window_overlay(W)`` (keys after ``q - W``) and
    ``sliding_window_bidirectional_overlay(W)`` (``|q - kv| <= W``).
    """
    from transformers import masking_utils as mu

    if mask_function is mu.causal_mask_function:
        return (-1, 0)
    if mask_function is mu.bidirectional_mask_function:
        return (-1, -1)
    code = getattr(mask_function, "__code__", None)
    if code is mu.sliding_window_overlay(1).__code__:
        width = _closure_value(mask_function, "sliding_window")
        return (width - 1, -1) if isinstance(width, int) and width >= 1 else None
    if code is mu.sliding_window_bidirectional_overlay(1).__code__:
        width = _closure_value(mask_function, "sliding_window")
        return (width, width) if isinstance(width, int) and width >= 0 else None
    if code is mu.and_masks(mu.causal_mask_function).__code__:
        parts = _closure_value(mask_function, "mask_functions")
        if not parts:
            return None
        band = (-1, -1)
        for part in parts:
            part_band = _known_band(part)
            if part_band is None:
                return None
            band = _intersect(band, part_band)
        return band
    return None


def _packed_band(mask_function):
    """``(band, sequence_index)`` if ``mask_function`` is HF's packed-sequence composition
    (documents told apart by restarting position_ids) around a plain band, else None."""
    from transformers import masking_utils as mu

    if getattr(mask_function, "__code__", None) is not mu.and_masks(mu.causal_mask_function).__code__:
        return None
    parts = _closure_value(mask_function, "mask_functions")
    if not parts or len(parts) != 2:
        return None
    packed, remapped = parts
    if getattr(packed, "__code__", None) is not mu.packed_sequence_mask_function(None).__code__:
        return None
    if getattr(remapped, "__code__", None) is not mu.remap_positions_for_packed_sequence(None, None).__code__:
        return None
    band = _known_band(_closure_value(remapped, "mask_function"))
    index = _closure_value(packed, "packed_sequence_mask")
    if band is None or not isinstance(index, torch.Tensor):
        return None
    return band, index


def _document_starts(sequence_index: torch.Tensor) -> torch.Tensor:
    """(batch, S) bool: True where a document starts (each row's first token, and each index change)."""
    starts = torch.ones_like(sequence_index, dtype=torch.bool)
    starts[:, 1:] = sequence_index[:, 1:] != sequence_index[:, :-1]
    return starts


def packed_cu_seqlens(sequence_index: torch.Tensor):
    """cu_seqlens (int32) and the longest document of the flattened (batch * S) tokens."""
    starts = _document_starts(sequence_index).flatten().nonzero().flatten()
    total = torch.tensor([sequence_index.numel()], device=sequence_index.device)
    cu = torch.cat((starts, total)).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


def _alignment(q_length, kv_length, q_offset, kv_offset):
    """True (bottom-right), False (top-left), or None when attnkern's two alignments cannot express it."""
    if not all(isinstance(x, int) for x in (q_offset, kv_offset)):
        return None  # a static cache passes tensors: reading them would sync or break a graph
    offset = q_offset - kv_offset
    if offset == kv_length - q_length:
        return True
    if offset == 0:
        return False
    return None


def band_mask_function(batch_size, q_length, kv_length, q_offset=None, kv_offset=0, mask_function=None,
                       attention_mask=None, use_vmap=False, device="cpu", **kwargs):
    """HF mask-interface function for "attnkern": a :class:`BandMask`, or HF's dense bool mask."""
    from transformers import masking_utils as mu

    if isinstance(attention_mask, BandMask):  # prepared by generate() for this very step
        if attention_mask.kv_length != kv_length:
            raise ValueError(f"a prepared attnkern mask for {attention_mask.kv_length} keys was passed for {kv_length}")
        return attention_mask
    packed = None
    if mask_function is not None and attention_mask is None and q_length == kv_length and not kv_offset:
        packed = _packed_band(mask_function)
    if packed is not None:  # no dense mask: the attention function runs the documents as a packed batch
        return BandMask(packed[0][0], packed[0][1], True, None, kv_length, sequence_index=packed[1].to(device))
    band = None if use_vmap or mask_function is None else _known_band(mask_function)
    bottom_right = None if band is None else _alignment(q_length, kv_length, q_offset, kv_offset)
    if band == (-1, -1):
        bottom_right = False  # no band: alignment is moot
    if bottom_right is None:
        return mu.sdpa_mask(
            batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset or 0,
            kv_offset=kv_offset, mask_function=mask_function or mu.causal_mask_function,
            attention_mask=attention_mask, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
            use_vmap=use_vmap, device=device,
        )
    padding = None
    if attention_mask is not None:
        padding = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset:kv_offset + kv_length]
        padding = padding.to(device=device, dtype=torch.bool)
        # as HF does for sdpa: dropping an all-True mask lets the kernels skip it, but
        # reading it would break a traced graph
        if not mu.is_tracing(padding) and bool(padding.all()):
            padding = None
    return BandMask(band[0], band[1], bottom_right, padding, kv_length)


# ---------------------------------------------------------------------------------------
# the attention function


def _additive(mask, module, query, len_k, is_causal):
    """Any mask the attention function can receive, as the float mask HF's eager code adds."""
    len_q = query.shape[-2]
    if isinstance(mask, BandMask):
        mask = mask.dense(len_q)
    elif mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not (causal and len_q > 1):
            return None
        mask = band_mask(len_q, len_k, -1, 0, 0, device=query.device).view(1, 1, len_q, len_k)
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros((), dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)


def _eager_fallback(feature, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(
            f"attn_implementation='attnkern' cannot run {feature} and {type(module).__name__}'s module has no "
            "eager_attention_forward to fall back to; use attn_implementation='eager'"
        )
    if feature not in _warned:
        _warned.add(feature)
        warnings.warn(
            f"attnkern's kernels do not support {feature}; {type(module).__name__} runs its eager attention instead",
            stacklevel=3,
        )
    mask = _additive(attention_mask, module, query, key.shape[-2], is_causal)
    return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)


def _make_attention_function(backend: str):
    def attnkern_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                           **kwargs):
        """HF attention function: (B, Hq, L, D) query, (B, Hkv, S, D) key/value -> ((B, L, Hq, Dv), None)."""
        feature = next((what for name, what in _UNSUPPORTED if kwargs.get(name) is not None), None)
        if feature is None and kwargs.get("output_attentions", False):
            feature = "output_attentions"
        if feature is not None:
            return _eager_fallback(feature, module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                   kwargs)
        if kwargs.get("cache") is not None:
            raise NotImplementedError(
                "attn_implementation='attnkern' does not support paged (continuous-batching) caches"
            )
        len_q, len_k = query.shape[-2], key.shape[-2]
        packed = _packed_call(module, attention_mask, kwargs, query, key)
        if packed is not None:
            return _packed_attention(query, key, value, *packed, dropout, scaling, backend, kwargs)
        window, bottom_right, mask = None, False, None
        if isinstance(attention_mask, BandMask):
            if attention_mask.kv_length != len_k:
                raise ValueError(
                    f"attnkern mask was built for {attention_mask.kv_length} keys but the layer has {len_k}"
                )
            window = (attention_mask.window_left, attention_mask.window_right)
            bottom_right = attention_mask.bottom_right
            if attention_mask.padding is not None:
                mask = attention_mask.padding[:, None, None, :]
        elif attention_mask is None:
            # as HF's sdpa path: no mask means causal (top-left) for a causal module, unless decoding one token
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            window = (-1, 0) if causal and len_q > 1 else None
        elif isinstance(attention_mask, torch.Tensor):
            mask = attention_mask  # a dense mask (ours for unrecognised patterns, or the caller's 4-D mask)
        else:
            raise TypeError(
                f"attn_implementation='attnkern' got an attention mask of type {type(attention_mask).__name__}; "
                "expected the mask built for 'attnkern', a tensor or None"
            )
        out = attend(query, key, value, mask, dropout_p=dropout, scale=scaling, window_size=window,
                     bottom_right=bottom_right, softcap=kwargs.get("softcap") or 0.0, sinks=kwargs.get("s_aux"),
                     alibi_slopes=kwargs.get("alibi_slopes"), backend=backend)
        return out.transpose(1, 2).contiguous(), None

    return attnkern_attention


def _packed_call(module, attention_mask, kwargs, query, key):
    """``(cu_seqlens_q, cu_seqlens_k, max_q, max_k, window)`` for a packed batch, else None.

    Packed documents arrive either as flash-attn kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``
    from ``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``, batch 1) or as the
    :class:`BandMask` our mask function built from restarting ``position_ids``.
    """
    if isinstance(attention_mask, BandMask):
        window = (attention_mask.window_left, attention_mask.window_right)
    else:  # as HF's flash-attention path: the module's causality and the layer's sliding_window kwarg
        width = kwargs.get("sliding_window")
        window = (width - 1 if isinstance(width, int) and width > 0 else -1,
                  0 if getattr(module, "is_causal", True) else -1)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if query.shape[0] != 1:
            raise ValueError(f"cu_seq_lens_q/k describe a packed batch of size 1, got a batch of {query.shape[0]}")
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if max_q is None:
            max_q = int((cu_q[1:] - cu_q[:-1]).max())
        if max_k is None:
            max_k = int((cu_k[1:] - cu_k[:-1]).max())
        return cu_q, cu_k, max_q, max_k, window
    if isinstance(attention_mask, BandMask) and attention_mask.sequence_index is not None:
        if query.shape[-2] != key.shape[-2]:
            raise ValueError("a packed-documents mask needs as many keys as queries (no KV cache)")
        cu, longest = packed_cu_seqlens(attention_mask.sequence_index)
        return cu, cu, longest, longest, window
    return None


def _packed_attention(query, key, value, cu_q, cu_k, max_q, max_k, window, dropout, scaling, backend, kwargs):
    """(B, H, L, D) tensors whose tokens form the packed documents -> ((B, L, Hq, Dv), None).
    The layer's score modifiers (softcap, s_aux, alibi_slopes) apply to every document; a
    (1, H) ALiBi row is one batch row's slopes, shared by its documents."""
    from ..varlen import flash_attn_varlen_func

    def tokens(t):  # (B, H, L, D) -> (B * L, H, D)
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

    alibi = kwargs.get("alibi_slopes")
    if isinstance(alibi, torch.Tensor) and alibi.dim() == 2 and alibi.shape[0] == 1:
        alibi = alibi[0]
    out = flash_attn_varlen_func(tokens(query), tokens(key), tokens(value), cu_q, cu_k, max_q, max_k, dropout,
                                 scaling, False, window, kwargs.get("softcap") or 0.0, alibi,
                                 s_aux=kwargs.get("s_aux"), backend=backend)
    return out.view(query.shape[0], query.shape[2], query.shape[1], -1), None


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register attnkern with transformers under ``name``; returns the name.

    Afterwards ``AutoModel.from_pretrained(..., attn_implementation="attnkern")``,
    ``model.set_attn_implementation("attnkern")`` and ``config._attn_implementation =
    "attnkern"`` use it. ``backend`` picks attnkern's backend. Calling it again replaces the
    registration.
    """
    backend = check_backend(backend)
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        raise ImportError(
            "attnkern.integrations.hf needs Hugging Face transformers with AttentionInterface and "
            "AttentionMaskInterface (tested with 5.23.0): pip install 'transformers>=5.0'"
        ) from exc
    AttentionInterface.register(name, _make_attention_function(backend))
    AttentionMaskInterface.register(name, band_mask_function)
    return name
