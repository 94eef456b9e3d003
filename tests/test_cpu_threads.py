"""The CPU kernels under the thread settings users have: work really forks over torch's
threads (seen through the kernels' thread trace, not through timing), one OpenMP runtime per
process, oversubscription, nesting inside an outer parallel region, DataLoader workers and
several Python threads at once. Results are checked against the float64 reference and, where
the arithmetic does not depend on the thread count, bit for bit against a one-thread run."""

from __future__ import annotations

import contextlib
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from attnkern import ops
from conftest import Case, assert_close, case_attention, make_inputs, reference_forward_backward

pytestmark = pytest.mark.skipif(ops._C is None, reason="C++ extension not built")
FORKS = not ops._C.cpu_parallel().startswith("none")


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def thread_trace():
    ops._C.set_thread_trace(True)
    try:
        yield
    finally:
        ops._C.set_thread_trace(False)


def forward_backward(case: Case, q, k, v, grad_out):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = case_attention(case, q, k, v, None, "cpu")
    return (out.detach(),) + torch.autograd.grad(out, (q, k, v), grad_out)


def check_against_reference(case: Case, q, k, v, grad_out, results, seed):
    ref_out, ref_grads = reference_forward_backward(case, q, k, v, None, grad_out, seed)
    for name, got, ref in zip(("out", "dq", "dk", "dv"), results, (ref_out,) + tuple(ref_grads)):
        assert_close(got, ref, q.dtype, name)


@pytest.mark.skipif(not FORKS, reason="built without OpenMP: the kernels are single-threaded by design")
@pytest.mark.parametrize("threads", [2, 8])  # 8 oversubscribes a 2-core machine
def test_every_pass_runs_on_several_threads(seed, threads):
    """With n threads and at least n work items, n distinct threads run items in every pass of
    the forward and of the backward (the kernels give each forked task a first item itself, so
    this holds on a loaded machine too). Fails on a build whose parallel_for does not fork."""
    case = Case(batch=2, heads_q=4, heads_kv=2, len_q=256, len_k=256, causal=True)
    q, k, v, _ = make_inputs(case, torch.float32, requires_grad=False)
    grad_out = torch.randn(case.batch, case.heads_q, case.len_q, case.head_dim)
    with torch_threads(threads), thread_trace():
        out = case_attention(case, q, k, v, None, "cpu")
        forward_passes = ops._C.thread_trace()
        results = forward_backward(case, q, k, v, grad_out)
        backward_passes = ops._C.thread_trace()
    assert forward_passes and backward_passes
    for items, ran in forward_passes + backward_passes:
        assert ran == min(threads, items), (forward_passes, backward_passes)
    assert max(items for items, _ in backward_passes) >= threads
    check_against_reference(case, q, k, v, grad_out, results, seed)
    with torch_threads(1):
        single = case_attention(case, q, k, v, None, "cpu")
    assert torch.equal(out, single)  # no key split here: the arithmetic is the same per row


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_one_openmp_runtime_in_the_process():
    """The extension uses the OpenMP runtime torch loaded, never a second copy (two runtimes
    would mean two thread pools and a set_num_threads that reaches only one of them)."""
    q = torch.randn(1, 2, 64, 32)
    ops.native_fwd(q, q, q, None, None, 0.125, -1, -1, False, 0.0)
    names = ("libgomp", "libiomp", "libomp")
    with open("/proc/self/maps") as maps:
        runtimes = {line.split()[-1] for line in maps if any(n in line.rsplit("/", 1)[-1] for n in names)}
    assert len(runtimes) <= 1, runtimes
    if FORKS and "OpenMP" in torch.__config__.parallel_info():
        assert len(runtimes) == 1


