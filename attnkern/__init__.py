"""attnkern: fused attention and local-window attention kernels for PyTorch.

Public API:
    scaled_dot_product_attention  drop-in for torch.nn.functional.scaled_dot_product_attention (+ window_size)
    flash_attn_func               drop-in for flash-attn's flash_attn_func (bottom-right alignment)
    flash_attn_varlen_func        flash-attn's packed variable-length entry points (also _qkvpacked, _kvpacked)
    flash_attn_with_kvcache       flash-attn's KV-cache decoding: in-place append, paged caches, rotary
    local_attention               sliding-window attention in torch's layout
    topk_attention                each query attends its top_k highest-scoring keys (hard attention: top_k=1)
    available_backends            backends usable on this machine
    patch / unpatch               route torch.nn.functional.scaled_dot_product_attention to attnkern
    nn                            MultiheadAttention, LocalSelfAttention, AdditiveAttention, LuongAttention,
                                  HardAttention
    integrations.hf               attn_implementation="attnkern" for Hugging Face transformers
"""

from ._version import __version__
from .dispatch import available_backends
from .functional import flash_attn_func, local_attention, scaled_dot_product_attention
from .integrations.patch import patch, unpatch
from .topk import topk_attention
from .varlen import (
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_with_kvcache,
)
from . import nn

__all__ = [
    "__version__",
    "available_backends",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "local_attention",
    "nn",
    "patch",
    "scaled_dot_product_attention",
    "topk_attention",
    "unpatch",
]
