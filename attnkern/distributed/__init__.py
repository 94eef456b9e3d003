"""Context parallelism: attention over a sequence sharded across ranks (torch.distributed).

    shard_sequence / unshard_sequence / sequence_positions   the layouts ("zigzag", "contiguous")
    context_parallel_attention                                ring, allgather, halo, ulysses, auto
    merge_attention                                           the fp32 LSE merge of two partial results
    count_communication                                       bytes sent per collective (tests, benchmarks)

Built above attnkern's public kernels (the LSE-returning forward and the backward that takes
O and LSE); no kernel knows it is distributed. gloo on CPU, NCCL on GPU.
"""

from .attention import STRATEGIES, context_parallel_attention, ring_hops
from .blocks import merge_attention
from .comm import bytes_sent, count_communication
from .layout import LAYOUTS, sequence_positions, shard_sequence, unshard_sequence

__all__ = [
    "LAYOUTS",
    "STRATEGIES",
    "bytes_sent",
    "context_parallel_attention",
    "count_communication",
    "merge_attention",
    "ring_hops",
    "sequence_positions",
    "shard_sequence",
    "unshard_sequence",
]
