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
or 0. A static cache passes its length as a tensor (read here, except while tracing) and
``S`` slots of which only the first ``q_offset - kv_offset + L`` hold tokens: under a causal
band the rest are cut off (``BandMask.kv_used``) and the band is bottom-right on the filled
slots. Anything else -- a static cache under tracing, custom ``or``/``and`` mask functions,
chunked attention, an older transformers -- gets HF's own dense boolean mask, which attnkern
also runs, exactly.

GQA runs without repeating K/V. A padding mask runs one of three ways (``_padded_route``):
as a stride-0 bool mask on the dense op; unpadded into a packed batch on the varlen op
(prefill and training, when that saves enough work: ``UNPAD_MAX_WORK``); or, decoding from a
left-padded cache, on the kvcache op reading HF's cache in place with ``cache_leftpad``.
transformers' continuous batching (``generate_batch``, paged cache) runs on the varlen op
under :func:`continuous_batching_name` (see :func:`use_for_continuous_batching`). Logit
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

    __slots__ = ("window_left", "window_right", "bottom_right", "padding", "kv_length", "sequence_index", "kv_used")

    def __init__(self, window_left: int, window_right: int, bottom_right: bool, padding: Optional[torch.Tensor],
                 kv_length: int, sequence_index: Optional[torch.Tensor] = None, kv_used: Optional[int] = None) -> None:
        self.window_left = window_left
        self.window_right = window_right
        self.bottom_right = bottom_right
        self.padding = padding
        self.kv_length = kv_length
        # packed documents: (batch, S) index of the document each token belongs to (HF's
        # packed_sequence_mask); the band then applies within each document
        self.sequence_index = sequence_index
        # a static cache: only the first kv_used of the kv_length key slots hold tokens yet (the
        # rest lie after every query: a causal band never reaches them), and the band is
        # bottom-right aligned on those
        self.kv_used = kv_used

    # generate() prepares masks ahead of the forward for static caches: it calls
    # .contiguous() on them, and the model's mask creation reads .ndim (2 would mean a
    # padding mask) before handing the prepared mask back to band_mask_function
    ndim = 4

    def contiguous(self) -> "BandMask":
        return self

    def dense(self, len_q: int) -> torch.Tensor:
        """The same mask as a ``(batch or 1, 1, L, S)`` bool tensor (True: attend)."""
        used = self.kv_length if self.kv_used is None else self.kv_used
        offset = used - len_q if self.bottom_right else 0
        device = None if self.padding is None else self.padding.device
        allowed = band_mask(len_q, used, self.window_left, self.window_right, offset, device=device)
        allowed = allowed.view(1, 1, len_q, used)
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
        if self.padding is not None:
            allowed = allowed & self.padding[:, None, None, :]
        return torch.nn.functional.pad(allowed, (0, self.kv_length - used))  # unused static-cache slots

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


def _alignment(q_length, kv_length, q_offset, kv_offset, band):
    """``(bottom_right, kv_used)``: True (bottom-right) or False (top-left), and the number of
    leading key slots that hold tokens when fewer than kv_length do (a static cache); ``(None,
    None)`` when attnkern's alignments cannot express it."""
    from transformers import masking_utils as mu

    if isinstance(q_offset, torch.Tensor):
        # a static cache passes its length as a tensor: read it (a sync on an accelerator),
        # except while tracing, where reading it would break the graph
        if q_offset.numel() != 1 or mu.is_tracing(q_offset):
            return None, None
        q_offset = int(q_offset)
    if not all(isinstance(x, int) for x in (q_offset, kv_offset)):
        return None, None
    offset = q_offset - kv_offset
    if offset == kv_length - q_length:
        return True, None
    if band[1] == 0 and 0 <= offset and offset + q_length < kv_length:
        # causal: the slots after the last query's position are empty (a static cache) and unseen
        return True, offset + q_length
    if offset == 0:
        return False, None
    return None, None


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
    bottom_right, kv_used = (None, None) if band is None else _alignment(q_length, kv_length, q_offset, kv_offset,
                                                                         band)
    if band == (-1, -1):
        bottom_right, kv_used = False, None  # no band: alignment is moot
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
        padding = padding.to(device=device, dtype=torch.bool)[:, :kv_used]
        # as HF does for sdpa: dropping an all-True mask lets the kernels skip it, but
        # reading it would break a traced graph
        if not mu.is_tracing(padding) and bool(padding.all()):
            padding = None
    return BandMask(band[0], band[1], bottom_right, padding, kv_length, kv_used=kv_used)


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
        cache = kwargs.pop("cache", None)
        if cache is not None:  # continuous batching: packed requests, K/V read from the paged cache
            key, value = _continuous_batching_keys(module, cache, key, value, kwargs)
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
            if attention_mask.kv_used is not None:  # a static cache's filled slots
                key, value = key[:, :, :attention_mask.kv_used], value[:, :, :attention_mask.kv_used]
            window = (attention_mask.window_left, attention_mask.window_right)
            bottom_right = attention_mask.bottom_right
            padding = attention_mask.padding
            if padding is not None:
                route = _padded_route(padding, len_q, key.shape[-2], window, dropout, kwargs)
                if route == "unpad":
                    out = _unpadded_attention(query, key, value, padding, window, scaling, backend, kwargs, dropout)
                    return out, None
                if route == "leftpad":
                    return _leftpad_attention(query, key, value, padding, window, scaling, backend, kwargs), None
                mask = padding[:, None, None, :]
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


