"""attnkern.nn.HardAttention: each mode against an explicit computation of its definition."""

from __future__ import annotations

import pytest
import torch

import attnkern
from attnkern import reference
from conftest import assert_close

N, L, S, D, DV = 3, 5, 11, 16, 12


def _module(score, mode="argmax", **kw):
    m = attnkern.nn.HardAttention(D, score=score, mode=mode, **kw)
    for p in m.parameters():  # wide scores: no near-ties among the positions
        torch.nn.init.normal_(p, std=1.0)
    return m


def _data(padding=False):
    q, keys, values = torch.randn(N, L, D) * 2, torch.randn(N, S, D), torch.randn(N, S, DV)
    pad = None
    if padding:
        pad = torch.zeros(N, S, dtype=torch.bool)
        pad[0, 7:] = True
        pad[2, :3] = True
    return q, keys, values, pad


@pytest.mark.parametrize("score", ["dot", "general", "additive"])
@pytest.mark.parametrize("padding", [False, True])
def test_argmax_picks_the_best_allowed_position(score, padding, seed):
    m = _module(score)
    q, keys, values, pad = _data(padding)
    values.requires_grad_(True)
    context, indices, log_prob = m(q, keys, values, key_padding_mask=pad)
    scores = m.scores(q, keys).detach()
    if pad is not None:
        scores = scores.masked_fill(pad.unsqueeze(1), float("-inf"))
    best = scores.argmax(-1)
    assert log_prob is None and indices.shape == (N, L, 1)
    assert torch.equal(indices[..., 0], best)
    assert torch.equal(context, values.detach().gather(1, best.unsqueeze(-1).expand(N, L, DV)))
    # a single decoder step (N, Dq) drops the L axis
    c1, i1, _ = m(q[:, 2], keys, values, key_padding_mask=pad)
    assert torch.equal(i1[:, 0], best[:, 2]) and torch.equal(c1, context[:, 2])
    # top-1: the chosen value's gradient is the output's, the scores get none
    context.sum().backward()
    counts = torch.zeros(N, S).scatter_add_(1, best, torch.ones(N, L))
    assert torch.equal(values.grad, counts.unsqueeze(-1).expand(N, S, DV))
    assert all(p.grad is None or not p.grad.any() for p in m.parameters())


@pytest.mark.parametrize("score", ["dot", "additive"])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_argmax_top_k_is_top_k_attention_over_the_scores(score, temperature, seed):
    """p = softmax(score / temperature) over the kept top_k (the temperature was ignored here before)."""
    m = _module(score, top_k=3, temperature=temperature)
    q, keys, values, pad = _data(padding=True)
    context, indices, _ = m(q, keys, values, key_padding_mask=pad)
    scores = m.scores(q, keys).detach().double().unsqueeze(1)
    allowed = ~pad.view(N, 1, 1, S)
    ref, _, ref_idx = reference.topk_attention(scores, torch.eye(S, dtype=torch.float64).expand(N, 1, S, S),
                                               values.double().unsqueeze(1), allowed, 3, 1.0 / temperature)
    assert torch.equal(indices, ref_idx.squeeze(1))
    assert_close(context, ref.squeeze(1), torch.float32, "context")


@pytest.mark.parametrize("rows_per_block", [1, 2, L])
def test_additive_argmax_selects_block_by_block(rows_per_block, seed, monkeypatch):
    """Additive scores in argmax mode are scored block by block (no (L, S) matrix is kept): any block
    gives the float64 reference's selection, context and gradients; a fully padded entry gives zeros."""
    from attnkern import nn_hard

    m = _module("additive", top_k=3)
    q, keys, values, pad = _data(padding=True)
    pad[1] = True
    values.requires_grad_(True)
    params = list(m.parameters()) + [values]
    g = torch.randn(N, L, DV)
    scores = m.scores(q, keys).double().unsqueeze(1)
    ref, _, ref_idx = reference.topk_attention(scores, torch.eye(S, dtype=torch.float64).expand(N, 1, S, S),
                                               values.double().unsqueeze(1), ~pad.view(N, 1, 1, S), 3, 1.0)
    ref_grads = torch.autograd.grad(ref.squeeze(1), params, g.double())
    monkeypatch.setattr(nn_hard, "ADDITIVE_BLOCK_ELEMENTS", rows_per_block * N * S * D)  # hidden_dim = D
    context, indices, _ = m(q, keys, values, key_padding_mask=pad)
    assert torch.equal(indices, ref_idx.squeeze(1)) and (indices[1] == -1).all()
    assert_close(context, ref.squeeze(1), torch.float32, "context")
    for a, b in zip(torch.autograd.grad(context, params, g), ref_grads):
        assert_close(a, b, torch.float32, "gradient")


