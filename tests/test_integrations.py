"""Drop-in integrations: attnkern.patch, attnkern.nn, attnkern.integrations.hf, torch.compile.

The oracles are independent of the code under test: torch's own modules and functions run
unpatched (patch, nn.MultiheadAttention), explicit float64 formulas written here (local,
additive and Luong attention), and transformers' "eager" attention (HF models). Every test
that claims attnkern ran counts calls into the kernel op itself, not the integration's
own counters. The seq2seq training test is the only one with fixed seeds.
"""

from __future__ import annotations

import math
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.functional import scaled_dot_product_attention as sdpa_bound_before_patching

import attnkern
from attnkern import ops
from attnkern._semantics import band_mask
from attnkern.integrations import patch as patch_module
from conftest import assert_close

F32 = torch.float32
BUILTIN_SDPA = torch._C._nn.scaled_dot_product_attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """Records every call of attnkern's fused forward op (the C++ kernels on this machine)."""
    calls = []
    real = ops.native_fwd

    def counting(*args):
        calls.append(tuple(args[0].shape))
        return real(*args)

    monkeypatch.setattr(ops, "native_fwd", counting)
    return calls


@pytest.fixture
def clean_patch_state():
    """Every patch test must leave torch exactly as it found it."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    yield
    assert F.scaled_dot_product_attention is BUILTIN_SDPA, "F.scaled_dot_product_attention not restored"
    assert torch.overrides._get_current_function_mode_stack() == [], "a torch function mode was left on the stack"
    assert torch.backends.mha.get_fastpath_enabled() == fastpath
    assert not attnkern.integrations.patch.is_patched()


def grads_of(out, tensors, grad_out):
    return torch.autograd.grad(out, tensors, grad_out, allow_unused=True)


# =======================================================================================
# attnkern.patch


def _torch_version():
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in torch.__version__.split(".")[:2])


def _sdpa_inputs(requires_grad=True):
    q = torch.randn(2, 4, 33, 16, requires_grad=requires_grad)
    k = torch.randn(2, 2, 41, 16, requires_grad=requires_grad)
    v = torch.randn(2, 2, 41, 16, requires_grad=requires_grad)
    return q, k, v


CALLERS = {
    "attribute": lambda *a, **kw: F.scaled_dot_product_attention(*a, **kw),
    "bound-before-patching": lambda *a, **kw: sdpa_bound_before_patching(*a, **kw),
    "torch._C._nn": lambda *a, **kw: torch._C._nn.scaled_dot_product_attention(*a, **kw),
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("kwargs", [{"is_causal": True}, {"mask": "bool"}, {"mask": "float"}, {"scale": 0.3}],
                         ids=["causal", "bool-mask", "float-mask", "scale"])
def test_patch_routes_every_caller(caller, kwargs, seed, kernel_calls, clean_patch_state):
    q, k, v = _sdpa_inputs()
    kwargs = dict(kwargs)
    if kwargs.pop("mask", None) == "bool":
        kwargs["attn_mask"] = torch.rand(2, 1, 33, 41) > 0.3
    elif "scale" not in kwargs and "is_causal" not in kwargs:
        kwargs["attn_mask"] = torch.randn(2, 4, 33, 41)
    call = CALLERS[caller]
    ref = call(q, k, v, enable_gqa=True, **kwargs)
    g = torch.randn_like(ref)
    ref_grads = grads_of(ref, (q, k, v), g)
    assert kernel_calls == []
    with attnkern.patch():
        out = call(q, k, v, enable_gqa=True, **kwargs)
        grads = grads_of(out, (q, k, v), g)
    assert len(kernel_calls) == 1, f"attnkern's kernel ran {len(kernel_calls)} times, expected once"
    assert_close(out, ref, F32, "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close(a, b, F32, f"d{name}")
    call(q, k, v, enable_gqa=True, **kwargs)  # after exit: torch again
    assert len(kernel_calls) == 1


def test_patch_restores_after_exception(kernel_calls, clean_patch_state):
    q, k, v = _sdpa_inputs(requires_grad=False)
    with pytest.raises(KeyError, match="boom"):
        with attnkern.patch():
            assert F.scaled_dot_product_attention is not BUILTIN_SDPA
            sdpa_bound_before_patching(q, k, v, enable_gqa=True)
            raise KeyError("boom")
    assert len(kernel_calls) == 1
    assert F.scaled_dot_product_attention is BUILTIN_SDPA
    sdpa_bound_before_patching(q, k, v, enable_gqa=True)
    F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    assert len(kernel_calls) == 1


def test_patch_nesting_and_window(seed, kernel_calls, clean_patch_state):
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    dense = F.scaled_dot_product_attention(q, k, v)
    banded = F.scaled_dot_product_attention(q, k, v, attn_mask=band_mask(40, 40, 3, 1, 0))
    with attnkern.patch():
        assert_close(F.scaled_dot_product_attention(q, k, v), dense, F32, "outer")
        with attnkern.patch(window_size=(3, 1)):
            assert_close(sdpa_bound_before_patching(q, k, v), banded, F32, "inner window")
            assert_close(F.scaled_dot_product_attention(q, k, v), banded, F32, "inner window (attribute)")
        assert_close(F.scaled_dot_product_attention(q, k, v), dense, F32, "outer again")
    assert len(kernel_calls) == 4
    assert_close(F.scaled_dot_product_attention(q, k, v), dense, F32, "unpatched")
    assert len(kernel_calls) == 4


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback, not ours
def test_patch_falls_back_to_torch(kernel_calls, clean_patch_state):
    q, k, v = _sdpa_inputs(requires_grad=False)
    mask = torch.rand(2, 1, 33, 41) > 0.3
    patch_module.stats.reset()
    with attnkern.patch():
        # a mask together with is_causal: attnkern leaves it to torch, whose answer depends on its version
        both = dict(attn_mask=mask, is_causal=True, enable_gqa=True)
        if _torch_version() >= (2, 12):  # torch rejects it: the error must be torch's own
            with pytest.raises(RuntimeError, match="attn_mask"):
                F.scaled_dot_product_attention(q, k, v, **both)
        else:  # torch 2.11 attends the mask's keys inside the causal band: its own result, bit for bit
            out_both = F.scaled_dot_product_attention(q, k, v, **both)
        # float64: only attnkern's float64 reference serves it, so auto leaves it to torch
        q64, k64, v64 = (t.double() for t in (q, k, v))
        out64 = sdpa_bound_before_patching(q64, k64, v64, enable_gqa=True)
        # heads that need enable_gqa: attnkern's checks reject it, torch raises its own error
        with pytest.raises(RuntimeError):
            F.scaled_dot_product_attention(q, k, v)
        # torch.func transforms: attnkern's ops have no vmap rule
        batched = torch.func.vmap(lambda x: F.scaled_dot_product_attention(x, x, x))(q[None])
    assert kernel_calls == []
    assert sum(patch_module.stats.fell_back.values()) == 4 and patch_module.stats.routed == 0
    if _torch_version() < (2, 12):
        torch.testing.assert_close(out_both, sdpa_bound_before_patching(q, k, v, **both), rtol=0, atol=0,
                                   equal_nan=True)
        causal = torch.ones(33, 41, dtype=torch.bool).tril()
        torch.testing.assert_close(out_both, sdpa_bound_before_patching(q, k, v, attn_mask=mask & causal,
                                                                        enable_gqa=True), equal_nan=True)
    assert torch.equal(out64, sdpa_bound_before_patching(q64, k64, v64, enable_gqa=True))
    assert_close(batched[0], F.scaled_dot_product_attention(q, q, q), F32, "vmap")


def test_patch_explicit_backend(monkeypatch, clean_patch_state):
    used = []
    real = attnkern.dispatch._math
    monkeypatch.setattr(attnkern.dispatch, "_math", lambda *a: used.append(1) or real(*a))
    q, k, v = _sdpa_inputs(requires_grad=False)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    with attnkern.patch(backend="math"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert used == [1]
    assert_close(out, ref, F32, "math backend")


def test_patch_argument_errors(clean_patch_state):
    with pytest.raises(ValueError, match="backend"):
        attnkern.patch(backend="nope")
    with pytest.raises(ValueError, match="window_size"):
        attnkern.patch(window_size=(-2, 0))
    with pytest.raises(TypeError, match="enable"):
        attnkern.patch(enable="yes")


def test_patch_program_wide_and_threads(kernel_calls, clean_patch_state):
    q, k, v = _sdpa_inputs(requires_grad=False)
    results = {}

    def in_thread(name, fn):
        t = threading.Thread(target=lambda: results.__setitem__(name, fn()))
        t.start()
        t.join()

    # a scope patches its own thread only
    with attnkern.patch():
        in_thread("scoped", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        assert kernel_calls == []
    # the whole program: other threads too (through the attribute), MHA fast path off
    assert attnkern.unpatch() is False
    handle = attnkern.patch(enable=True)
    try:
        assert torch.backends.mha.get_fastpath_enabled() is False
        with pytest.raises(TypeError, match="whole program"):
            with handle:
                pass
        in_thread("program", lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        assert len(kernel_calls) == 1
        sdpa_bound_before_patching(q, k, v, enable_gqa=True)  # this thread: the mode catches it
        assert len(kernel_calls) == 2
        errors = []
        in_thread("unpatch", lambda: errors.append(pytest.raises(RuntimeError, attnkern.unpatch)))
        assert errors, "unpatch() from another thread must raise"
    finally:
        assert attnkern.unpatch() is True
    assert_close(results["program"], results["scoped"], F32, "other thread, program-wide patch vs unpatched")


# nn.MultiheadAttention and nn.TransformerEncoderLayer under patch() --------------------


def _counting(monkeypatch, name):
    calls = []
    real = getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def _module_case(kind, batch_first, seed):
    torch.manual_seed(seed)
    if kind == "mha":
        module = torch.nn.MultiheadAttention(32, 4, batch_first=batch_first)
    else:
        module = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    x = torch.randn(3, 20, 32) if batch_first else torch.randn(20, 3, 32)
    kpm = torch.zeros(3, 20, dtype=torch.bool)
    kpm[1, 15:] = True
    kpm[2, 8:] = True
    return module, x, kpm


def _run_module(kind, module, x, kpm, causal):
    mask = ~band_mask(20, 20, -1, 0, 0) if causal else None  # torch's convention: True = masked out
    if kind == "mha":
        return module(x, x, x, key_padding_mask=kpm, attn_mask=mask, need_weights=False)[0]
    return module(x, src_mask=mask, src_key_padding_mask=kpm, is_causal=causal)


@pytest.mark.parametrize("kind", ["mha", "encoder_layer"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_patch_torch_modules_train_and_eval(kind, batch_first, causal, seed, kernel_calls, clean_patch_state):
    module, x, kpm = _module_case(kind, batch_first, seed)
    params = [p for p in module.parameters()]
    for training in (True, False):
        module.train(training)
        xg = x.clone().requires_grad_(True)
        ref = _run_module(kind, module, xg, kpm, causal)
        g = torch.randn_like(ref)
        ref_grads = grads_of(ref, [xg] + params, g)
        before = len(kernel_calls)
        with attnkern.patch():
            out = _run_module(kind, module, xg, kpm, causal)
            grads = grads_of(out, [xg] + params, g)
        assert len(kernel_calls) == before + 1, "attnkern did not serve the module's attention"
        assert_close(out, ref, F32, f"out (training={training})")
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            assert_close(a, b, F32, f"grad {i} (training={training})")


@pytest.mark.parametrize("kind,fast_fn", [("mha", "_native_multi_head_attention"),
                                          ("encoder_layer", "_transformer_encoder_layer_fwd")])
def test_patch_disables_cpp_fast_paths(kind, fast_fn, seed, monkeypatch, kernel_calls, clean_patch_state):
    module, x, kpm = _module_case(kind, True, seed)
    module.eval()
    fast_calls = _counting(monkeypatch, fast_fn)
    with torch.no_grad():
        ref = _run_module(kind, module, x, kpm, False)
        assert fast_calls == [1], f"unpatched eval should take torch's C++ fast path ({fast_fn})"
        with attnkern.patch():
            out = _run_module(kind, module, x, kpm, False)
    assert fast_calls == [1], "the fast path bypasses F.sdpa and must be off while patched"
    assert len(kernel_calls) == 1
    # rows of padded positions differ in torch's fast path (it zeroes them); compare real tokens
    keep = ~kpm
    assert_close(out[keep], ref[keep], F32, "eval output")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_patch_transformer_encoder_nested_fast_path(seed, monkeypatch, kernel_calls, clean_patch_state):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True).eval()
    x = torch.randn(3, 20, 32)
    kpm = torch.zeros(3, 20, dtype=torch.bool)
    kpm[1, 12:] = True
    with torch.no_grad():
        ref = encoder(x, src_key_padding_mask=kpm)
        with attnkern.patch():
            out = encoder(x, src_key_padding_mask=kpm)
    assert len(kernel_calls) == 2
    assert_close(out[~kpm], ref[~kpm], F32, "encoder output")


def test_patch_under_torch_compile(seed, clean_patch_state):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True) * 2 + sdpa_bound_before_patching(q, k, v)

    q, k, v = (torch.randn(2, 2, 24, 16) for _ in range(3))
    ref = f(q, k, v)
    graphs = []

    def capture(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    torch._dynamo.reset()
    with attnkern.patch():
        out = torch.compile(f, fullgraph=True, backend=capture)(q, k, v)
    torch._dynamo.reset()
    assert len(graphs) == 1
    assert graphs[0].count("attnkern.fwd.default") == 2, graphs[0]
    assert not any("scaled_dot_product" in name for name in graphs[0]), graphs[0]
    assert_close(out, ref, F32, "compiled")


# =======================================================================================
# attnkern.nn.MultiheadAttention


MHA_CONFIGS = {
    "plain": dict(),
    "batch_first": dict(batch_first=True),
    "kdim-vdim": dict(kdim=24, vdim=40),
    "no-bias": dict(bias=False),
    "bias_kv": dict(add_bias_kv=True),
    "zero_attn": dict(add_zero_attn=True),
    "bias_kv+zero_attn+kdim": dict(add_bias_kv=True, add_zero_attn=True, kdim=24, vdim=24, batch_first=True),
}


def _mha_pair(config, seed):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(32, 4, **config)
    if config.get("add_bias_kv"):  # torch initialises them with xavier_normal_; make them clearly nonzero
        torch.nn.init.normal_(ref.bias_k)
        torch.nn.init.normal_(ref.bias_v)
    ours = attnkern.nn.MultiheadAttention(32, 4, **config)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _mha_inputs(config, batch=3, len_q=17, len_k=23, self_attention=False, unbatched=False):
    kdim, vdim = config.get("kdim", 32), config.get("vdim", 32)
    shape = (lambda n, d: (n, d)) if unbatched else \
        (lambda n, d: (batch, n, d)) if config.get("batch_first") else (lambda n, d: (n, batch, d))
    if self_attention:
        x = torch.randn(*shape(len_q, 32))
        return x, x, x
    return torch.randn(*shape(len_q, 32)), torch.randn(*shape(len_k, kdim)), torch.randn(*shape(len_k, vdim))


@pytest.mark.parametrize("config", list(MHA_CONFIGS))
def test_mha_state_dict_round_trip(config, seed):
    cfg = MHA_CONFIGS[config]
    ref, ours = _mha_pair(cfg, seed)
    assert list(ours.state_dict()) == list(ref.state_dict())
    back = torch.nn.MultiheadAttention(32, 4, **cfg)
    back.load_state_dict(ours.state_dict())
    for (name, a), (_, b) in zip(ref.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), name
    q, k, v = _mha_inputs(cfg)
    assert_close(ours(q, k, v, need_weights=False)[0], back(q, k, v, need_weights=False)[0], F32, "round trip")


MASKS = ["none", "kpm-bool", "kpm-float", "attn-2d-bool", "attn-3d-float", "both-bool", "bool+float"]


def _mha_masks(kind, batch, len_q, len_k, heads=4):
    kpm = attn = None
    if kind in ("kpm-bool", "both-bool", "bool+float"):
        kpm = torch.rand(batch, len_k) < 0.3
        kpm[:, 0] = False  # every query keeps a key: torch gives NaN for fully masked rows
    if kind == "kpm-float":
        kpm = torch.randn(batch, len_k)
    if kind in ("attn-2d-bool", "both-bool"):
        attn = torch.rand(len_q, len_k) < 0.3
        attn[:, 1] = False
    if kind == "attn-3d-float" or kind == "bool+float":
        attn = torch.randn(batch * heads, len_q, len_k)
    return kpm, attn


@pytest.mark.parametrize("config", list(MHA_CONFIGS))
@pytest.mark.parametrize("masks", MASKS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_matches_torch(config, masks, need_weights, seed, kernel_calls):
    cfg = MHA_CONFIGS[config]
    ref, ours = _mha_pair(cfg, seed)
    q, k, v = (t.requires_grad_(True) for t in _mha_inputs(cfg))
    kpm, attn = _mha_masks(masks, 3, 17, 23)
    if masks == "bool+float":
        attn = attn.to(torch.float32)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about mixing bool and float masks
        r_out, r_w = ref(q, k, v, **kwargs)
        o_out, o_w = ours(q, k, v, **kwargs)
    assert len(kernel_calls) == (0 if need_weights else 1)
    assert_close(o_out, r_out, F32, "out")
    if need_weights:
        assert_close(o_w, r_w, F32, "weights")
    else:
        assert o_w is None
    g = torch.randn_like(r_out)
    params = [dict(ours.named_parameters())[n] for n, _ in ref.named_parameters()]
    for i, (a, b) in enumerate(zip(grads_of(o_out, [q, k, v] + params, g),
                                   grads_of(r_out, [q, k, v] + list(ref.parameters()), g))):
        assert_close(a, b, F32, f"grad {i}")


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("unbatched", [False, True])
def test_mha_self_attention_weights_and_unbatched(average, unbatched, seed):
    ref, ours = _mha_pair({}, seed)
    x, _, _ = _mha_inputs({}, self_attention=True, unbatched=unbatched)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(17)
    r_out, r_w = ref(x, x, x, attn_mask=mask, average_attn_weights=average, is_causal=True)
    o_out, o_w = ours(x, x, x, attn_mask=mask, average_attn_weights=average, is_causal=True)
    assert o_w.shape == r_w.shape
    assert_close(o_out, r_out, F32, "out")
    assert_close(o_w, r_w, F32, "weights")


@pytest.mark.parametrize("config", ["bias_kv", "zero_attn", "bias_kv+zero_attn+kdim"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_appended_keys_stay_visible_under_is_causal(config, need_weights, seed):
    """add_bias_kv / add_zero_attn with is_causal: the causal band covers the source keys and every
    query attends the appended ones, as torch's masked path computes it (the causal mask padded
    with visible columns; attnkern's band over all S + 1 keys hid them before)."""
    cfg = MHA_CONFIGS[config]
    ref, ours = _mha_pair(cfg, seed)
    q, _, _ = _mha_inputs(cfg, self_attention=True)
    if cfg.get("kdim"):  # self-attention needs key/value of the query's width: the cross path
        q, k, v = _mha_inputs(cfg, len_k=17)
    else:
        k = v = q
    causal = torch.nn.Transformer.generate_square_subsequent_mask(17).isinf()
    kpm = torch.zeros(3, 17, dtype=torch.bool)  # (makes torch take its masked path)
    r_out, _ = ref(q, k, v, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    o_out, _ = ours(q, k, v, attn_mask=causal, key_padding_mask=kpm, is_causal=True, need_weights=need_weights)
    assert_close(o_out, r_out, F32, "out")
    o_hint, _ = ours(q, k, v, attn_mask=causal, is_causal=True, need_weights=need_weights)  # no padding mask
    assert_close(o_hint, r_out, F32, "out without key_padding_mask")


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_window_and_causal_without_mask(need_weights, seed):
    ref, _ = _mha_pair({"batch_first": True}, seed)
    ours = attnkern.nn.MultiheadAttention(32, 4, batch_first=True, window_size=(5, 2))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 30, 32)
    # torch's MultiheadAttention with the band as an explicit mask is the oracle (True = masked out)
    windowed = ref(x, x, x, attn_mask=~band_mask(30, 30, 5, 2, 0), need_weights=False)[0]
    assert_close(ours(x, x, x, need_weights=need_weights)[0], windowed, F32, "window")
    causal = ref(x, x, x, attn_mask=~band_mask(30, 30, 5, 0, 0), need_weights=False)[0]
    assert_close(ours(x, x, x, need_weights=need_weights, is_causal=True)[0], causal, F32, "window + is_causal")


