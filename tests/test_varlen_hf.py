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
    logits_packed = model(ids, position_ids=positions, use_cache=False).logits[0]
    loss_packed = _doc_losses(logits_packed, docs)
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
    # the packing must matter, or this test could not tell (the logits: a summed loss can move
    # by less than 1e-3 on a random-init model, which made this check flaky)
    with torch.no_grad():
        mixed = model(ids, use_cache=False).logits[0]
    assert _rel(mixed, logits_packed.detach()) > 1e-3


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


# ---------------------------------------------------------------------------------------
# padded batches, generation with static and dynamic caches, continuous batching


def _llama(transformers):
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1)
    return transformers.LlamaForCausalLM(cfg).eval()


def _left_padded(batch, length, pads):
    ids = torch.randint(1, 128, (batch, length))
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = 0, 0
    return ids, mask


GENERATE_CASES = {  # id -> (model, cache, decode through the kvcache op)
    "llama-dynamic": ("llama", "dynamic", False),
    "llama-dynamic-kvcache": ("llama", "dynamic", True),
    "llama-static": ("llama", "static", False),
    "mistral-static": ("mistral", "static", False),
}


@pytest.mark.parametrize("case", list(GENERATE_CASES))
def test_generate_padded_batch_matches_eager(hf, varlen_calls, monkeypatch, case, seed):
    """Greedy generate() of a left-padded batch gives eager's tokens, with a dynamic or a static
    cache (Mistral: static sliding-window layers): the prompt runs unpadded through the varlen op,
    decoding runs on attnkern's band (the dense op with the stride-0 padding mask, or, switched
    on, the kvcache op reading the cache in place with cache_leftpad); no dense (L, S) mask is
    built (a static cache's empty slots are cut off, not masked) and nothing falls back."""
    import warnings

    from test_integrations import _no_fallback_warning

    kind, cache, via_kvcache = GENERATE_CASES[case]
    transformers, hf_module, dense_calls = hf
    monkeypatch.setattr(hf_module, "DECODE_VIA_KVCACHE", via_kvcache)
    model = _llama(transformers) if kind == "llama" else _tiny(transformers, "mistral")
    ids, mask = _left_padded(4, 14, (0, 10, 11, 12))  # work (14^2 + 4^2 + 3^2 + 2^2) / (4 * 14^2) = 0.29: unpadded
    new_tokens = 10
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if cache == "static":
        kwargs["cache_implementation"] = "static"
    model.set_attn_implementation("eager")
    expected = model.generate(ids, **kwargs)
    model.set_attn_implementation("attnkern")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = model.generate(ids, **kwargs)
    assert torch.equal(got, expected)
    assert _no_fallback_warning(record)
    layers, steps = model.config.num_hidden_layers, new_tokens - 1
    assert varlen_calls[:layers] == [[0, 14, 18, 21, 23]] * layers, varlen_calls[:3]  # the prompt, unpadded
    decode = dense_calls
    if via_kvcache:
        assert len(varlen_calls) == layers * (1 + steps) and not dense_calls
        return
    assert len(varlen_calls) == layers and len(decode) == layers * steps
    # attnkern's band every step (HF's dense mask would come without a window), bottom-right
    assert all(c["q"][2] == 1 and c["window"] is not None and c["bottom_right"] for c in decode)
    if kind == "llama" and cache == "static":  # the empty slots of the static cache are cut off
        assert all(c["k"][2] == 15 + i // layers for i, c in enumerate(decode)), [c["k"] for c in decode]


def test_padded_training_step_unpads(hf, varlen_calls, seed):
    """A padded batch (labels -100 on the padding) trains one step with eager's loss and gradients
    through the varlen op; a nearly full batch keeps the stride-0 mask (UNPAD_MAX_WORK)."""
    from test_integrations import F32

    transformers, hf_module, dense_calls = hf
    model = _tiny(transformers, "mistral").train()
    ids, mask = _left_padded(4, 24, (0, 17, 19, 21))  # work (24^2 + 7^2 + 5^2 + 3^2) / (4 * 24^2) = 0.29
    ids, mask = ids.flip(1), mask.flip(1)  # right padding this time
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for impl in ("eager", "attnkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[impl] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert varlen_calls == [[0, 24, 31, 36, 39]] * 2 and not dense_calls
    assert abs(grads["eager"][0] - grads["attnkern"][0]) <= 1e-5 * abs(grads["eager"][0])
    for a, b in zip(grads["attnkern"][1], grads["eager"][1]):
        assert_close(a, b, F32, "parameter gradient")
    varlen_calls.clear()
    full = torch.ones_like(mask)
    full[0, -1] = 0  # work 0.97 > UNPAD_MAX_WORK
    with torch.no_grad():
        model(ids, attention_mask=full)
    assert not varlen_calls and [c["mask"] for c in dense_calls] == [(4, 1, 1, 24)] * 2


def test_continuous_batching_matches_eager(hf, varlen_calls, seed):
    """transformers' generate_batch (continuous batching, paged cache) through attnkern: requests of
    different lengths, packed with no mask, give the tokens eager generate() gives each alone
    (Mistral: the sliding-window cache keeps 8 keys, fewer than the requests grow to)."""
    transformers, hf_module, dense_calls = hf
    model = _tiny(transformers, "mistral")
    prompts = [torch.randint(1, 128, (n,)).tolist() for n in (5, 12, 8)]
    config = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    model.set_attn_implementation("eager")
    expected = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p):].tolist() for p in prompts]
    model.set_attn_implementation("attnkern")
    with pytest.raises(ValueError, match="'unregistered_flash_varlen' is not registered"):
        hf_module.use_for_continuous_batching(model, name="unregistered")
    previous = hf_module.use_for_continuous_batching(model)
    assert previous == "attnkern" and model.config._attn_implementation == "attnkern_flash_varlen"
    try:
        # a small cache (the default sizes it from free memory: slow to allocate), no block table
        cb = transformers.ContinuousBatchingConfig(max_blocks_per_request=0, page_size=16, num_blocks=16,
                                                   max_batch_tokens=64)
        out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False)
    finally:
        model.set_attn_implementation(previous)
    got = [r.generated_tokens for r in out.values()]
    assert got == expected
    # requests ran packed together (several sequences in one call), and never through a dense mask
    assert any(len(cu) > 2 for cu in varlen_calls) and not dense_calls, (varlen_calls, dense_calls)


