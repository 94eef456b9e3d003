"""Hugging Face packed training through attnkern's varlen op: no dense mask, and the same loss
and gradients as the documents run one by one (the oracle: separate forward passes)."""

from __future__ import annotations

import pytest
import torch

from attnkern import ops_varlen
from conftest import assert_close
from test_integrations import _rel, _tiny, hf  # noqa: F401  (hf is a fixture)

pytestmark = pytest.mark.skipif(ops_varlen.varlen_fwd is None, reason="C++ extension without attnkern::varlen_fwd")


@pytest.fixture
def varlen_calls(monkeypatch):
    calls = []
    real = ops_varlen.varlen_fwd

    def counting(*args):
        calls.append(args[3].tolist())  # cu_seqlens_q
        return real(*args)

    monkeypatch.setattr(ops_varlen, "varlen_fwd", counting)
    return calls


def _doc_losses(logits, docs):
    """Sum over documents of the next-token cross entropy inside each document."""
    total, start = 0.0, 0
    for doc in docs:
        n = doc.shape[0]
        total = total + torch.nn.functional.cross_entropy(logits[start:start + n - 1], doc[1:], reduction="sum")
        start += n
    return total


def test_packed_training_step_equals_documents_one_by_one(hf, varlen_calls, seed):
    transformers, _, dense_calls = hf
    model = _tiny(transformers, "mistral").train()  # sliding window 8: the 17-token document feels it
    model.set_attn_implementation("attnkern")
    docs = [torch.randint(0, 128, (n,)) for n in (9, 17, 4)]
    ids = torch.cat(docs)[None]
    positions = torch.cat([torch.arange(d.shape[0]) for d in docs])[None]

    model.zero_grad()
    loss_packed = _doc_losses(model(ids, position_ids=positions, use_cache=False).logits[0], docs)
    loss_packed.backward()
    grads_packed = [p.grad.clone() for p in model.parameters()]
    assert varlen_calls == [[0, 9, 26, 30]] * 2 and not dense_calls, "packed documents must run as one varlen call"

    model.zero_grad()
    loss_single = 0.0
    for doc in docs:
        loss_single = loss_single + _doc_losses(model(doc[None], use_cache=False).logits[0], [doc])
    loss_single.backward()
    assert abs(loss_packed.item() - loss_single.item()) <= 1e-5 * abs(loss_single.item())
    for a, b in zip(grads_packed, (p.grad for p in model.parameters())):
        assert_close(a, b, torch.float32, "parameter gradient")
    # the packing must matter, or this test could not tell
    mixed = _doc_losses(model(ids, use_cache=False).logits[0], docs)
    assert abs(mixed.item() - loss_single.item()) > 1e-3 * abs(loss_single.item())


def test_flattening_collator_kwargs(hf, varlen_calls, seed):
    transformers, _, dense_calls = hf
    model = _tiny(transformers, "mistral")
    docs = [list(range(3, 3 + n)) for n in (5, 11, 7)]
    for d in docs:
        d[:] = torch.randint(0, 128, (len(d),)).tolist()
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)
    batch = collator([{"input_ids": d} for d in docs])
    assert "cu_seq_lens_q" in batch and "max_length_q" in batch
    kwargs = {k: v for k, v in batch.items() if k not in ("labels",)}
    model.set_attn_implementation("attnkern")
    with torch.no_grad():
        ours = model(**kwargs, use_cache=False).logits[0]
    assert varlen_calls and all(c == [0, 5, 16, 23] for c in varlen_calls) and not dense_calls
    model.set_attn_implementation("eager")
    start = 0
    for d in docs:
        with torch.no_grad():
            alone = model(torch.tensor([d]), use_cache=False).logits[0]
        assert _rel(ours[start:start + len(d)], alone) <= 1e-4
        start += len(d)


def test_band_mask_dense_of_packed_documents():
    """The eager fallback's dense form of a packed-documents mask: block-diagonal, banded inside."""
    from attnkern.integrations.hf import BandMask

    index = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2]])
    dense = BandMask(1, 0, True, None, 9, sequence_index=index).dense(9)[0, 0]
    expected = torch.zeros(9, 9, dtype=torch.bool)
    for start, n in ((0, 3), (3, 2), (5, 4)):
        for i in range(n):
            for j in range(n):
                expected[start + i, start + j] = i - 1 <= j <= i
    assert torch.equal(dense, expected)


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
def test_packed_documents_keep_softcap_and_sinks(hf, varlen_calls, kind, seed):
    """Gemma 2 (softcap) and gpt-oss (sinks) with the flattening collator's kwargs: one varlen
    call per layer, no dense call, no fallback warning, and each document's logits equal eager's
    on that document alone (eager applies the modifiers)."""
    import warnings

    from test_integrations import MODIFIER_MODELS, _no_fallback_warning

    transformers, _, dense_calls = hf
    model = _tiny(transformers, kind, **MODIFIER_MODELS[kind])
    docs = [torch.randint(0, 128, (n,)) for n in (11, 15)]
    cu = torch.tensor([0, 11, 26], dtype=torch.int32)
    kwargs = dict(input_ids=torch.cat(docs)[None], position_ids=torch.cat([torch.arange(11), torch.arange(15)])[None],
                  cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=15, max_length_k=15, use_cache=False)
    model.set_attn_implementation("attnkern")
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        ours = model(**kwargs).logits[0]
    assert _no_fallback_warning(record)
    assert varlen_calls == [[0, 11, 26]] * 2 and not dense_calls, (varlen_calls, dense_calls)
    model.set_attn_implementation("eager")
    for doc, rows in zip(docs, (slice(0, 11), slice(11, 26))):
        with torch.no_grad():
            alone = model(doc[None], use_cache=False).logits[0]
        assert _rel(ours[rows], alone) <= 1e-5