def test_mha_dropout_is_active_in_training(seed):
    ours = attnkern.nn.MultiheadAttention(32, 4, dropout=0.5, batch_first=True)
    x = torch.randn(2, 30, 32)
    ours.eval()
    a, b = ours(x, x, x, need_weights=False)[0], ours(x, x, x, need_weights=False)[0]
    assert torch.equal(a, b)
    ours.train()
    assert not torch.equal(ours(x, x, x, need_weights=False)[0], a)


def test_mha_inside_transformer_encoder_layer_eval(seed, monkeypatch, kernel_calls):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    oracle = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    oracle.load_state_dict(layer.state_dict())
    windowed = attnkern.nn.MultiheadAttention(32, 4, batch_first=True, window_size=(3, 3))
    windowed.load_state_dict(layer.self_attn.state_dict())
    layer.self_attn = windowed
    layer.eval(), oracle.eval()
    fast_calls = _counting(monkeypatch, "_transformer_encoder_layer_fwd")
    x = torch.randn(2, 25, 32)
    with torch.no_grad():
        out = layer(x)
        # oracle: torch's layer with the band as src_mask, run through its slow path
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            ref = oracle(x, src_mask=~band_mask(25, 25, 3, 3, 0))
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    assert fast_calls == [], "the encoder fast path would skip attnkern and the window"
    assert len(kernel_calls) == 1
    assert_close(out, ref, F32, "encoder layer with a windowed attnkern MultiheadAttention")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_mha_errors():
    m = attnkern.nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 10, 32)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(9, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(10, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="window_size"):
        attnkern.nn.MultiheadAttention(32, 4, window_size=(1, -3))
    with pytest.raises(ValueError, match="backend"):
        attnkern.nn.MultiheadAttention(32, 4, backend="fast")
    nested = torch.nested.nested_tensor([torch.randn(3, 32), torch.randn(5, 32)])
    with pytest.raises(NotImplementedError, match="nested"):
        m(nested, nested, nested)


# =======================================================================================
# LocalSelfAttention, AdditiveAttention, LuongAttention against explicit float64 formulas


def _softmax_rows(scores, allowed):
    """float64 oracle: softmax over allowed entries, zero rows where nothing is allowed."""
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.nan_to_num(probs, nan=0.0)


@pytest.mark.parametrize("window,causal", [(4, False), ((6, 0), False), (3, True), ((0, 5), False)])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_local_self_attention_matches_formula(window, causal, kv_heads, seed, kernel_calls):
    m = attnkern.nn.LocalSelfAttention(32, 4, window, causal=causal, num_kv_heads=kv_heads)
    x = torch.randn(2, 40, 32, requires_grad=True)
    kpm = torch.zeros(2, 40, dtype=torch.bool)
    kpm[1, 30:] = True
    out = m(x, key_padding_mask=kpm)
    assert len(kernel_calls) == 1
    left, right = (window, window) if isinstance(window, int) else window
    right = 0 if causal else right
    m64 = m.double()
    qkv = m64.qkv_proj(x.detach().double())
    q, k, v = qkv.split([32, 8 * kv_heads, 8 * kv_heads], dim=-1)
    q, k, v = (t.unflatten(-1, (-1, 8)).transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(4 // kv_heads, dim=1), v.repeat_interleave(4 // kv_heads, dim=1)
    allowed = band_mask(40, 40, left, right, 0) & ~kpm[:, None, None, :]
    probs = _softmax_rows(q @ k.transpose(-1, -2) / math.sqrt(8), allowed)
    ref = m64.out_proj((probs @ v).transpose(1, 2).reshape(2, 40, 32))
    assert_close(out, ref, F32, "local self-attention")


def test_additive_attention_matches_formula(seed):
    m = attnkern.nn.AdditiveAttention(24, 20, 16)
    query, keys, values = torch.randn(3, 5, 24), torch.randn(3, 11, 20), torch.randn(3, 11, 12)
    kpm = torch.zeros(3, 11, dtype=torch.bool)
    kpm[2, 6:] = True
    ctx, w = m(query, keys, values, key_padding_mask=kpm, need_weights=True)
    W, U, bU, vv = (t.detach().double() for t in (m.query_proj.weight, m.key_proj.weight, m.key_proj.bias,
                                                  m.score_proj.weight))
    q64, k64, v64 = query.double(), keys.double(), values.double()
    scores = torch.einsum("h,nlsh->nls", vv[0], torch.tanh((q64 @ W.T)[:, :, None] + (k64 @ U.T + bU)[:, None]))
    probs = _softmax_rows(scores, ~kpm[:, None, :].expand(3, 5, 11))
    assert_close(w, probs, F32, "weights")
    assert_close(ctx, probs @ v64, F32, "context")
    single, _ = m(query[:, 0], keys, values, key_padding_mask=kpm)
    assert_close(single, (probs @ v64)[:, 0], F32, "single step")


def _luong_oracle(m, query, keys, values, kpm, query_offset):
    q, k = query.double(), keys.double()
    n, len_q, len_k = q.shape[0], q.shape[1], k.shape[1]
    if m.score == "dot":
        scores = q @ k.transpose(1, 2)
    elif m.score == "general":
        scores = q @ (k @ m.key_proj.weight.detach().double().T).transpose(1, 2)
    else:
        wq, wk, va = (t.detach().double() for t in (m.query_proj.weight, m.key_proj.weight, m.score_proj.weight))
        scores = torch.einsum("h,nlsh->nls", va[0], torch.tanh((q @ wq.T)[:, :, None] + (k @ wk.T)[:, None]))
    allowed = ~kpm[:, None, :].expand(n, len_q, len_k)
    s = torch.arange(len_k, dtype=torch.float64)
    gaussian = None
    if m.mode == "local-m":
        t = torch.arange(len_q, dtype=torch.float64)[:, None] + query_offset
        allowed = allowed & ((s - t).abs() <= m.window)
    elif m.mode == "local-p":
        wp, vp = m.position_proj.weight.detach().double(), m.position_score.weight.detach().double()
        lengths = (~kpm).sum(-1).double()[:, None]
        centre = lengths * torch.sigmoid(torch.tanh(q @ wp.T) @ vp[0])  # (N, L)
        dist = s - centre[..., None]
        allowed = allowed & (dist.abs() <= m.window)
        gaussian = torch.exp(-dist ** 2 / (2 * (m.window / 2) ** 2))
    probs = _softmax_rows(scores, allowed)
    if gaussian is not None:
        probs = probs * gaussian
    return probs @ values.double(), probs


LUONG = [("dot", "global", None), ("general", "global", None), ("concat", "global", None),
         ("dot", "local-m", 2), ("general", "local-m", 3), ("concat", "local-m", 2),
         ("dot", "local-p", 2), ("general", "local-p", 3), ("concat", "local-p", 4)]


@pytest.mark.parametrize("score,mode,window", LUONG, ids=lambda x: str(x))
@pytest.mark.parametrize("query_offset", [0, 5])
def test_luong_attention_matches_formula(score, mode, window, query_offset, seed, kernel_calls):
    m = attnkern.nn.LuongAttention(16, 16, score=score, mode=mode, window=window, hidden_dim=12)
    query, keys, values = torch.randn(3, 6, 16), torch.randn(3, 14, 16), torch.randn(3, 14, 10)
    kpm = torch.zeros(3, 14, dtype=torch.bool)
    kpm[1, 9:] = True
    ref_ctx, ref_w = _luong_oracle(m, query, keys, values, kpm, query_offset)
    ctx, none = m(query, keys, values, key_padding_mask=kpm, query_offset=query_offset)
    assert none is None
    assert len(kernel_calls) == (1 if m.uses_kernels else 0)
    assert_close(ctx, ref_ctx, F32, "context")
    ctx_w, w = m(query, keys, values, key_padding_mask=kpm, need_weights=True, query_offset=query_offset)
    assert_close(ctx_w, ref_ctx, F32, "context (explicit path)")
    assert_close(w, ref_w, F32, "weights")


def test_seq2seq_argument_errors():
    with pytest.raises(ValueError, match="score"):
        attnkern.nn.LuongAttention(8, score="cosine")
    with pytest.raises(ValueError, match="window"):
        attnkern.nn.LuongAttention(8, mode="local-p", window=0)
    with pytest.raises(ValueError, match="key_dim"):
        attnkern.nn.LuongAttention(8, 6, score="dot")
    m = attnkern.nn.AdditiveAttention(8)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(torch.randn(2, 8), torch.randn(2, 5, 8), key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="query_offset"):
        attnkern.nn.LuongAttention(8)(torch.randn(2, 8), torch.randn(2, 5, 8), query_offset=-1)


# The classic attentions learn: copy / reverse with an RNN encoder-decoder. The decoder
# starts from a zero state, so the attention context is its only view of the source.
# Fixed seeds (torch.manual_seed(0), data generator seed 1): this is the one test here
# that trains, and a fixed run keeps its time and outcome stable.

VOCAB, LENGTH, EMBED, HIDDEN, BOS = 20, 12, 32, 64, 1


class _Seq2Seq(torch.nn.Module):
    def __init__(self, kind, attention_on=True, **luong):
        super().__init__()
        self.kind, self.attention_on = kind, attention_on
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.position = torch.nn.Embedding(LENGTH, EMBED)
        self.encoder = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        if kind == "bahdanau":
            self.attention = attnkern.nn.AdditiveAttention(HIDDEN)
            self.decoder = torch.nn.GRUCell(EMBED + HIDDEN, HIDDEN)
        else:
            self.attention = attnkern.nn.LuongAttention(HIDDEN, **luong)
            self.decoder = torch.nn.GRU(EMBED, HIDDEN, batch_first=True)
        self.combine = torch.nn.Linear(2 * HIDDEN, HIDDEN)  # Luong's W_c / Bahdanau's output layer
        self.out = torch.nn.Linear(HIDDEN, VOCAB)

    def _inputs(self, tokens, start):
        return self.embed(tokens) + self.position(torch.arange(start, start + tokens.shape[-1]))

    def _attend(self, state, keys, step):
        if not self.attention_on:
            return torch.zeros_like(state)
        if self.kind == "bahdanau":
            return self.attention(state, keys)[0]
        return self.attention(state, keys, query_offset=step)[0]

    def _logits(self, context, state):
        return self.out(torch.tanh(self.combine(torch.cat([context, state], -1))))

    def forward(self, src, tgt_in):  # teacher forcing
        keys, _ = self.encoder(self._inputs(src, 0))
        x = self._inputs(tgt_in, 0)
        state = keys.new_zeros(src.shape[0], HIDDEN)
        if self.kind == "bahdanau":  # the previous state queries, the context feeds the next input
            logits = []
            for t in range(tgt_in.shape[1]):
                context = self._attend(state, keys, t)
                state = self.decoder(torch.cat([x[:, t], context], -1), state)
                logits.append(self._logits(context, state))
            return torch.stack(logits, 1)
        states, _ = self.decoder(x, state.unsqueeze(0))
        return self._logits(self._attend(states, keys, 0), states)

    @torch.no_grad()
    def greedy(self, src):
        keys, _ = self.encoder(self._inputs(src, 0))
        token = torch.full((src.shape[0], 1), BOS)
        state = keys.new_zeros(src.shape[0], HIDDEN)
        hidden = state.unsqueeze(0)
        out = []
        for t in range(LENGTH):
            x = self._inputs(token, t)[:, 0]
            if self.kind == "bahdanau":
                context = self._attend(state, keys, t)
                state = self.decoder(torch.cat([x, context], -1), state)
            else:
                state, hidden = self.decoder(x.unsqueeze(1), hidden)
                state = state[:, 0]
                context = self._attend(state, keys, t)
            token = self._logits(context, state).argmax(-1, keepdim=True)
            out.append(token)
        return torch.cat(out, 1)


def _train_seq2seq(model, task, steps=300):
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def batch(n):
        src = torch.randint(2, VOCAB, (n, LENGTH), generator=data)
        return src, (src.flip(1) if task == "reverse" else src)

    for _ in range(steps):
        src, tgt = batch(64)
        tgt_in = torch.cat([torch.full((64, 1), BOS), tgt[:, :-1]], 1)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    src, tgt = batch(1000)
    return (model.greedy(src) == tgt).double().mean().item()


SEQ2SEQ = [
    ("luong", "reverse", dict(score="general", mode="global")),
    ("luong", "copy", dict(score="dot", mode="local-m", window=1)),
    ("luong", "reverse", dict(score="concat", mode="local-p", window=4)),
    ("bahdanau", "reverse", dict()),
]


def test_seq2seq_attention_learns(kernel_calls):
    start = time.perf_counter()
    accuracies = {}
    threads = torch.get_num_threads()
    # ops this small only lose to thread hand-offs; on a busy 2-core machine by a factor of ~10
    torch.set_num_threads(1)
    try:
        for kind, task, luong in SEQ2SEQ:
            torch.manual_seed(0)
            accuracies[(kind, task, tuple(luong.items()))] = _train_seq2seq(_Seq2Seq(kind, **luong), task)
        torch.manual_seed(0)
        control = _train_seq2seq(_Seq2Seq("luong", attention_on=False, score="general"), "reverse")
    finally:
        torch.set_num_threads(threads)
    elapsed = time.perf_counter() - start
    print(f"seq2seq greedy token accuracy: {accuracies}; without attention {control:.3f}; {elapsed:.1f} s")
    assert kernel_calls, "the dot/general Luong models should have run on attnkern's kernels"
    for name, acc in accuracies.items():
        assert acc >= 0.99, f"{name}: greedy token accuracy {acc:.4f} < 0.99"
    assert control < 0.2, f"without attention the task should be unlearnable, got {control:.3f}"


# Hard attention learns the same kind of tasks: one source position per output token. The
# model and training loop are examples/hard_attention_seq2seq.py (seeded, 200 steps each).


def _hard_seq2seq_example():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "hard_attention_seq2seq.py")
    spec = importlib.util.spec_from_file_location("hard_attention_seq2seq", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_hard_attention_seq2seq_learns():
    example = _hard_seq2seq_example()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        accuracies = {(mode, task): example.train(mode, task) for mode in ("gumbel", "sample")
                      for task in example.TASKS}
        control = example.train("gumbel", "reverse", attention_on=False)
    finally:
        torch.set_num_threads(threads)
    print(f"hard-attention seq2seq greedy token accuracy (eval: argmax): {accuracies}; "
          f"without attention {control:.3f}; {time.perf_counter() - start:.1f} s")
    for name, acc in accuracies.items():
        assert acc >= 0.99, f"{name}: greedy token accuracy {acc:.4f} < 0.99"
    assert control < 0.1, f"without attention the tasks should stay near chance (1/18), got {control:.3f}"


# =======================================================================================
# torch.compile(fullgraph=True) over a model using attnkern


class _CompiledBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = attnkern.nn.MultiheadAttention(32, 4, batch_first=True, window_size=(4, 0))
        self.local = attnkern.nn.LocalSelfAttention(32, 4, 3, num_kv_heads=2)
        self.luong = attnkern.nn.LuongAttention(32, score="general")
        self.norm = torch.nn.LayerNorm(32)

    def forward(self, x, kpm):
        x = x + self.mha(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        x = x + self.local(x, key_padding_mask=kpm)
        return self.norm(x + self.luong(x, x, key_padding_mask=kpm)[0])


def test_torch_compile_fullgraph(seed, kernel_calls):
    model = _CompiledBlock()
    x = torch.randn(2, 16, 32, requires_grad=True)
    kpm = torch.zeros(2, 16, dtype=torch.bool)
    kpm[1, 12:] = True
    params = list(model.parameters())
    ref = model(x, kpm)
    g = torch.randn_like(ref)
    ref_grads = grads_of(ref, [x] + params, g)
    assert len(kernel_calls) == 3
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x, kpm)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # inductor
    out = compiled(x, kpm)
    grads = grads_of(out, [x] + params, g)
    torch._dynamo.reset()
    assert_close(out, ref, F32, "compiled forward")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        assert_close(a, b, F32, f"compiled grad {i}")


# =======================================================================================
# Hugging Face transformers (skipped when it is not installed; no network: random init)


@pytest.fixture
def hf(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from attnkern.integrations import hf as hf_module

    hf_module.register()
    calls = []
    real = hf_module.attend

    def spy(query, key, value, mask=None, **kwargs):
        calls.append(dict(q=tuple(query.shape), k=tuple(key.shape), mask=None if mask is None else tuple(mask.shape),
                          window=kwargs.get("window_size"), bottom_right=kwargs.get("bottom_right")))
        return real(query, key, value, mask, **kwargs)

    monkeypatch.setattr(hf_module, "attend", spy)
    return transformers, hf_module, calls


def _tiny(transformers, kind, **overrides):
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, initializer_range=0.1, attention_dropout=0.0)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**{**common, "sliding_window": 8, **overrides})
        return transformers.MistralForCausalLM(cfg).eval()
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**common, "use_sliding_window": True, "sliding_window": 8,
                                          "layer_types": ["sliding_attention", "full_attention"], **overrides})
        return transformers.Qwen2ForCausalLM(cfg).eval()
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**{**common, "head_dim": 16, "sliding_window": 8,
                                               "layer_types": ["sliding_attention", "full_attention"], **overrides})
        return transformers.Gemma3ForCausalLM(cfg).eval()
    if kind == "gemma2":
        cfg = transformers.Gemma2Config(**{**common, "head_dim": 16, "sliding_window": 8, **overrides})
        return transformers.Gemma2ForCausalLM(cfg).eval()
    if kind == "gpt_oss":
        cfg = transformers.GptOssConfig(**{**common, "head_dim": 16, "sliding_window": 8, "num_local_experts": 4,
                                           "num_experts_per_tok": 2,
                                           "layer_types": ["sliding_attention", "full_attention"], **overrides})
        model = transformers.GptOssForCausalLM(cfg).eval()
        with torch.no_grad():  # sinks of either sign and some weight, so that they matter
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
        return model
    raise ValueError(kind)


