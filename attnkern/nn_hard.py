"""Hard attention (Xu et al., 2015, "Show, Attend and Tell"): each query attends one source
position, or its ``top_k`` best, instead of a soft mixture of all of them.

Part of :mod:`attnkern.nn` (re-exported there); kept in its own file.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._semantics import check_backend, check_top_k
from .nn import _additive_scores, _seq2seq_inputs
from .topk import topk_attention

# additive scores in argmax mode: the most elements of one block's (N, rows, S, hidden) tanh
ADDITIVE_BLOCK_ELEMENTS = 1 << 22


class HardAttentionOutput(NamedTuple):
    context: Tensor  # (N, Dv) or (N, L, Dv)
    indices: Tensor  # (N, [L,] top_k) selected source positions, -1 in empty slots
    log_prob: Optional[Tensor]  # (N, [L]) log-probability of the sampled position (sample/gumbel), else None


class HardAttention(torch.nn.Module):
    """Hard attention with ``dot``/``general``/``additive`` scores and three ways to choose.

    Scores (unscaled, as Luong's): ``dot`` ``q . k``, ``general`` ``q . W k``, ``additive``
    ``v^T tanh(W q + U k)``. ``p = softmax(score / temperature)`` over the allowed positions.

    * ``mode="argmax"``: the ``top_k`` best positions (top-1: the argmax), softmax over their
      scores: :func:`attnkern.topk_attention` (``dot``/``general`` run on its fused kernel;
      ``additive`` selects block by block: O(L * top_k) memory beyond one bounded block).
      The choice carries no gradient; with ``top_k=1`` only the values get one.
    * ``mode="gumbel"`` (training): Gumbel-softmax straight-through. The forward picks
      ``argmax(score / temperature + g)``, ``g`` Gumbel noise, and returns that value exactly;
      the backward differentiates the soft weights ``softmax((score / temperature + g))``.
    * ``mode="sample"`` (training): draws one position from ``p`` and returns its value. The
      scores get the score-function (REINFORCE) gradient through ``log_prob``, which the
      forward returns: add ``(loss_per_query.detach() - baseline) * log_prob`` to the loss.
    * In eval mode every module chooses by ``argmax``.

    A query that can see no key (every key padding, or no key at all) gets a zero context and
    index -1 in every mode, as in :func:`attnkern.topk_attention`; its ``log_prob`` is 0 (the one
    outcome, no pick, is certain).

    ``forward(query, keys, values=None, key_padding_mask=None)`` with query ``(N, Dq)`` or
    ``(N, L, Dq)``, keys ``(N, S, Dk)``, values (default keys) ``(N, S, Dv)``,
    ``key_padding_mask`` bool ``(N, S)``, True = padding. Returns a
    :class:`HardAttentionOutput` ``(context, indices, log_prob)``.
    """

    SCORES = ("dot", "general", "additive")
    MODES = ("argmax", "gumbel", "sample")

    def __init__(self, query_dim: int, key_dim: Optional[int] = None, *, score: str = "dot", mode: str = "argmax",
                 top_k: int = 1, temperature: float = 1.0, hidden_dim: Optional[int] = None, device=None,
                 dtype=None, backend: str = "auto") -> None:
        super().__init__()
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        top_k = check_top_k(top_k)
        if mode != "argmax" and top_k != 1:
            raise ValueError(f"mode={mode!r} chooses one position: top_k must be 1, got {top_k}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        key_dim = query_dim if key_dim is None else key_dim
        if score == "dot" and key_dim != query_dim:
            raise ValueError(f"score='dot' needs key_dim == query_dim, got {key_dim} and {query_dim}")
        hidden_dim = query_dim if hidden_dim is None else hidden_dim
        self.score, self.mode, self.top_k, self.temperature = score, mode, top_k, float(temperature)
        self.backend = check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        if score == "general":
            self.key_proj = torch.nn.Linear(key_dim, query_dim, bias=False, **factory)  # W
        elif score == "additive":
            self.query_proj = torch.nn.Linear(query_dim, hidden_dim, bias=False, **factory)
            self.key_proj = torch.nn.Linear(key_dim, hidden_dim, bias=True, **factory)
            self.score_proj = torch.nn.Linear(hidden_dim, 1, bias=False, **factory)

    def extra_repr(self) -> str:
        return f"score={self.score!r}, mode={self.mode!r}, top_k={self.top_k}, temperature={self.temperature}"

    def scores(self, query: Tensor, keys: Tensor) -> Tensor:
        """Unscaled scores ``(N, L, S)`` of canonical query ``(N, L, Dq)`` and keys ``(N, S, Dk)``."""
        if self.score == "dot":
            return torch.matmul(query, keys.transpose(1, 2))
        if self.score == "general":
            return torch.matmul(query, self.key_proj(keys).transpose(1, 2))
        return _additive_scores(self.query_proj(query), self.key_proj(keys), self.score_proj)

    def forward(self, query: Tensor, keys: Tensor, values: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None) -> HardAttentionOutput:
        query, keys, values, allowed, single = _seq2seq_inputs(query, keys, values, key_padding_mask)
        mode = self.mode if self.training else "argmax"
        if mode == "argmax":
            context, indices, log_prob = self._argmax(query, keys, values, allowed)
        else:
            context, indices, log_prob = self._stochastic(mode, query, keys, values, allowed)
        if single:
            context, indices = context.squeeze(1), indices.squeeze(1)
            log_prob = None if log_prob is None else log_prob.squeeze(1)
        return HardAttentionOutput(context, indices, log_prob)

    def _argmax(self, query, keys, values, allowed):
        if self.score == "additive":  # not a dot product: no fused kernel scores it
            return (*self._additive_top_k(query, keys, values, allowed), None)
        mask = None if allowed is None else allowed.unsqueeze(1)  # (N, 1, 1, S): True takes part
        k = (keys if self.score == "dot" else self.key_proj(keys)).unsqueeze(1)
        # (1 / temperature scales the softmax over the kept scores, as p's definition; the selection
        # of the best top_k is the same at any positive scale)
        context, indices = topk_attention(query.unsqueeze(1), k, values.unsqueeze(1), self.top_k, attn_mask=mask,
                                          scale=1.0 / self.temperature, return_indices=True, backend=self.backend)
        return context.squeeze(1), indices.squeeze(1), None

    def _additive_top_k(self, query, keys, values, allowed):
        """Top-k attention over additive scores without an (L, S) matrix: (context, indices).

        The selection scores blocks of query rows without gradient, each block's
        (N, rows, S, hidden) tanh bounded by ADDITIVE_BLOCK_ELEMENTS, and keeps its best
        ``top_k`` (a stable sort: ties to the lower position, the rule of top-k attention). The
        kept scores are then recomputed with gradient from the gathered key projections, so the
        memory that autograd holds is O(N * L * top_k * (hidden + Dv)).
        """
        projected_query, projected_keys = self.query_proj(query), self.key_proj(keys)
        n, rows, hidden = projected_query.shape
        slots = min(self.top_k, keys.shape[1])
        if slots == 0:  # no key at all: zero context, no slot (as topk_attention)
            return (values.new_zeros(n, rows, values.shape[-1]) + 0 * projected_query.sum(),
                    query.new_empty((n, rows, 0), dtype=torch.int64))
        block = max(1, ADDITIVE_BLOCK_ELEMENTS // max(1, n * keys.shape[1] * hidden))
        picks = []
        with torch.no_grad():
            for r0 in range(0, rows, block):
                scores = _additive_scores(projected_query[:, r0:r0 + block], projected_keys, self.score_proj)
                if allowed is not None:
                    scores = scores.masked_fill(~allowed, float("-inf"))
                ordered, order = torch.sort(scores, dim=-1, descending=True, stable=True)
                picks.append(torch.where(ordered[..., :slots] > float("-inf"), order[..., :slots], -1))
        indices = torch.cat(picks, 1) if picks else query.new_empty((n, 0, slots), dtype=torch.int64)
        kept = indices >= 0
        flat = indices.clamp(min=0).flatten(1).unsqueeze(-1)  # (N, L * slots, 1)
        kept_keys = projected_keys.gather(1, flat.expand(-1, -1, hidden)).view(n, rows, slots, hidden)
        kept_scores = self.score_proj(torch.tanh(projected_query.unsqueeze(2) + kept_keys)).squeeze(-1)
        kept_scores = kept_scores / self.temperature
        # empty slots weigh 0; a row with none kept gets context 0, as in topk_attention
        lowest = torch.finfo(kept_scores.dtype).min
        weights = torch.softmax(kept_scores.masked_fill(~kept, lowest), dim=-1) * kept
        kept_values = values.gather(1, flat.expand(-1, -1, values.shape[-1])).view(n, rows, slots, -1)
        return (weights.unsqueeze(-1) * kept_values).sum(2), indices

    def _stochastic(self, mode, query, keys, values, allowed):
        logits = self.scores(query, keys) / self.temperature
        n, rows = logits.shape[:2]
        if keys.shape[1] == 0:  # no key at all: zero context, index -1, log_prob 0 (class docstring)
            return (values.new_zeros(n, rows, values.shape[-1]) + 0 * logits.sum(),
                    torch.full((n, rows, 1), -1, dtype=torch.int64, device=logits.device), logits.new_zeros(n, rows))
        empty = None  # (N, 1, 1): rows whose every key is padding
        if allowed is not None:
            logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
            empty = ~allowed.any(-1, keepdim=True)
        log_p = torch.log_softmax(logits, dim=-1)
        if mode == "gumbel":
            u = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
            perturbed = logits - torch.log(-torch.log(u))
            choice = perturbed.argmax(dim=-1, keepdim=True)
            soft = torch.softmax(perturbed, dim=-1)
            hard = torch.zeros_like(soft).scatter_(-1, choice, 1.0)
            weights = hard - soft.detach() + soft  # hard forward, soft backward
        else:
            choice = torch.multinomial(log_p.detach().exp().flatten(0, 1), 1).view(*logits.shape[:-1], 1)
            weights = torch.zeros_like(logits).scatter_(-1, choice, 1.0)  # no pathwise gradient to the scores
        log_prob = log_p.gather(-1, choice).squeeze(-1)
        if empty is not None:  # such a row picked a padding position: it picks nothing
            weights = weights.masked_fill(empty, 0.0)
            choice = choice.masked_fill(empty, -1)
            log_prob = log_prob.masked_fill(empty.squeeze(-1), 0.0)
        context = torch.matmul(weights, values)
        return context, choice, log_prob