# Padded batches. A (batch, S) padding mask runs three ways, chosen per call (the mask's
# values are read: under tracing, the stride-0 mask always):
# * "mask": the dense op with the mask as a stride-0 (B, 1, 1, S) bool operand;
# * "unpad" (no cache, L == S): the real tokens gathered into a packed batch, the varlen op,
#   the output scattered back (pad rows 0) -- when the attention work left after dropping the
#   padding, sum(L_b^2) / (B * S^2), is at most UNPAD_MAX_WORK;
# * "leftpad" (decoding, L < S, left padding): the kvcache op reads Hugging Face's cache in place
#   with cache_leftpad = the padding count of each row -- only with DECODE_VIA_KVCACHE.
# Both switches come from benchmarks/bench_hf_paths.py. The quiet run (stop 12,
# benchmarks/packed/hf-paths-quiet.json: B=8, S=1024, H=8/2, D=64, causal, 2 threads, load
# average ~1.9 = the run's own two threads) set UNPAD_MAX_WORK: unpadding took 0.55-0.78x the
# mask route's time at work ratios 0.46-0.59 (forward and forward + backward), 1.02-1.06x at
# 0.865 and 1.13-1.24x with no padding (the gathers, the scatter and the varlen kernels cost
# more than the padding saves); hence 0.6. (The earlier loaded runs, hf-paths-loaded-*.json at
# load avg 10-13, had put the crossover near 0.4.) Decoding through the kvcache op took
# 0.98-1.31x the dense op at S = 4096 and 1.08-3.2x at S = 512 in the loaded runs, so decoding
# stays on the dense op on CPU.
UNPAD_MAX_WORK = 0.6
DECODE_VIA_KVCACHE = False


def _token_runs(padding: torch.Tensor):
    """Per row of a (B, S) padding mask: the real-token count, and whether those tokens form one
    contiguous run (left or right padding)."""
    lengths = padding.sum(1)
    positions = torch.arange(padding.shape[1], device=padding.device)
    first = torch.where(padding, positions, padding.shape[1]).amin(1)
    last = torch.where(padding, positions, -1).amax(1)
    contiguous = bool(((last - first + 1 == lengths) | (lengths == 0)).all())
    return lengths, first, contiguous


def _padded_route(padding, len_q, len_k, window, dropout, kwargs) -> str:
    from transformers import masking_utils as mu

    if mu.is_tracing(padding) or (len_q != len_k and not (DECODE_VIA_KVCACHE and dropout == 0.0)):
        return "mask"  # (the kvcache op has no dropout)
    lengths, first, contiguous = _token_runs(padding)
    # gaps inside a row change distances: fine for a plain causal or full band (only the order
    # of the tokens counts), not for a window's edge or ALiBi
    order_only = window[0] < 0 and window[1] <= 0 and kwargs.get("alibi_slopes") is None
    if len_q == len_k:
        work = float((lengths.double() ** 2).sum()) / (padding.shape[0] * len_k * len_k)
        return "unpad" if work <= UNPAD_MAX_WORK and (contiguous or order_only) else "mask"
    left_padded = contiguous and bool(((first + lengths == len_k) | (lengths == 0)).all())
    return "leftpad" if len_q < len_k and left_padded else "mask"


def _modifier_kwargs(kwargs):
    return dict(softcap=kwargs.get("softcap") or 0.0, alibi_slopes=kwargs.get("alibi_slopes"), s_aux=kwargs.get("s_aux"))