def _logits(model, impl, ids, mask=None, **kwargs):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask, **kwargs).logits


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_hf_mistral_gqa_sliding_window_parity_and_generation(hf, seed):
    transformers, _, calls = hf
    model = _tiny(transformers, "mistral")
    ids = torch.randint(0, 128, (3, 40))
    padding = torch.ones_like(ids)
    padding[1, :7] = 0  # left padding
    eager = _logits(model, "eager", ids, padding)
    calls.clear()
    ours = _logits(model, "attnkern", ids, padding)
    real = padding.bool()
    assert _rel(ours[real], eager[real]) <= 1e-4
    # the window is a band (7 keys back + itself), GQA keeps 2 kv heads, padding is a (B, 1, 1, S) mask
    assert [c["window"] for c in calls] == [(7, 0), (7, 0)]
    assert all(c["k"][1] == 2 and c["mask"] == (3, 1, 1, 40) for c in calls)
    # the window must matter here, or this test could not tell
    dense = transformers.MistralForCausalLM(transformers.MistralConfig(**{**model.config.to_dict(),
                                                                          "sliding_window": None})).eval()
    dense.load_state_dict(model.state_dict())
    assert _rel(_logits(dense, "eager", ids, padding)[real], eager[real]) > 1e-2

    for prompt, mask in ((ids[:1, :12], None), (ids[:, :12], padding[:, :12])):
        kwargs = dict(max_new_tokens=20, do_sample=False, attention_mask=mask, pad_token_id=0)
        model.set_attn_implementation("eager")
        expected = model.generate(prompt, **kwargs)
        model.set_attn_implementation("attnkern")
        calls.clear()
        got = model.generate(prompt, **kwargs)
        assert torch.equal(got, expected)
        # decoding: one query against the sliding cache (at most 7 cached keys + the new one), bottom-right
        decode = [c for c in calls if c["q"][2] == 1]
        assert decode and all(c["window"] == (7, 0) and c["bottom_right"] and c["k"][2] <= 8 for c in decode)