def test_gumbel_is_hard_forward_soft_backward(seed):
    m = _module("general", mode="gumbel", temperature=0.5)
    q, keys, values, _ = _data()
    torch.manual_seed(seed)
    context, indices, log_prob = m(q, keys, values)
    # the same noise, drawn again, reproduces the choice
    torch.manual_seed(seed)
    logits = m.scores(q, keys) / 0.5
    u = torch.rand_like(logits).clamp_(torch.finfo(logits.dtype).tiny, 1.0)
    perturbed = logits - torch.log(-torch.log(u))
    assert torch.equal(indices[..., 0], perturbed.argmax(-1))
    chosen = values.gather(1, indices.expand(N, L, DV))
    assert_close(context, chosen, torch.float32, "forward is the chosen value")
    assert_close(log_prob, torch.log_softmax(logits, -1).gather(-1, indices)[..., 0], torch.float32, "log_prob")
    # backward: the gradient of the soft weights softmax(perturbed)
    g = torch.randn_like(context)
    grads = torch.autograd.grad(context, list(m.parameters()), g, retain_graph=True)
    soft = torch.softmax(perturbed, -1)
    want = torch.autograd.grad(torch.matmul(soft, values), list(m.parameters()), g)
    for a, b in zip(grads, want):
        assert a.abs().sum() > 0
        assert_close(a, b, torch.float32, "straight-through gradient")
    m.eval()  # eval mode is argmax
    _, idx_eval, lp = m(q, keys, values)
    assert lp is None and torch.equal(idx_eval[..., 0], logits.detach().argmax(-1))


def test_sample_draws_from_the_softmax_and_exposes_log_prob(seed):
    m = _module("dot", mode="sample", temperature=2.0)
    q, keys, values = torch.randn(1, 1, D) * 0.3, torch.randn(1, 4, D), torch.randn(1, 4, DV)
    q, keys, values = q.expand(4000, 1, D), keys.expand(4000, 4, D), values.expand(4000, 4, DV)
    context, indices, log_prob = m(q, keys, values)
    probs = torch.softmax(m.scores(q[:1], keys[:1]) / 2.0, -1)[0, 0].detach()
    freq = torch.bincount(indices.flatten(), minlength=4).double() / 4000
    # 4000 draws: the standard error of each frequency is below 0.008
    assert (freq - probs.double()).abs().max() < 0.04, (freq, probs)
    assert_close(log_prob[:, 0], probs.log()[indices[:, 0, 0]], torch.float32, "log_prob")
    assert torch.equal(context, values.gather(1, indices.expand(4000, 1, DV)))
    # the value carries no pathwise gradient to the scores: they learn through log_prob (REINFORCE)
    q, values = q.clone().requires_grad_(True), values.clone().requires_grad_(True)
    context, _, log_prob = m(q, keys, values)
    assert not torch.autograd.grad(context.sum(), q, allow_unused=True, materialize_grads=True)[0].any()
    assert torch.autograd.grad(context.sum(), values)[0].sum() == 4000 * DV
    assert torch.autograd.grad(log_prob.sum(), q)[0].abs().sum() > 0


@pytest.mark.parametrize("score", ["dot", "general", "additive"])
@pytest.mark.parametrize("mode", ["argmax", "gumbel", "sample"])
def test_queries_that_see_no_key(score, mode, seed):
    """Every mode gives a query that sees no key (all keys padding, or S = 0) a zero context,
    index -1 (argmax: no slot when S = 0) and log_prob 0; the other queries are untouched
    (the stochastic modes picked a padding position, and S = 0 raised inside torch)."""
    m = attnkern.nn.HardAttention(8, score=score, mode=mode).train(mode != "argmax")
    q, keys = torch.randn(3, 4, 8, requires_grad=True), torch.randn(3, 6, 8, requires_grad=True)
    pad = torch.zeros(3, 6, dtype=torch.bool)
    pad[1] = True  # batch row 1: every key is padding
    pad[2, :2] = True
    torch.manual_seed(1)
    out = m(q, keys, key_padding_mask=pad)
    assert (out.context[1] == 0).all() and (out.indices[1] == -1).all()
    assert (out.indices[0] >= 0).all() and (out.indices[2] >= 2).all() and out.context[[0, 2]].abs().sum() > 0
    if mode != "argmax":
        assert (out.log_prob[1] == 0).all() and (out.log_prob[[0, 2]] < 0).all()
        out.context.sum().backward()  # the graph stays whole
    empty = m(q, keys[:, :0])
    assert out.context.shape == empty.context.shape and (empty.context == 0).all()
    assert empty.indices.shape == ((3, 4, 0) if mode == "argmax" or not m.training else (3, 4, 1))
    assert (empty.indices == -1).all()


def test_argument_errors():
    HA = attnkern.nn.HardAttention
    with pytest.raises(ValueError, match="score"):
        HA(8, score="cosine")
    with pytest.raises(ValueError, match="mode"):
        HA(8, mode="soft")
    with pytest.raises(ValueError, match="top_k"):
        HA(8, mode="gumbel", top_k=2)
    with pytest.raises(ValueError, match="top_k"):
        HA(8, top_k=0)
    with pytest.raises(TypeError, match="top_k"):
        HA(8, top_k=1.5)
    with pytest.raises(ValueError, match="temperature"):
        HA(8, temperature=0.0)
    with pytest.raises(ValueError, match="key_dim"):
        HA(8, 6, score="dot")
    with pytest.raises(ValueError, match="key_padding_mask"):
        HA(8)(torch.randn(2, 8), torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
