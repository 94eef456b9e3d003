"""attnkern.distributed on CPU with gloo: parity, LSE gradient, communication volume, bad input, compile.

Spawning ranks is the cost, so each group size P runs ONE launch (torch.multiprocessing spawn,
one thread per rank, a file store in tmp) that does every check for that P and saves what it
found; the tests below assert on those records. A rank that hangs fails the launch at its
deadline instead of blocking the suite.

Parity: every rank builds the same global q, k, v, dO and dLSE from one seed; the sharded
results, unsharded, must match single-process attnkern (backend "auto" on the whole sequence)
and the float64 reference, for out, LSE, dq, dk, dv (the loss includes the LSE, so its
gradient is checked in every case).
"""

from __future__ import annotations

import faulthandler
import functools
import os
import tempfile
import time
import traceback
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkern.distributed as cp
from attnkern.distributed import cost_model
from attnkern import dispatch, reference
from attnkern._semantics import normalize_torch_layout
from conftest import TOLERANCE, rel_err

WORLDS = (1, 2, 3, 4)
LOCAL_LEN = 16  # tokens per rank: zigzag chunks of 8
HEAD_DIM = 8
BANDS = {  # name -> (causal, window_size), on global positions
    "full": (False, None),
    "causal": (True, None),
    "window_short": (True, (5, 0)),  # left extent < a chunk: halo
    "window_long": (True, (20, 0)),  # left extent > a shard: capped ring
    "two_sided": (False, (3, 6)),
    "two_sided_long": (False, (20, 9)),  # ring hops both ways
}
GQA = (1, 2, 4)
LAUNCH_DEADLINE_S = 300  # a hang guard; the whole file takes far less


# ---------------------------------------------------------------------------------------
# launching ranks


def _result_path(store_dir, rank):
    return os.path.join(store_dir, f"rank{rank}.pt")