def _assert_training_step_matches_eager(model, ids):
    """One training step's loss and every parameter gradient equal eager's; returns the names of
    the parameters that received a gradient."""
    model.train()
    grads = {}
    for impl in ("eager", "attnkern"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        grads[impl] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert abs(grads["eager"][0] - grads["attnkern"][0]) <= 1e-5 * abs(grads["eager"][0])
    assert grads["attnkern"][1].keys() == grads["eager"][1].keys()
    for name, g in grads["attnkern"][1].items():
        assert_close(g, grads["eager"][1][name], F32, f"gradient of {name}")
    return set(grads["attnkern"][1])


def test_hf_training_step_gradients(hf, seed):
    transformers, _, _ = hf
    model = _tiny(transformers, "mistral")
    _assert_training_step_matches_eager(model, torch.randint(0, 128, (2, 30)))


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_hf_per_layer_sliding_windows(hf, kind, seed):
    transformers, _, calls = hf
    model = _tiny(transformers, kind)
    ids = torch.randint(0, 128, (2, 30))
    padding = torch.ones_like(ids)
    padding[0, :4] = 0
    eager = _logits(model, "eager", ids, padding)
    calls.clear()
    ours = _logits(model, "attnkern", ids, padding)
    assert [c["window"] for c in calls] == [(7, 0), (-1, 0)]  # layer 0 sliding, layer 1 full
    real = padding.bool()
    assert _rel(ours[real], eager[real]) <= 1e-4
    kwargs = dict(max_new_tokens=20, do_sample=False)
    model.set_attn_implementation("eager")
    expected = model.generate(ids[:1, :10], **kwargs)
    model.set_attn_implementation("attnkern")
    assert torch.equal(model.generate(ids[:1, :10], **kwargs), expected)


def test_hf_from_pretrained_and_static_cache(hf, tmp_path, seed):
    transformers, _, calls = hf
    _tiny(transformers, "mistral").save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="attnkern").eval()
    assert model.config._attn_implementation == "attnkern"
    ids = torch.randint(0, 128, (1, 12))
    kwargs = dict(max_new_tokens=20, do_sample=False, cache_implementation="static")
    got = model.generate(ids, **kwargs)
    assert calls, "attnkern was not used"
    model.set_attn_implementation("eager")
    assert torch.equal(got, model.generate(ids, **kwargs))


