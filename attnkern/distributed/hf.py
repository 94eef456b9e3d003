"""Hugging Face transformers models on sharded sequences: a registered attention function.

transformers 5.23 has context parallelism only inside its ``Trainer`` (through Accelerate and
torch's ``context_parallel()``, SDPA only), and it refuses models with sliding-window layers
(``PreTrainedModel.supports_context_parallel``). It has no hook that hands an attention
function a process group. So the group travels in a context manager instead::

    from attnkern.distributed import hf as cp_hf, shard_sequence, sequence_positions
    cp_hf.register()                                   # attn_implementation="attnkern_cp"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnkern_cp")
    ids = shard_sequence(input_ids, group, dim=1)      # this rank's tokens (zigzag)
    pos = sequence_positions(input_ids.shape[1], group).expand(ids.shape[0], -1)
    with cp_hf.context_parallel(group):
        logits = model(input_ids=ids, position_ids=pos).logits   # this rank's logits

Each layer's band (causal, or its sliding window) comes from attnkern's mask function
(:mod:`attnkern.integrations.hf`), so sliding-window layers stay sliding windows -- on global
positions, through the halo exchange when the window fits a chunk. Labels must be shifted on
the whole sequence before sharding. Padding masks, dense masks, dropout, KV caches and the
score features attnkern lacks raise ``NotImplementedError``.
"""

from __future__ import annotations

import contextlib
import contextvars

from ..integrations.hf import _UNSUPPORTED, BandMask, band_mask_function
from .attention import context_parallel_attention

NAME = "attnkern_cp"
_state = contextvars.ContextVar("attnkern_context_parallel", default=None)


@contextlib.contextmanager
def context_parallel(group=None, *, layout: str = "zigzag", strategy: str = "auto"):
    """Inside this block, ``attn_implementation="attnkern_cp"`` layers attend across ``group``."""
    token = _state.set((group, layout, strategy))
    try:
        yield
    finally:
        _state.reset(token)


def _make_attention_function(backend: str):
    def attnkern_cp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                              **kwargs):
        state = _state.get()
        if state is None:
            raise RuntimeError(
                "attn_implementation='attnkern_cp' runs only inside attnkern.distributed.hf.context_parallel(group)"
            )
        group, layout, strategy = state
        for name, what in _UNSUPPORTED + (("cache", "paged caches"),):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"attn_implementation='attnkern_cp' does not support {what}")
        if kwargs.get("output_attentions", False):
            raise NotImplementedError("attn_implementation='attnkern_cp' does not support output_attentions")
        if dropout:
            raise NotImplementedError("attn_implementation='attnkern_cp' does not support dropout yet")
        if isinstance(attention_mask, BandMask):
            if attention_mask.padding is not None:
                raise NotImplementedError("attn_implementation='attnkern_cp' does not support padding masks")
            if attention_mask.bottom_right and query.shape[-2] != key.shape[-2]:
                raise NotImplementedError("attn_implementation='attnkern_cp' does not support KV caches")
            window = (attention_mask.window_left, attention_mask.window_right)
        elif attention_mask is None:
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            window = (-1, 0) if causal else None
        else:
            raise NotImplementedError(
                f"attn_implementation='attnkern_cp' does not support dense attention masks "
                f"({type(attention_mask).__name__}); it takes the band attnkern's mask function builds"
            )
        out = context_parallel_attention(query, key, value, group, window_size=window, scale=scaling, layout=layout,
                                         strategy=strategy, backend=backend)
        return out.transpose(1, 2).contiguous(), None

    return attnkern_cp_attention


def register(name: str = NAME, *, backend: str = "auto") -> str:
    """Register the context-parallel attention function (and attnkern's mask function) under ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, _make_attention_function(backend))
    AttentionMaskInterface.register(name, band_mask_function)
    return name