def _entry(rank, world, store_dir, fn, seed):
    faulthandler.enable(all_threads=True)  # a rank killed by a signal prints its Python stacks
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        try:
            result = fn(rank, world, seed)
        except Exception:  # noqa: BLE001 - reported to the parent as data
            result = {"crash": traceback.format_exc()}
        path = _result_path(store_dir, rank)
        torch.save(result, path + ".part")
        os.replace(path + ".part", path)  # a result file exists only whole
        # No rank tears its connections down while a peer may still be talking to it; once
        # past this barrier, every rank's result is on disk (see launch).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def launch(fn, world, seed):
    """Run ``fn(rank, world, seed)`` on ``world`` gloo ranks; return each rank's result.

    A rank that dies before every rank saved its result fails the launch. One that dies after
    (in gloo's teardown: ``destroy_process_group`` or interpreter exit, past the final barrier)
    is reported as a warning: the results the tests check are complete by then. (CI once saw a
    world-4 rank abort with "terminate called without an active exception", where is not known;
    40 local launches under load did not repeat it. Ranks now print their stacks on a signal.)"""
    with tempfile.TemporaryDirectory() as store_dir:
        paths = [_result_path(store_dir, r) for r in range(world)]
        ctx = mp.start_processes(_entry, args=(world, store_dir, fn, seed), nprocs=world, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + LAUNCH_DEADLINE_S
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    for p in ctx.processes:
                        if p.is_alive():
                            p.kill()
                    pytest.fail(f"{world} ranks did not finish within {LAUNCH_DEADLINE_S} s (hang?)")
        except mp.ProcessExitedException as exc:
            if not all(os.path.exists(path) for path in paths):
                raise
            warnings.warn(f"rank {exc.error_index} died in teardown, after every rank saved its result: {exc}")
        results = [torch.load(path) for path in paths]
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return results


def _abort_on_rank_1(rank, world, seed):
    if rank == 1:
        os.abort()  # dies before saving, while rank 0 waits in the final barrier
    return {}


def test_launch_fails_when_a_rank_dies_before_saving():
    """The teardown allowance in launch must not hide a rank killed mid-work."""
    with pytest.raises(mp.ProcessExitedException, match="process 1 terminated with signal SIGABRT"):
        launch(_abort_on_rank_1, 2, 0)


@functools.lru_cache(maxsize=None)
def records(world):
    seed = int(os.environ.get("ATTNKERN_TEST_SEED", torch.randint(0, 2**31 - 1, ()).item()))
    return launch(_worker, world, seed), seed


# ---------------------------------------------------------------------------------------
# what each rank does


def _globals(seed, group, dtype, band_index):
    """The same global tensors on every rank (a generator seeded by the case)."""
    gen = torch.Generator().manual_seed(seed * 1000 + band_index * 10 + group)
    world = dist.get_world_size()
    heads = 4 * world
    length = LOCAL_LEN * world
    kv_shape = (1, heads // group, length, HEAD_DIM)
    shapes = [(1, heads, length, HEAD_DIM), kv_shape, kv_shape,
              (1, heads, length, HEAD_DIM), (1, heads, length)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _single_process(q, k, v, dout, dlse, causal, window, backend):
    """Whole-sequence attention and its gradients (LSE included in the loss)."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    q4, k4, v4, _, problem, _ = normalize_torch_layout(q, k, v, None, 0.0, causal, None, True, window)
    if backend == "math":  # the float64 oracle itself (dispatch's math backend rounds the LSE to fp32)
        out, lse = reference.attention(q4, k4, v4, None, problem.scale, problem.window_left, problem.window_right)
    else:
        out, lse = dispatch.run(problem, q4, k4, v4, None, backend)
    ((out * dout).sum() + (lse * dlse.to(lse.dtype)).sum()).backward()
    return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]


def _sharded(q, k, v, dout, dlse, causal, window, layout, strategy):
    """Shard, attend, backward, unshard: the five results as whole-sequence tensors."""
    shard = functools.partial(cp.shard_sequence, dim=2, layout=layout)
    ql, kl, vl = (shard(t).detach().requires_grad_(True) for t in (q, k, v))
    out, lse = cp.context_parallel_attention(ql, kl, vl, causal=causal, window_size=window, layout=layout,
                                             strategy=strategy, return_lse=True)
    ((out * shard(dout)).sum() + (lse * shard(dlse).to(lse.dtype)).sum()).backward()
    unshard = functools.partial(cp.unshard_sequence, dim=2, layout=layout)
    return [unshard(t.detach()) for t in (out, lse, ql.grad, kl.grad, vl.grad)]


def _strategies(world, band):
    causal, window = BANDS[band]
    left, right = (window or (-1, -1))[0], 0 if causal else (window or (-1, -1))[1]
    found = ["ring", "allgather", "ulysses"] + (["auto"] if world <= 2 else [])  # auto is halo or ring
    if left >= 0 and right >= 0 and max(left, right) <= LOCAL_LEN // 2:
        found.append("halo")
    return found


def _parity(rank, world, seed, dtype, groups, layouts=cp.LAYOUTS):
    found = []
    for band_index, (band, (causal, window)) in enumerate(BANDS.items()):
        for group in groups:
            q, k, v, dout, dlse = _globals(seed, group, dtype, band_index)
            if rank == 0:
                reference = _single_process(*(t.double() for t in (q, k, v, dout, dlse)), causal, window, "math")
                single = _single_process(q, k, v, dout, dlse, causal, window, "auto")
            for layout in layouts:
                for strategy in _strategies(world, band):
                    got = _sharded(q, k, v, dout, dlse, causal, window, layout, strategy)
                    if rank == 0:
                        errs = {
                            "reference": [rel_err(g, r) for g, r in zip(got, reference)],
                            "single": [rel_err(g, s) for g, s in zip(got, single)],
                        }
                        found.append(((band, group, layout, strategy, str(dtype)), errs))
    return found


VOLUME_CASES = (  # (strategy, causal, window)
    ("ring", True, None), ("ring", False, None), ("ring", True, (20, 0)), ("ring", False, (20, 9)),
    ("allgather", True, None), ("halo", True, (5, 0)), ("halo", False, (3, 6)), ("ulysses", True, None),
)


def _volume(rank, world):
    """Bytes each rank sends, forward and backward, per strategy (fp32, B=1, 2P heads and kv heads)."""
    found = {}
    length = LOCAL_LEN * world
    q, k, v, dout = (torch.randn(1, 2 * world, length, HEAD_DIM) for _ in range(4))
    for layout in cp.LAYOUTS:
        shard = functools.partial(cp.shard_sequence, dim=2, layout=layout)
        for strategy, causal, window in VOLUME_CASES:
            ql, kl, vl = (shard(t).requires_grad_(True) for t in (q, k, v))
            with cp.count_communication() as forward:
                out = cp.context_parallel_attention(ql, kl, vl, causal=causal, window_size=window, layout=layout,
                                                    strategy=strategy)
            with cp.count_communication() as backward:
                out.backward(shard(dout))
            found[(layout, strategy, causal, window)] = (list(forward), list(backward))
    return found


def _bad_input(rank, world):
    """Each case must raise on EVERY rank (a hang fails the launch's deadline)."""
    q = torch.randn(1, 2, LOCAL_LEN, HEAD_DIM)
    cases = {
        "odd local length, zigzag": lambda: cp.context_parallel_attention(q[:, :, :7], q[:, :, :7], q[:, :, :7]),
        "shard shapes differ across ranks": lambda: cp.context_parallel_attention(
            q[:, :, : LOCAL_LEN - 2 * rank], q[:, :, : LOCAL_LEN - 2 * rank], q[:, :, : LOCAL_LEN - 2 * rank]),
        "options differ across ranks": lambda: cp.context_parallel_attention(q, q, q, causal=rank == 0),
        "not a tensor on one rank": lambda: cp.context_parallel_attention(q if rank else "q", q, q),
        "halo with a window wider than a chunk": lambda: cp.context_parallel_attention(
            q, q, q, window_size=(LOCAL_LEN, 0), strategy="halo"),
        "ulysses with heads not divisible": lambda: cp.context_parallel_attention(
            q[:, :1], q[:, :1], q[:, :1], strategy="ulysses"),
        "sequence not divisible in shard_sequence": lambda: cp.shard_sequence(
            torch.randn(1, 2, 2 * world + 1, 4), dim=2),
        "unknown strategy": lambda: cp.context_parallel_attention(q, q, q, strategy="tree"),
        "dropout": lambda: cp.context_parallel_attention(q, q, q, dropout_p=0.1),
        "attn_mask": lambda: cp.context_parallel_attention(q, q, q, attn_mask=torch.ones(1, dtype=torch.bool)),
    }
    found = {}
    for name, call in cases.items():
        try:
            call()
            found[name] = None
        except Exception as exc:  # noqa: BLE001 - the test asserts type and message
            found[name] = (type(exc).__name__, str(exc))
    # the group still works afterwards; and unshard_sequence's gradient comes home summed over ranks
    part = torch.full((1, 2), float(rank), requires_grad=True)
    whole = cp.unshard_sequence(part, dim=1, layout="contiguous")
    (whole * torch.arange(2 * world)).sum().backward()
    found["after"] = whole.tolist()
    found["unshard_grad"] = part.grad.tolist()
    return found


def _compiled(rank, world, seed):
    """torch.compile(fullgraph=True, backend="aot_eager") matches eager, forward and backward:
    one graph holding a ring (causal), a halo (two-sided window) and an all-gather (window)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v, dout = (torch.randn(1, 4, LOCAL_LEN * world, HEAD_DIM, generator=gen) for _ in range(4))

    def step(ql, kl, vl):
        return [cp.context_parallel_attention(ql, kl, vl, causal=causal, window_size=window, strategy=strategy)
                for strategy, causal, window in (("ring", True, None), ("halo", False, (3, 6)),
                                                  ("allgather", True, (20, 0)))]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        ql, kl, vl = (cp.shard_sequence(t, dim=2).requires_grad_(True) for t in (q, k, v))
        outs = fn(ql, kl, vl)
        sum((out * cp.shard_sequence(dout, dim=2) * (i + 1)).sum() for i, out in enumerate(outs)).backward()
        results.append([out.detach() for out in outs] + [ql.grad, kl.grad, vl.grad])
    return [rel_err(c, e) for c, e in zip(results[1], results[0])]


def _hf(rank, world, seed):
    """A tiny Qwen2 (a full and a sliding-window layer) on zigzag shards through attn_implementation=
    "attnkern_cp": logits and a weight gradient equal the whole-sequence model's ("attnkern")."""
    try:
        import transformers
    except ImportError:
        return None
    from attnkern.distributed import hf as cp_hf
    from attnkern.integrations import hf

    cp_hf.register()
    hf.register()
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, use_sliding_window=True, sliding_window=6, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"])
    ids = torch.randint(0, 64, (2, LOCAL_LEN * world), generator=torch.Generator().manual_seed(seed))
    found = []
    for implementation in ("attnkern", "attnkern_cp"):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=implementation).float()
        if implementation == "attnkern":
            logits = model(input_ids=ids).logits
            logits.square().mean().backward()
            logits = cp.shard_sequence(logits, dim=1)
        else:
            positions = cp.sequence_positions(ids.shape[1]).expand(ids.shape[0], -1)
            with cp_hf.context_parallel():
                logits = model(input_ids=cp.shard_sequence(ids, dim=1), position_ids=positions).logits
            (logits.square().mean() / world).backward()  # the ranks' losses sum to the whole mean
        grad = model.model.layers[1].self_attn.k_proj.weight.grad.clone()
        if implementation == "attnkern_cp":
            dist.all_reduce(grad)  # each rank holds its share of the weight gradient
        found.append((logits.detach(), grad))
    return [rel_err(a, b) for a, b in zip(found[1], found[0])]


def _worker(rank, world, seed):
    result = {"parity": _parity(rank, world, seed, torch.float32, GQA)}
    if world == 2:  # float64 through the math backend: a tight check of the merge and block geometry
        result["parity"] += _parity(rank, world, seed, torch.float64, (2,), ("zigzag",))
    result["volume"] = _volume(rank, world)
    if world in (2, 3):
        result["bad_input"] = _bad_input(rank, world)
    if world == 2:
        result["compiled"] = _compiled(rank, world, seed)
        result["hf"] = _hf(rank, world, seed)
    return result


# ---------------------------------------------------------------------------------------
# the tests


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", WORLDS)
def test_parity(world):
    """Every strategy x layout x band x GQA, unsharded, equals single-process attnkern and float64."""
    (results, seed) = records(world)
    cases = results[0]["parity"]
    expected = sum(len(_strategies(world, b)) for b in BANDS) * len(GQA) * len(cp.LAYOUTS)
    assert len(cases) >= expected
    for key, errs in cases:
        dtype = torch.float64 if key[-1] == "torch.float64" else torch.float32
        for against, values in errs.items():
            if against == "single" and dtype == torch.float64:
                continue  # single-process float64 is the math backend, whose LSE is fp32
            for name, err in zip(("out", "lse", "dq", "dk", "dv"), values):
                assert err <= TOLERANCE[dtype], f"{key} {name} vs {against}: {err:.2e} (seed {seed})"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", WORLDS)
def test_communication_volume(world):
    """Ring: (P-1) K|V shards per rank forward; halo: W rows per rank per direction; P=1: nothing.
    And the communication model's bytes (busiest rank) equal the measured ones."""
    (results, _) = records(world)
    row = 2 * world * (2 * HEAD_DIM) * 4  # kv heads x (E + Ev) x fp32 bytes per token
    shard = LOCAL_LEN * row
    for key in results[0]["volume"]:
        layout, strategy, causal, window = key
        for rank, res in enumerate(results):
            forward, backward = res["volume"][key]
            if world == 1:
                assert forward == [] and backward == [], f"P=1 {key} sent {forward} {backward}"
                continue
            sent = cp.bytes_sent(forward)
            if strategy in ("ring", "allgather") and window is None:
                assert sent == (world - 1) * shard, (key, sent)
            elif strategy == "halo":
                left, right = window
                # rows of other ranks' chunks bordering this rank's chunks, each direction apart
                mine = [rank] if layout == "contiguous" else [rank, 2 * world - 1 - rank]
                n_chunks = world if layout == "contiguous" else 2 * world
                owner = (lambda c: c) if layout == "contiguous" else (lambda c: c if c < world else 2 * world - 1 - c)
                to_right = sum(1 for c in mine if c + 1 < n_chunks and owner(c + 1) != rank)
                to_left = sum(1 for c in mine if c > 0 and owner(c - 1) != rank)
                assert sent == (to_right * left + to_left * right) * row, (key, rank, sent)
                assert all(kind == "p2p" for kind, _ in forward + backward)
        left, right = window or (-1, -1)
        cfg = cost_model.Config(LOCAL_LEN * world, world, heads=2 * world, kv_heads=2 * world, head_dim=HEAD_DIM,
                                dtype_bytes=4,
                                window=(left, 0 if causal else right), layout=layout)
        model = cost_model.bytes_per_rank(strategy, cfg)
        for phase, index in (("forward", 0), ("backward", 1)):
            measured = max(cp.bytes_sent(res["volume"][key][index]) for res in results)
            assert measured == model[phase], (key, phase, measured, model[phase])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world", (2, 3))
def test_bad_input_raises_on_every_rank(world):
    (results, _) = records(world)
    for rank, res in enumerate(results):
        found = res["bad_input"]
        assert found.pop("after") == [[float(r) for r in range(world) for _ in range(2)]]
        assert found.pop("unshard_grad") == [[float(world * (2 * rank + i)) for i in range(2)]]
        for name, outcome in found.items():
            assert outcome is not None, f"rank {rank}: {name} did not raise"
            kind, message = outcome
            if name in ("dropout", "attn_mask"):
                assert kind == "NotImplementedError" and name.split()[0] in message, (name, outcome)
            else:
                assert kind == "ValueError", (rank, name, outcome)
        assert "divisible" in found["odd local length, zigzag"][1]
        assert "disagree" in found["shard shapes differ across ranks"][1]
        assert "disagree" in found["options differ across ranks"][1]
        assert "q must be a torch.Tensor" in found["not a tensor on one rank"][1]


@pytest.mark.timeout(400)
def test_compile_fullgraph_matches_eager():
    (results, _) = records(2)
    for rank, res in enumerate(results):
        assert max(res["compiled"]) <= TOLERANCE[torch.float32], (rank, res["compiled"])


@pytest.mark.timeout(400)
def test_hf_model_on_sharded_sequence():
    (results, _) = records(2)
    if results[0]["hf"] is None:
        pytest.skip("transformers is not installed")
    for rank, res in enumerate(results):
        assert max(res["hf"]) <= TOLERANCE[torch.float32], (rank, res["hf"])


def test_merge_attention(seed):
    """Merging the attention over two key sets equals the attention over their union, with
    rows empty on one or both sides (0 and -inf, no NaN, in values and gradients)."""
    q = torch.randn(2, 3, 9, 5, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(2, 3, 12, 5, dtype=torch.float64), torch.randn(2, 3, 12, 4, dtype=torch.float64)
    allowed = torch.rand(2, 3, 9, 12) > 0.5
    allowed[:, :, 0] = False  # empty on both sides
    allowed[:, :, 1, :6] = False  # empty on side a
    split = torch.zeros(12, dtype=torch.bool)
    split[6:] = True
    part_a = reference.attention(q, k, v, allowed & ~split, 0.4)
    part_b = reference.attention(q, k, v, allowed & split, 0.4)
    whole = reference.attention(q, k, v, allowed, 0.4)
    out, lse = cp.merge_attention(*part_a, *part_b)
    assert torch.allclose(out, whole[0], atol=1e-12) and torch.equal(torch.isinf(lse), torch.isinf(whole[1]))
    assert torch.allclose(lse[torch.isfinite(lse)], whole[1][torch.isfinite(lse)], atol=1e-12)
    weights = torch.randn(whole[0].shape, dtype=torch.float64)
    lse_weights = torch.randn(lse.shape, dtype=torch.float64)
    finite = torch.isfinite(lse)
    grads = [torch.autograd.grad((o * weights).sum() + (torch.where(finite, l, 0) * lse_weights).sum(), q)[0]
             for o, l in ((out, lse), whole)]
    assert torch.isfinite(grads[0]).all() and torch.allclose(grads[0], grads[1], atol=1e-10)
    with pytest.raises(ValueError, match="lse_a"):
        cp.merge_attention(out, lse[..., :3], out, lse)


@pytest.mark.parametrize("layout", cp.LAYOUTS)
def test_layout_round_trip_without_process_group(layout):
    """No process group: one rank holds the whole sequence in order."""
    x = torch.randn(2, 3, 8, 4)
    assert torch.equal(cp.shard_sequence(x, dim=2, layout=layout), x)
    assert torch.equal(cp.sequence_positions(8, layout=layout), torch.arange(8))
    with pytest.raises(ValueError, match="layout"):
        cp.shard_sequence(x, dim=2, layout="striped")
