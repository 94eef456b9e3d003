"""The emulator's sm90 instructions (csrc/cuda/emulator/ptx_sm90_emu.h): mbarrier, TMA with
128-byte swizzle, wgmma from shared memory and from registers, held to torch float64 matmul.

The self-test (selftest_sm90.h) lays out random fp16/bf16 tiles in the canonical layouts as read
from the PTX ISA, moves them through emulated TMA and mbarriers, and runs wgmma over several
k-steps; here the results are compared with the float64 product of the same values. Both sides
are one reading of the PTX ISA, so this checks the emulator's self-consistency and its
bookkeeping (phases, tx-counts, wgmma groups), not the hardware: that needs a GPU run.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close


def expected(r):
    a, b = r["a"].double(), r["b"].double()
    if r["rs"]:
        b = b.clone()
        b[r["k"] - 3:] = 0  # the tensor map covers K - 3 rows of V; TMA zero-fills the rest
        return a @ b
    a = F.pad(a[:-2], (0, 0, 2, 0))  # A was loaded from rows -2 .. 61: two zero rows on top
    return a @ b.T


@pytest.mark.parametrize("late_copies", [True, False], ids=["late", "eager"])
def test_wgmma_tma_mbarrier_against_matmul(emu, seed, late_copies):
    results = emu.selftest_sm90(seed, late_copies)
    seen = set()
    for r in results:
        dtype = torch.bfloat16 if r["bf16"] else torch.float16
        what = f"{'rs' if r['rs'] else 'ss'} N={r['n']} K={r['k']} {dtype}"
        assert r["d"].shape == (64, r["n"])
        assert_close(r["d"], expected(r), dtype, what)
        seen.add((r["rs"], r["n"], r["k"], r["bf16"]))
    assert len(seen) == 16
    stats = emu.stats()
    # per (dtype, N): ss K=64 + K=128 gives 4 + 8 wgmma, rs the same; TMA: ss 1 + 2 boxes, rs N/64 per round
    assert stats["wgmma"] == 2 * 2 * (12 + 12)
    assert stats["tma"] == 2 * ((1 + 2) * 2 + (1 + 2) * (1 + 2))


def test_accumulators_read_before_wgmma_wait(emu, seed):
    """Under late timing the accumulators are the hardware's until wgmma.wait_group: reading them
    early gives NaN; issued eagerly the same kernel happens to read the right values."""
    (late,) = emu.selftest_sm90(seed, True, "read_before_wait")
    assert torch.isnan(late["d"]).all()
    (eager,) = emu.selftest_sm90(seed, False, "read_before_wait")
    assert_close(eager["d"], expected(eager), torch.float16, "eager")


@pytest.mark.parametrize(
    "fault, message",
    [
        ("deadlock", r"deadlock: .*128 threads wait on mbarriers"),
        ("misaligned", r"not in the first row of a 1024-byte-aligned swizzle atom"),
        ("no_fence", r"without a wgmma.fence"),
        ("no_wait", r"not retired by wgmma.wait_group"),
        ("expect_too_few", r"more transaction bytes completed than expect_tx announced"),
        ("skip_full_wait", r"still in flight when the CTA exited"),
    ],
)
def test_faults_are_reported(emu, seed, fault, message):
    with pytest.raises(RuntimeError, match=message):
        emu.selftest_sm90(seed, True, fault)