def _unpadded_attention(query, key, value, padding, window, scaling, backend, kwargs, dropout=0.0):
    """(B, H, L, D) self-attention whose (B, L) padding mask marks the real tokens: they run as a
    packed batch (sequence b = row b's tokens, in order), pad rows output 0. -> (B, L, Hq, Dv)."""
    from ..varlen import flash_attn_varlen_func

    B, H, L, _ = query.shape
    index = padding.reshape(-1).nonzero().squeeze(1)
    lengths = padding.sum(1, dtype=torch.int32)
    cu = torch.cat((lengths.new_zeros(1), torch.cumsum(lengths, 0, dtype=torch.int32)))
    longest = int(lengths.max()) if B else 0

    def tokens(t):  # (B, H, L, D) -> (real tokens, H, D)
        return t.transpose(1, 2).reshape(B * L, t.shape[1], t.shape[3]).index_select(0, index)

    out = flash_attn_varlen_func(tokens(query), tokens(key), tokens(value), cu, cu, longest, longest, dropout,
                                 scaling, False, window, backend=backend, **_modifier_kwargs(kwargs))
    full = out.new_zeros(B * L, H, out.shape[-1]).index_copy(0, index, out)
    return full.view(B, L, H, -1)


def _leftpad_attention(query, key, value, padding, window, scaling, backend, kwargs):
    """Decoding against Hugging Face's (B, Hk, S, D) cache, left-padded per the (B, S) mask: the
    kvcache op reads the cache in place from each row's first real key. -> (B, L, Hq, Dv)."""
    from ..varlen import flash_attn_with_kvcache

    B, S = padding.shape
    leftpad = (S - padding.sum(1)).to(torch.int32)
    seqlens = torch.full((B,), S, dtype=torch.int32, device=padding.device)
    return flash_attn_with_kvcache(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                   cache_seqlens=seqlens, cache_leftpad=leftpad, softmax_scale=scaling,
                                   window_size=window, backend=backend, **_modifier_kwargs(kwargs))


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


def _continuous_batching_keys(module, cache, key, value, kwargs):
    """transformers' continuous batching (``generate_batch``): the paged cache writes the new K/V
    and gathers each request's keys into one packed (1, Hk, total_k, D) batch, updating the
    ``cu_seq_lens_k``/``max_length_k`` kwargs in place for this layer; the varlen op then runs
    the requests (``cu_seq_lens_q/k``) with no mask. Its decode fast path (``block_table``,
    flash_attn_with_kvcache on the pages) is only enabled by transformers for flash-attn 2/3 on
    CUDA/XPU and is not served here."""
    if kwargs.get("block_table") is not None:
        raise NotImplementedError(
            "attn_implementation='attnkern' does not serve continuous batching's block-table decode path; "
            "use ContinuousBatchingConfig(max_blocks_per_request=0)"
        )
    key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
    if kwargs.get("cu_seq_lens_q") is None or kwargs.get("cu_seq_lens_k") is None:
        raise ValueError("a paged cache was passed without cu_seq_lens_q/cu_seq_lens_k (continuous batching's kwargs)")
    return key, value


def continuous_batching_name(name: str = NAME) -> str:
    """The name under which :func:`register` also files attnkern for transformers' continuous
    batching. transformers 5.23 lets ``generate_batch`` / ``init_continuous_batching`` run only
    'paged|eager', 'sdpa' or an implementation whose name contains "flash"; only the last get
    packed requests with no dense mask. A "flash" name cannot go through
    ``set_attn_implementation`` (that would look for a flash-attn package or a Hub kernel of that
    name), so :func:`use_for_continuous_batching` sets it on the config."""
    return f"{name}_flash_varlen"


def use_for_continuous_batching(model, name: str = NAME) -> str:
    """Make ``model`` run attnkern under transformers' continuous batching; returns the previous
    implementation (``model.set_attn_implementation(previous)`` restores it). Call
    :func:`register` first."""
    from transformers import AttentionInterface

    alias = continuous_batching_name(name)
    if alias not in AttentionInterface._global_mapping:
        raise ValueError(f"{alias!r} is not registered: call attnkern.integrations.hf.register({name!r}) first")
    previous = model.config._attn_implementation
    model.config._attn_implementation = alias
    return previous


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
    attention = _make_attention_function(backend)
    for registered in (name, continuous_batching_name(name)):
        AttentionInterface.register(registered, attention)
        AttentionMaskInterface.register(registered, band_mask_function)
    return name