def test_decode_key_split_under_oversubscription(seed):
    """set_num_threads(8) on a small machine: the decode path splits the keys over the threads
    and merges the parts; the answer must not depend on that."""
    case = Case(batch=1, heads_q=8, heads_kv=2, len_q=1, len_k=3000)
    q, k, v, _ = make_inputs(case, torch.float32, requires_grad=False)
    grad_out = torch.randn(case.batch, case.heads_q, case.len_q, case.head_dim)
    with torch_threads(8):
        plan = ops._C.cpu_work_plan(1, 8, 2, 1, 3000, 64, -1, -1, 8)
        assert plan["forward_key_splits"] > 1  # the path under test
        results = forward_backward(case, q, k, v, grad_out)
    check_against_reference(case, q, k, v, grad_out, results, seed)


def test_nested_inside_an_outer_parallel_for(seed):
    """Called from inside an outer at::parallel_for, each call runs on its own thread (no
    nested fork, no deadlock) and gives exactly the top-level result."""
    case = Case(batch=1, heads_q=4, heads_kv=4, len_q=200, len_k=200)
    calls = 6
    q, k, v = (torch.randn(calls, case.batch, case.heads_q, case.len_q, case.head_dim) for _ in range(3))
    with torch_threads(2), thread_trace():
        nested = ops._C.forward_in_parallel_for(q, k, v, 0.125)
        inner_passes = ops._C.thread_trace()
    assert inner_passes and all(ran == 1 for _, ran in inner_passes), inner_passes
    for i in range(calls):
        top, _ = ops.native_fwd(q[i], k[i], v[i], None, None, 0.125, -1, -1, False, 0.0)
        assert torch.equal(nested[i], top)
    ref = case_attention(case, q[0].double(), k[0].double(), v[0].double(), None, "math")
    assert_close(nested[0], ref, torch.float32, "out")


class _AttentionDataset(torch.utils.data.Dataset):
    def __init__(self, qkv):
        self.qkv = qkv

    def __len__(self):
        return len(self.qkv)

    def __getitem__(self, i):
        q, k, v = self.qkv[i]
        return ops.native_fwd(q, k, v, None, None, 0.125, 64, 0, False, 0.0)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork start method")
def test_dataloader_workers_after_the_parent_forked_threads(seed):
    """DataLoader workers are forked after the parent has used its OpenMP pool; their calls
    must neither hang nor differ from the parent's (torch runs workers with one thread)."""
    qkv = [tuple(torch.randn(1, 2, 300, 64) for _ in range(3)) for _ in range(4)]
    with torch_threads(2):
        expected = [_AttentionDataset(qkv)[i] for i in range(len(qkv))]  # uses the parent's pool
    loader = torch.utils.data.DataLoader(_AttentionDataset(qkv), batch_size=None, num_workers=2,
                                         multiprocessing_context="fork", timeout=120)
    got = list(loader)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


def test_python_threads_at_once_are_bit_identical_to_serial(seed):
    """Four Python threads calling forward and backward at once give exactly the serial
    results (and the forward exactly the one-thread result)."""
    cases = [Case(batch=1, heads_q=4, heads_kv=2, len_q=192, len_k=192, causal=True),
             Case(batch=2, heads_q=2, heads_kv=2, len_q=100, len_k=300, window=(40, 8)),
             Case(batch=1, heads_q=8, heads_kv=2, len_q=1, len_k=2500)]
    problems = []
    for case in cases:
        q, k, v, _ = make_inputs(case, torch.float32, requires_grad=False)
        problems.append((case, q, k, v, torch.randn(case.batch, case.heads_q, case.len_q, case.head_dim)))
    with torch_threads(2):
        serial = [forward_backward(*p) for p in problems]
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda p: forward_backward(*p), problems * 3))
    for i, got in enumerate(concurrent):
        for a, b in zip(got, serial[i % len(problems)]):
            assert torch.equal(a, b)
    with torch_threads(1):
        for (case, q, k, v, _), ser in zip(problems[:2], serial[:2]):  # no key split: thread-independent
            assert torch.equal(case_attention(case, q, k, v, None, "cpu"), ser[0])
    check_against_reference(*problems[0], serial[0], seed)