def test_padded_route_rule_and_gaps(seed):
    """The route a padding mask takes (hf._padded_route), and an unpadded causal batch whose rows
    have gaps (only the order of the tokens counts) against the float64 reference on real rows."""
    import attnkern
    from attnkern.integrations import hf as hf_module

    def rows(*runs, length=16):  # (B, S) bool with True on [start, stop) of each row
        mask = torch.zeros(len(runs), length, dtype=torch.bool)
        for b, spans in enumerate(runs):
            for start, stop in spans:
                mask[b, start:stop] = True
        return mask

    route = hf_module._padded_route
    left = rows([(0, 16)], [(12, 16)], [(13, 16)], [(14, 16)])  # work (256 + 16 + 9 + 4) / 1024 = 0.28
    assert route(left, 16, 16, (-1, 0), 0.0, {}) == "unpad"
    assert route(left, 16, 16, (-1, 0), 0.1, {}) == "unpad"  # the varlen op drops out too
    assert route(rows([(0, 16)], [(8, 16)]), 16, 16, (-1, 0), 0.0, {}) == "mask"  # work 0.625
    gaps = rows([(0, 3), (9, 12)], [(2, 5)], [(0, 1), (15, 16)])
    assert route(gaps, 16, 16, (-1, 0), 0.0, {}) == "unpad"
    assert route(gaps, 16, 16, (3, 0), 0.0, {}) == "mask"  # a window's edge counts distances
    assert route(gaps, 16, 16, (-1, 0), 0.0, {"alibi_slopes": torch.ones(2)}) == "mask"
    assert route(left, 1, 16, (-1, 0), 0.0, {}) == "mask"  # decoding: the dense op (DECODE_VIA_KVCACHE off)
    hf_module.DECODE_VIA_KVCACHE = True
    try:
        assert route(left, 1, 16, (-1, 0), 0.0, {}) == "leftpad"
        assert route(left.flip(1), 1, 16, (-1, 0), 0.0, {}) == "mask"  # right padding: no cache_leftpad
    finally:
        hf_module.DECODE_VIA_KVCACHE = False

    q, k, v = torch.randn(3, 4, 16, 8), torch.randn(3, 2, 16, 8), torch.randn(3, 2, 16, 8)
    out = hf_module._unpadded_attention(q, k, v, gaps, (-1, 0), None, "auto", {})  # (B, S, H, D)
    allowed = gaps[:, None, None, :] & torch.ones(16, 16, dtype=torch.bool).tril()
    ref = attnkern.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed,
                                                enable_gqa=True, backend="math").transpose(1, 2)
    assert_close(out[gaps], ref[gaps], torch.float32, "unpadded rows with gaps")
    assert torch.all(out[~gaps] == 0), "pad rows output 0"