def test_hf_packed_sequences_run_without_a_dense_mask(hf, monkeypatch, seed):
    transformers, hf_module, calls = hf
    from attnkern import ops_varlen

    packed_calls = []
    real = ops_varlen.varlen_fwd
    monkeypatch.setattr(ops_varlen, "varlen_fwd", lambda *a: packed_calls.append(a[3].tolist()) or real(*a))
    model = _tiny(transformers, "mistral")
    ids = torch.randint(0, 128, (1, 30))
    positions = torch.cat([torch.arange(12), torch.arange(18)]).unsqueeze(0)  # two documents in one row
    # HF detects packing from position_ids only without a cache
    eager = _logits(model, "eager", ids, position_ids=positions, use_cache=False)
    calls.clear()
    ours = _logits(model, "attnkern", ids, position_ids=positions, use_cache=False)
    assert not calls and packed_calls == [[0, 12, 30]] * 2, (calls, packed_calls)  # the varlen op, no dense mask
    assert _rel(ours, eager) <= 1e-4
    unpacked = _logits(model, "eager", ids, position_ids=torch.arange(30).unsqueeze(0), use_cache=False)
    assert _rel(unpacked, eager) > 1e-2  # the packing must matter, or this test could not tell


MODIFIER_MODELS = {  # kind -> config overrides: the score modifiers each model family uses (caps small
    # enough to bite on a random-init model's small scores)
    "gemma2": dict(attn_logit_softcapping=0.5, layer_types=["sliding_attention", "full_attention"]),
    "gemma3": dict(),  # Gemma 3's attention passes no softcap: alternating sliding/full layers only
    "gpt_oss": dict(),
}