@pytest.mark.parametrize("threads", [64, 128])
def test_work_items_for_a_many_core_server(threads):
    """Computed, since this machine has 2 cores: for B=1, H=8 prefill, its backward and GQA
    decoding, the split gives each of 64 or 128 threads about 4 forward items (the key range is
    split when the tiles are too few) and at least one backward item."""
    prefill = ops._C.cpu_work_plan(1, 8, 8, 2048, 2048, 64, -1, 0, threads)
    decode = ops._C.cpu_work_plan(1, 32, 8, 1, 8192, 128, -1, -1, threads)
    assert prefill["forward_items"] >= 4 * threads
    assert prefill["forward_key_splits"] == (1 if threads == 64 else 2)  # 8 heads x 32 tiles = 256 items
    assert prefill["backward_items"] >= threads
    assert decode["forward_items"] >= 4 * threads and decode["forward_key_splits"] > 1
    # the same problems on 2 threads are not split (the split costs a merge)
    assert ops._C.cpu_work_plan(1, 8, 8, 2048, 2048, 64, -1, 0, 2)["forward_key_splits"] == 1


def test_backward_splits_keys_only_when_kv_heads_do_not_share_out_evenly():
    """Key parts of the backward cost dq accumulators; the (batch, kv head) items carry equal
    work, so the plan splits keys only when the threads cannot share those items out evenly."""
    def items(b, hkv, threads, hq=8):
        return ops._C.cpu_work_plan(b, hq, hkv, 4096, 4096, 64, -1, 0, threads)["backward_items"]
    assert items(1, 4, 2) == 4 and items(2, 2, 4) == 4 and items(1, 8, 8) == 8
    assert items(1, 1, 2) > 2 and items(1, 3, 2, hq=6) > 3 and items(1, 8, 64) >= 64


def test_backward_accumulator_memory_is_bounded_in_the_thread_count():
    """The backward's dq accumulators (one per key chunk) must not grow with the thread count
    (issue: 1 GiB at 32 threads for B=1, Hq=8, Hkv=1, L=S=8192). Computed from the plan; the
    RSS is measured by benchmarks/cpu_threads.py."""
    one = 8 * 8192 * 64 * 4
    sizes = [ops._C.cpu_work_plan(1, 8, 1, 8192, 8192, 64, -1, -1, t)["backward_dq_accumulator_bytes"]
             for t in (1, 2, 8, 32, 128, 192)]
    assert sizes[0] == one  # one thread: one accumulator
    assert max(sizes) <= max(one, 128 << 20), sizes
    assert sizes[2] > one  # more threads still get key chunks of their own (up to the bound)


# Whole-row decoding items (csrc/cpu/tiling.h, forward_plan): a (B, S, H, D) cache whose rows
# are 4 KiB or more apart (Hkv = 16, D = 128) is read by items that cover every kv head of a
# batch row, key block by key block. Every feature the per-head decode tile serves must come
# out the same against the float64 reference.
WHOLE_ROW = dict(heads_kv=16, head_dim=128, layout="transposed")


