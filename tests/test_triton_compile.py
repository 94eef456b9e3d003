"""The Triton kernels compiled for sm80 and sm90 without a GPU (Triton's bundled ptxas).

The interpreter (test_triton_interp.py) checks what the kernels compute but not that they
compile: constexpr rules, layouts and shared memory only meet the real compiler. Here each
kernel is compiled ahead of time for both architectures with the specialisations a launch on
16-byte aligned tensors gets, checking that it builds, that its K/V loads are software-
pipelined (async copies: the fast path), and that its shared memory fits the architecture and
stays within configs._smem_bytes, the estimate the autotuner prunes with. The sweep over every
autotune candidate (marked slow) also runs ptxas -v on each and bounds its register spills.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("kernels are interpreted in this process (TRITON_INTERPRET=1)", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from attnkern.triton import backward, configs, forward, varlen  # noqa: E402

ARCHS = {"sm90": (90, 227 * 1024), "sm80": (80, 163 * 1024)}
MAX_SPILL_BYTES = 256
_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
KERNELS = {"fwd": forward.fwd_kernel, "dkdv": backward.dkdv_kernel, "dq": backward.dq_kernel}
TABLES = {"fwd": configs._FWD, "dkdv": configs._BWD_DKDV, "dq": configs._BWD_DQ}


VARLEN_KERNELS = {"fwd": varlen.varlen_fwd_kernel, "dkdv": varlen.varlen_dkdv_kernel, "dq": varlen.varlen_dq_kernel}


def compile_kernel(kind, arch, dtype, head_dim, config, mask=None, dropout=False, mask_grad=False, modifiers=False,
                   packed=None):
    """Compile one kernel as a launch on aligned tensors with unit-stride masks would specialise it.

    ``config`` is an autotune entry (BLOCK_M, BLOCK_N, num_warps, num_stages). ``packed``: compile
    the varlen kernel of ``kind`` with these constexprs (HAS_SEQUSED, PAGED, SPLIT) instead.
    """
    kernel = KERNELS[kind] if packed is None else VARLEN_KERNELS[kind]
    block_m, block_n, warps, stages = config
    block_d = max(16, triton.next_power_of_2(head_dim))
    mask_type = {None: "u8", "bool": "u8", "float": "fp32"}[mask]
    constexprs = dict(BLOCK_D=block_d, BLOCK_DV=block_d, PAD_D=block_d != head_dim, PAD_DV=block_d != head_dim,
                      MASK_KIND=forward.MASK_KINDS[mask], HAS_DROPOUT=dropout,
                      DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", BLOCK_M=block_m, BLOCK_N=block_n,
                      stride_mn=1, SOFTCAP=modifiers, HAS_ALIBI=modifiers)
    if "HAS_SINKS" in kernel.arg_names:  # the forward adds the sinks (the backward needs none)
        constexprs["HAS_SINKS"] = modifiers
    # the rare path of rows with a huge LSE: the forward writes row statistics, the backward reads them
    constexprs["WRITE_STATS" if kind == "fwd" else "HUGE_ROWS"] = modifiers
    if kind == "dq":
        constexprs["MASK_GRAD"] = mask_grad
    constexprs.update(packed or {})
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    signature, aligned = {}, []
    for index, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("Lse", "Delta", "dMask", "GradLse", "Sinks", "Alibi", "RowStats"):
            signature[name] = "*fp32"
        elif name in ("CuQ", "CuK", "SeqUsedK", "BlockTable"):
            signature[name] = "*i32"
        elif name == "Mask":
            signature[name] = "*" + mask_type
        elif name[0].isupper() or name[:2] in ("dQ", "dK", "dV", "dO"):
            signature[name] = "*" + _TRITON_TYPES[dtype]
        elif name in ("scale", "qk_scale", "drop_scale", "softcap2"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        # what Triton's launcher specialises for 16-byte aligned tensors with strides divisible by 16
        if signature[name].startswith("*") or (name.startswith("stride_") and signature[name] == "i32"):
            aligned.append(index)
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", ARCHS[arch][0], 32),
                          options={"num_warps": warps, "num_stages": stages})


def _check(compiled, kind, arch, dtype, head_dim, config, mask=None, dropout=False):
    shared = compiled.metadata.shared
    limit = ARCHS[arch][1]
    assert shared <= limit, f"{kind} {config} uses {shared} B of shared memory, {arch} has {limit}"
    args = {"Q": torch.empty(0, dtype=dtype), "Mask": torch.empty(0, dtype=torch.float32 if mask == "float" else
                                                                        torch.uint8),
            "MASK_KIND": forward.MASK_KINDS[mask], "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "HAS_DROPOUT": dropout}
    args["BLOCK_DV"] = args["BLOCK_D"]
    cfg = triton.Config({"BLOCK_M": config[0], "BLOCK_N": config[1]}, num_warps=config[2], num_stages=config[3])
    estimate = configs._smem_bytes(cfg, args, kind)
    assert shared <= estimate, f"{kind} {config}: {shared} B of shared memory, above the pruner's {estimate}"
    assert "async_copy_global_to_local" in compiled.asm["ttgir"], f"{kind} {config}: loads are not pipelined"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", ["fwd", "dkdv", "dq"])
def test_kernels_compile_with_modifiers(kind, arch):
    """The softcap/sinks/ALiBi variants (constexpr SOFTCAP, HAS_SINKS, HAS_ALIBI), with the huge-LSE rare
    path (WRITE_STATS, HUGE_ROWS), compile for sm80/sm90, within the device's shared memory, with pipelined
    loads."""
    config = TABLES[kind][arch][128][-1]
    compiled = compile_kernel(kind, arch, torch.bfloat16, 128, config, mask="float", modifiers=True)
    assert compiled.metadata.shared <= ARCHS[arch][1]
    assert "async_copy_global_to_local" in compiled.asm["ttgir"]


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "kind,dtype,head_dim,mask,dropout",
    [("fwd", torch.float16, 128, None, False), ("fwd", torch.bfloat16, 40, "float", True),
     ("fwd", torch.float32, 64, "bool", False), ("dkdv", torch.bfloat16, 128, "bool", True),
     ("dq", torch.float16, 72, "float", False)],
)
def test_kernels_compile(kind, dtype, head_dim, mask, dropout, arch):
    head = configs.head_class(*(max(16, triton.next_power_of_2(head_dim)),) * 2)
    config = TABLES[kind][arch][head][-1]  # the smallest tiles: they fit fp32 too
    compiled = compile_kernel(kind, arch, dtype, head_dim, config, mask=mask, dropout=dropout,
                              mask_grad=mask == "float")
    _check(compiled, kind, arch, dtype, head_dim, config, mask, dropout)


@pytest.mark.parametrize(
    "kind,packed,modifiers,arch",
    [("fwd", dict(HAS_SEQUSED=True, PAGED=False, SPLIT=False), False, "sm80"),
     ("fwd", dict(HAS_SEQUSED=True, PAGED=False, SPLIT=False), False, "sm90"),
     ("fwd", dict(HAS_SEQUSED=False, PAGED=True, SPLIT=True), True, "sm90"),
     ("dkdv", dict(HAS_SEQUSED=True), True, "sm90"), ("dq", dict(HAS_SEQUSED=False), False, "sm80")],
    ids=["fwd-sm80", "fwd-sm90", "fwd-paged-split-modifiers-dropout-sm90", "dkdv-modifiers-dropout-sm90", "dq-sm80"],
)
def test_varlen_kernels_compile(kind, packed, modifiers, arch):
    """The packed/paged kernels (attnkern/triton/varlen.py) with the dense tables' smallest tiles compile
    for sm80/sm90 within the pruner's shared-memory estimate (the modifier cases with dropout too); the
    unpaged ones pipeline their loads (paged keys are gathered through the block table, one row per key)."""
    config = TABLES[kind][arch][128][-1]
    compiled = compile_kernel(kind, arch, torch.float16, 128, config, dropout=modifiers, modifiers=modifiers,
                              packed=packed)
    if packed.get("PAGED"):
        assert compiled.metadata.shared <= ARCHS[arch][1]
    else:
        _check(compiled, kind, arch, torch.float16, 128, config, dropout=modifiers)


def test_preprocess_compiles():
    signature = {"Out": "*bf16", "dOut": "*bf16", "GradLse": "*fp32", "Delta": "*fp32"}
    for name in backward.preprocess_kernel.arg_names:
        signature.setdefault(name, "i32")
    constexprs = dict(BLOCK_DV=128, PAD_DV=True, HAS_GRAD_LSE=True, BLOCK_M=configs.PREPROCESS["BLOCK_M"])
    for name in constexprs:
        signature[name] = "constexpr"
    triton.compile(ASTSource(backward.preprocess_kernel, signature, constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": configs.PREPROCESS["num_warps"]})


def _spill_bytes(compiled, arch, tmp_path) -> int:
    """Spill stores ptxas reports for the kernel's PTX (Triton's own ptxas)."""
    try:
        ptxas = triton.knobs.nvidia.ptxas.path
    except AttributeError:
        pytest.skip("this Triton does not expose its ptxas")
    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    target = "sm_90a" if arch == "sm90" else "sm_80"
    result = subprocess.run([ptxas, f"-arch={target}", "-v", str(ptx), "-o", str(tmp_path / "kernel.cubin")],
                            capture_output=True, text=True, check=True)
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", result.stderr))


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("kind", list(KERNELS))
@pytest.mark.parametrize("head_dim", [64, 128, 256])
def test_every_autotune_candidate_fits(kind, head_dim, arch, tmp_path):
    for config in TABLES[kind][arch][head_dim]:
        compiled = compile_kernel(kind, arch, torch.bfloat16, head_dim, config)
        _check(compiled, kind, arch, torch.bfloat16, head_dim, config)
        spills = _spill_bytes(compiled, arch, tmp_path)
        assert spills <= MAX_SPILL_BYTES, f"{kind} {config} on {arch}: ptxas spills {spills} bytes"