def _no_fallback_warning(record):
    return not [w for w in record if "attnkern" in str(w.message)]


@pytest.mark.parametrize("kind", list(MODIFIER_MODELS))
def test_hf_softcap_sinks_models_run_attnkern(hf, kind, seed, kernel_calls):
    """Gemma 2 (softcap), Gemma 3 and gpt-oss (sinks), alternating sliding and
    full layers: logits, generated tokens and one training step's gradients (sinks included)
    equal eager's, with attnkern's op running and no fallback warning."""
    transformers, _, calls = hf
    model = _tiny(transformers, kind, **MODIFIER_MODELS[kind])
    ids = torch.randint(0, 128, (2, 24))
    eager = _logits(model, "eager", ids)
    calls.clear()
    kernel_calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ours = _logits(model, "attnkern", ids)
    assert _no_fallback_warning(record)
    assert [c["window"] for c in calls] == [(7, 0), (-1, 0)], calls  # layer 0 sliding, layer 1 full
    assert len(kernel_calls) == 2, "attnkern's op did not run every layer"
    assert _rel(ours, eager) <= 1e-5
    # the modifier must matter, or this test could not tell
    without = None
    if kind == "gpt_oss":
        saved = [layer.self_attn.sinks.detach().clone() for layer in model.model.layers]
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.fill_(float("-inf"))
        without = _logits(model, "attnkern", ids)
        with torch.no_grad():
            for layer, value in zip(model.model.layers, saved):
                layer.self_attn.sinks.copy_(value)
    elif "attn_logit_softcapping" in MODIFIER_MODELS[kind]:
        model.config.attn_logit_softcapping = None
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
        without = _logits(model, "eager", ids)
        cap = MODIFIER_MODELS[kind]["attn_logit_softcapping"]
        model.config.attn_logit_softcapping = cap
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = cap
    assert without is None or _rel(without, eager) > 1e-3

    kwargs = dict(max_new_tokens=12, do_sample=False)
    model.set_attn_implementation("eager")
    expected = model.generate(ids[:1, :10], **kwargs)
    model.set_attn_implementation("attnkern")
    kernel_calls.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        got = model.generate(ids[:1, :10], **kwargs)
    assert _no_fallback_warning(record) and kernel_calls
    assert torch.equal(got, expected)

    with_grad = _assert_training_step_matches_eager(model, ids)
    if kind == "gpt_oss":
        assert any(n.endswith("sinks") for n in with_grad), "the sinks got no gradient"