def test_work_plan_reads_whole_rows_only_where_they_pay():
    """The plan's choice, computed: whole rows for interleaved heads 4 KiB apart and batch rows
    (times key splits) enough for every thread; an item per head otherwise."""
    def plan(b, hq, hkv, s, d, threads, interleaved=True, dtype="float32"):
        return ops._C.cpu_work_plan(b, hq, hkv, 1, s, d, -1, -1, threads, kv_heads_interleaved=interleaved,
                                    dtype=dtype)
    whole = plan(8, 16, 16, 4096, 128, 2)
    assert whole["forward_groups_per_item"] == 16 and whole["forward_items"] == 8
    one_batch = plan(1, 32, 16, 8192, 128, 2)  # 2 query heads per group, packed: 16 groups
    assert one_batch["forward_groups_per_item"] == 16 and one_batch["forward_items"] >= 2
    assert one_batch["forward_items"] == one_batch["forward_key_splits"] > 1
    assert plan(8, 16, 16, 4096, 128, 2, interleaved=False)["forward_groups_per_item"] == 1  # (B, H, S, D)
    assert plan(8, 8, 8, 4096, 64, 2)["forward_groups_per_item"] == 1  # fp32 rows 2 KiB apart
    assert plan(1, 16, 16, 300, 128, 2)["forward_groups_per_item"] == 1  # one item could not feed 2 threads
    assert ops._C.cpu_work_plan(8, 16, 16, 64, 4096, 128, -1, -1, 2, kv_heads_interleaved=True)[
        "forward_groups_per_item"] == 1  # 64 queries: not a decoding tile
    # the stride in bytes decides: 16 x 64 fp32 elements are 4 KiB apart, 16-bit ones 2 KiB
    assert plan(8, 16, 16, 4096, 64, 2)["forward_groups_per_item"] == 16
    for dtype in ("bfloat16", "float16"):
        assert plan(8, 16, 16, 4096, 64, 2, dtype=dtype)["forward_groups_per_item"] == 1, dtype
    with pytest.raises(ValueError, match="dtype"):
        plan(8, 16, 16, 4096, 64, 2, dtype="float64")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("case", [
    Case(batch=3, heads_q=16, len_q=1, len_k=1500, **WHOLE_ROW),
    Case(batch=2, heads_q=32, len_q=2, len_k=1100, causal=True, bottom_right=True, **WHOLE_ROW),
    Case(batch=2, heads_q=16, len_q=3, len_k=900, window=(200, 0), bottom_right=True, mask="float", **WHOLE_ROW),
    Case(batch=2, heads_q=16, len_q=3, len_k=1200, mask="bool-bcast", **WHOLE_ROW),  # (query 0: no key)
], ids=["mha", "gqa-causal", "window-float-mask", "padding-mask"])
@pytest.mark.parametrize("threads", [1, 2])  # 2: key splits too where the keys are >= 1024
def test_whole_row_decode_matches_the_reference(seed, dtype, case, threads):
    q, k, v, mask = make_inputs(case, dtype, requires_grad=False)
    with torch_threads(threads):
        out = case_attention(case, q, k, v, mask, "cpu")
    ref, _ = reference_forward_backward(case, q, k, v, mask, torch.randn_like(q, dtype=torch.float64), seed)
    assert_close(out, ref, dtype, f"out ({threads} threads)")


@pytest.mark.parametrize("modifier", ["softcap", "alibi", "sinks"])
def test_whole_row_decode_with_score_modifiers(seed, modifier):
    import attnkern
    B, S, hq, hkv, D = 2, 1300, 32, 16, 128
    q, k, v = (torch.randn(B, n, h, D) for n, h in ((1, hq), (S, hkv), (S, hkv)))
    kw = dict(softcap=dict(softcap=7.0), alibi=dict(alibi_slopes=torch.rand(B, hq)),
              sinks=dict(s_aux=torch.randn(hq)))[modifier]
    out = attnkern.flash_attn_func(q, k, v, causal=True, window_size=(600, 0), backend="cpu", **kw)
    ref = attnkern.flash_attn_func(q.double(), k.double(), v.double(), causal=True, window_size=(600, 0),
                                   backend="math", **kw)
    assert_close(out, ref, torch.float32, modifier)


def test_whole_row_decode_from_a_paged_cache(seed):
    """Pages (num_blocks, page, Hkv, D) of 16 keys in a shuffled order; each sequence's keys
    cross many pages. On 2 threads the two long sequences take whole-row items (split in two),
    the short one an item per head."""
    import attnkern
    B, page, hq, hkv, D, lens = 3, 16, 16, 16, 128, [2100, 1100, 64]
    blocks_per_seq = (max(lens) + page - 1) // page
    table = torch.randperm(B * blocks_per_seq).reshape(B, blocks_per_seq).to(torch.int32)
    k_cache, v_cache = (torch.randn(B * blocks_per_seq, page, hkv, D) for _ in range(2))
    q = torch.randn(B, 1, hq, D)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    with torch_threads(2):
        out = attnkern.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                               backend="cpu")
    ref = attnkern.flash_attn_with_kvcache(q.double(), k_cache.double(), v_cache.double(), cache_seqlens=seqlens,
                                           block_table=table, backend="math")
    assert_close(out, ref, torch.float32, "paged")