def test_hf_attention_function_passes_alibi_slopes(hf, seed, kernel_calls):
    """A model that hands ``alibi_slopes`` to the attention interface gets them applied (no HF
    model in 5.23.0 does; BLOOM/Falcon/MPT fold ALiBi into a dense mask, which runs as a float mask)."""
    _, hf_module, _ = hf
    attention = hf_module._make_attention_function("auto")
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    slopes = torch.rand(4) * 0.5
    out, _ = attention(module, q, k, v, None, scaling=0.25, alibi_slopes=slopes)
    assert len(kernel_calls) == 1
    ref = attnkern.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True, scale=0.25,
                                                enable_gqa=True, alibi_slopes=slopes, backend="math")
    assert_close(out.transpose(1, 2), ref, F32, "alibi through the HF attention function")


def test_hf_output_attentions_falls_back_to_eager(hf, seed):
    transformers, _, calls = hf
    model = _tiny(transformers, "gemma2", attn_logit_softcapping=20.0)
    ids = torch.randint(0, 128, (2, 20))
    eager = _logits(model, "eager", ids)
    calls.clear()
    with pytest.warns(UserWarning, match="output_attentions"):
        ours = _logits(model, "attnkern", ids, output_attentions=True)
    assert calls == []
    assert _rel(ours, eager) <= 1e-6


def test_hf_register_errors(hf):
    _, hf_module, _ = hf
    with pytest.raises(ValueError, match="backend"):
        hf_module.register(backend="quick")
    with pytest.raises(ValueError, match="name"):
        hf_module.register(name="")


@pytest.mark.skipif(_torch_version() < (2, 12), reason="torch 2.11's dynamo cannot trace transformers' mask "
                    "functions under fullgraph (a lazy-module import, then closure cells)")
def test_hf_model_compiles_fullgraph(hf, seed):
    transformers, _, _ = hf
    model = _tiny(transformers, "mistral")
    model.set_attn_implementation("attnkern")
    ids = torch.randint(0, 128, (2, 24))
    padding = torch.ones_like(ids)
    padding[1, :4] = 0
    graphs = []

    def capture(gm, inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm

    with torch.no_grad():
        ref = model(ids, attention_mask=padding, use_cache=False).logits
        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend=capture)(ids, attention_mask=padding, use_cache=False).logits
        torch._dynamo.reset()
    assert len(graphs) == 1 and graphs[0].count("attnkern.fwd.default") == 2
    assert_close(out, ref, F32, "compiled HF model")
