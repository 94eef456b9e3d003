"""What the CUDA extension's machine code contains, per arch and kernel, without a GPU.

    python csrc/cuda/check_sass.py [PATH_TO_C_CUDA_SO] [--json OUT.json]

Reads ``cuobjdump -res-usage`` (registers, local memory = spills) and ``cuobjdump -sass``
(instruction counts) of every kernel in the fat binary and checks that:
  * every arch of the build has code for each kernel family (fwd, decode, bwd_kv, bwd_q);
  * the attention kernels issue tensor-core HMMA.16816 with fp32 accumulate, ldmatrix (LDSM)
    and cp.async (LDGSTS);
  * no kernel has a stack frame or local memory (register spills), beyond ALLOWED_SPILLS.
Exit status 1 if a check fails. cuobjdump comes from the CUDA toolkit or, where the toolkit
lacks it, from Triton's bundled copy. The Hopper kernels (fwd_sm90_kernel, bwd_kv_sm90_kernel,
bwd_q_sm90_kernel, in builds with 9.0a) must issue wgmma (HGMMA) and TMA loads (UTMALDG) in their sm_90a code; its copies for other archs
are stubs that trap, and every other kernel has no HGMMA.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
COUNTED = ("HMMA", "HGMMA", "UTMALDG", "LDSM", "LDGSTS", "BAR", "SHFL", "LDL", "STL")
FAMILIES = {  # kernel family -> demangled-name test
    "fwd": lambda n: n.startswith("fwd_kernel") and n.endswith("false>"),
    "decode": lambda n: n.startswith("fwd_kernel") and n.endswith("true>"),
    "bwd_kv": lambda n: n.startswith("bwd_kv_kernel"),
    "bwd_q": lambda n: n.startswith("bwd_q_kernel"),
}
MATRIX_FAMILIES = tuple(FAMILIES)
SM90_ARCH = "sm_90a"


def is_sm90_kernel(name: str) -> bool:
    return name.startswith(("fwd_sm90_kernel", "bwd_kv_sm90_kernel", "bwd_q_sm90_kernel"))
# (arch, demangled kernel name) -> bytes of stack frame allowed. ptxas puts spilled registers in
# the stack frame (cuobjdump -res-usage STACK; its LOCAL stays 0), so any frame is counted. With
# CUDA 13.0 these spill (frames of 8-112 bytes; the allowances leave a little room):
#   * the Hopper dK/dV pass at head dim 128: its consumers hold dK, dV (64 registers each), S^T
#     and dP^T (32 each) and their fragments, a few more than their 240 registers; more with
#     masks/dropout, as does the Hopper forward at head dim 128 with masks/dropout;
#   * the split-KV decode forward at head dim 256 (two warps, 255 registers each), and its
#     varlen variant (the per-sequence lengths and the page lookups cost a few more registers);
#   * the masked/dropout sm80 dK/dV pass at head dim 128, compiled for sm_90a;
#   * the score-modifier variant of the head-dim-256 decode forward (as its plain one) and of the
#     head-dim-64 dK/dV pass on sm_90a (S^T, dP^T/dS^T, dK, dV: 128 accumulator registers).
# None is measured on a GPU; each is a place to look when one is. The Hopper dK/dV pass without
# features grew from 80 to 136 bytes in stop 9, when the AttnParams fields of the score modifiers
# and packed/paged calls and the NaN-preserving rules of score.cuh/bwd_kernel.cuh merged; which
# change tipped ptxas was not isolated.
ALLOWED_SPILLS = {
    (arch, name.format(t=t)): size
    for t in ("__half", "__nv_bfloat16")
    for arch, name, size in (
        ("sm_90a", "bwd_kv_sm90_kernel<BwdSm90Config<128, 64, 2>, {t}, false>", 144),
        ("sm_90a", "bwd_kv_sm90_kernel<BwdSm90Config<128, 64, 2>, {t}, true>", 128),
        ("sm_90a", "fwd_sm90_kernel<FwdSm90Config<128, 128, 2>, {t}, true>", 128),
        ("sm_80", "fwd_kernel<FwdConfig<256, 2, 1, 2, 32, 2>, {t}, 0, true>", 16),
        ("sm_90a", "fwd_kernel<FwdConfig<256, 2, 1, 2, 32, 2>, {t}, 0, true>", 128),
        ("sm_90a", "bwd_kv_kernel<BwdKVConfig<128, 8, 32, 2>, {t}, 1, true, true>", 16),
        # the score-modifier variant (kModified = 2): fp16 measured 40 / 48 / 16 bytes with CUDA 13.0
        # (nvcc on the instantiation files, loaded machine; bf16 not measured, hence the margin); the
        # decode forward 32 / 40 since the split-KV path compiles no dropout code (it never has dropout)
        ("sm_80", "fwd_kernel<FwdConfig<256, 2, 1, 2, 32, 2>, {t}, 2, true>", 64),
        ("sm_90a", "fwd_kernel<FwdConfig<256, 2, 1, 2, 32, 2>, {t}, 2, true>", 72),
        ("sm_90a", "bwd_kv_kernel<BwdKVConfig<64, 8, 64, 2>, {t}, 2, true, true>", 40),
        # the head-dim-256 prefill forward's modifier variant on sm_90a: 8 bytes (fp16 and bf16, CUDA
        # 13.0) since stop 23's softcap tanh (mask.h softcap_tanh: a polynomial branch beside the
        # exp2 form); 0 before, and 0 on sm_80 (measured on a head-dim-256 build of both archs)
        ("sm_90a", "fwd_kernel<FwdConfig<256, 4, 1, 1, 32, 2>, {t}, 2, false>", 16),
        # the same dK/dV pass on sm_80 spilled nothing until the huge-LSE rare path's per-row
        # log2 sum (s_sum) joined it: 72 bytes (fp16 and bf16) in the merged build, CUDA 13.0;
        # only modifier calls at head dim 64 run it, and its cost is unmeasured (no GPU)
        ("sm_80", "bwd_kv_kernel<BwdKVConfig<64, 8, 64, 2>, {t}, 2, true, true>", 80),
        # the plain head-dim-256 decode forward's varlen variant (packed/paged decode): 40 bytes on
        # sm_80, 32 on sm_90a with CUDA 13.0 (fp16, nvcc on the instantiation file, also after the
        # merge with the modifiers/huge-LSE work)
        ("sm_80", "fwd_kernel<Varlen<FwdConfig<256, 2, 1, 2, 32, 2> >, {t}, 0, true>", 48),
        ("sm_90a", "fwd_kernel<Varlen<FwdConfig<256, 2, 1, 2, 32, 2> >, {t}, 0, true>", 48),
        # the varlen variants' score-modifier variant (packed/paged calls with softcap, sinks, ALiBi
        # or dropout), CUDA 13.0, fp16 and bf16 alike: the head-dim-256 decode forward 120 bytes on
        # sm_80, 96 on sm_90a (the dense one's 32 / 40 plus the varlen one's growth, more than the sum
        # of the two); the dK/dV pass 72 / 48 at head dim 64 (the dense one's 72 / 40) and 8 / 8 at
        # head dim 128 (the dense one's 0); the head-dim-96 decode forward 8 / 8 bytes with 168 registers
        # since the decode path's dead dropout code went (0 bytes with 202 / 206 before: ptxas's choice)
        ("sm_80", "fwd_kernel<Varlen<FwdConfig<256, 2, 1, 2, 32, 2> >, {t}, 2, true>", 136),
        ("sm_90a", "fwd_kernel<Varlen<FwdConfig<256, 2, 1, 2, 32, 2> >, {t}, 2, true>", 112),
        ("sm_80", "fwd_kernel<Varlen<FwdConfig<96, 4, 1, 4, 64, 2> >, {t}, 2, true>", 16),
        ("sm_90a", "fwd_kernel<Varlen<FwdConfig<96, 4, 1, 4, 64, 2> >, {t}, 2, true>", 16),
        ("sm_80", "bwd_kv_kernel<Varlen<BwdKVConfig<64, 8, 64, 2> >, {t}, 2, true, true>", 80),
        ("sm_90a", "bwd_kv_kernel<Varlen<BwdKVConfig<64, 8, 64, 2> >, {t}, 2, true, true>", 56),
        ("sm_80", "bwd_kv_kernel<Varlen<BwdKVConfig<128, 8, 32, 2> >, {t}, 2, true, true>", 16),
        ("sm_90a", "bwd_kv_kernel<Varlen<BwdKVConfig<128, 8, 32, 2> >, {t}, 2, true, true>", 16),
    )
}


def find_cuobjdump() -> Optional[str]:
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "cuobjdump")):
            return os.path.join(home, "bin", "cuobjdump")
    try:
        import triton

        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    return None


def find_extension() -> Optional[str]:
    hits = sorted(glob.glob(os.path.join(ROOT, "attnkern", "_C_cuda*.so")))
    return hits[0] if hits else None


def demangle(names):
    names = list(names)
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    short = {}
    for raw, pretty in zip(names, out.splitlines()):
        pretty = re.sub(r"\battnkern::cuda::", "", pretty)
        pretty = re.sub(r"\((attnkern::)?AttnParams.*$", "", pretty)
        short[raw] = pretty.replace("void ", "", 1)
    return short


SASS_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\.[A-Z0-9_.]+)?")


def _count_sass(text: str, kernels: Dict) -> None:
    """Add the COUNTED opcodes of one ``cuobjdump -sass`` listing to ``kernels[arch][name]``. The
    arch comes from the fat binary's "arch = sm_80" line or a single cubin's "code for sm_80"."""
    arch = current = None
    for line in text.splitlines():
        m = re.match(r"\s*(?:arch =|code for) (\S+)", line)
        if m:
            arch, current = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = kernels[arch].setdefault(m.group(1), {k: 0 for k in COUNTED})
            continue
        m = SASS_OPCODE.match(line)
        if m and current is not None:
            op, suffix = m.group(1), m.group(2) or ""
            if op in COUNTED:
                current[op] += 1
            if op == "HMMA" and ".16816.F32" in suffix:
                current["HMMA.16816.F32"] = current.get("HMMA.16816.F32", 0) + 1


def _sass_listings(so: str, cuobjdump: str):
    """The ``cuobjdump -sass`` text of ``so``, one arch at a time.

    Disassembly is most of this script's time and one cuobjdump uses one core, so each arch of
    the fat binary gets its own cuobjdump (-arch), run in parallel; each listing is parsed while
    the others still run. (One cuobjdump per cubin balances better, but each process costs
    ~0.3 s of start-up, which ate the gain over ~60 cubins.)"""
    listed = subprocess.run([cuobjdump, "-lelf", so], capture_output=True, text=True, check=True).stdout
    archs = sorted(set(re.findall(r"\.(sm_\w+)\.cubin$", listed, re.M)))

    def disassemble(arch):
        return subprocess.run([cuobjdump, "-sass"] + (["-arch", arch] if arch else []) + [so], capture_output=True,
                              text=True, check=True).stdout

    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done in concurrent.futures.as_completed([pool.submit(disassemble, a) for a in archs or [None]]):
            yield done.result()


def inspect(so: str, cuobjdump: str) -> Dict:
    """{arch: {kernel: {"REG": n, "LOCAL": n, "STACK": n, "HMMA": n, ...}}}"""
    kernels: Dict[str, Dict[str, Dict[str, int]]] = defaultdict(dict)
    arch = None
    res = subprocess.run([cuobjdump, "-res-usage", so], capture_output=True, text=True, check=True).stdout
    name = None
    for line in res.splitlines():
        m = re.match(r"\s*arch = (\S+)", line)
        if m:
            arch = m.group(1)
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            name = m.group(1)
        m = re.match(r"\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", line)
        if m and name:
            kernels[arch].setdefault(name, {k: 0 for k in COUNTED}).update(
                REG=int(m.group(1)), STACK=int(m.group(2)), LOCAL=int(m.group(3)))
            name = None
    for text in _sass_listings(so, cuobjdump):
        _count_sass(text, kernels)
    names = demangle({n for per_arch in kernels.values() for n in per_arch})
    return {a: {names[n]: c for n, c in per_arch.items()} for a, per_arch in kernels.items()}


def check(report: Dict) -> list:
    problems = []
    for arch, per_kernel in sorted(report.items()):
        for family, belongs in FAMILIES.items():
            members = {n: c for n, c in per_kernel.items() if belongs(n)}
            if not members:
                problems.append(f"{arch}: no {family} kernel")
            for name, c in members.items():
                if family in MATRIX_FAMILIES:
                    for op in ("HMMA.16816.F32", "LDSM", "LDGSTS"):
                        if c.get(op, 0) == 0:
                            problems.append(f"{arch} {name}: no {op}")
        for name, c in per_kernel.items():
            if is_sm90_kernel(name) and arch == SM90_ARCH:
                for op in ("HGMMA", "UTMALDG"):
                    if c.get(op, 0) == 0:
                        problems.append(f"{arch} {name}: no {op}")
            elif c.get("HGMMA", 0) > 0:
                problems.append(f"{arch} {name}: HGMMA outside the Hopper forward")
            frame = c.get("LOCAL", 0) + c.get("STACK", 0)
            if frame > ALLOWED_SPILLS.get((arch, name), 0):
                problems.append(f"{arch} {name}: {frame} bytes of stack frame / local memory (spills)")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("so", nargs="?", help="the built attnkern/_C_cuda*.so (default: the in-place build)")
    parser.add_argument("--json", help="write the per-arch, per-kernel report here")
    args = parser.parse_args(argv)
    so = args.so or find_extension()
    tool = find_cuobjdump()
    if so is None or tool is None:
        print(f"check_sass: need the built extension ({so}) and cuobjdump ({tool})", file=sys.stderr)
        return 2
    report = inspect(so, tool)
    for arch, per_kernel in sorted(report.items()):
        print(f"== {arch}")
        for name, c in sorted(per_kernel.items()):
            shown = ("REG", "STACK", "LOCAL", "HMMA", "HGMMA", "UTMALDG", "LDSM", "LDGSTS", "BAR")
            counts = " ".join(f"{k}={c.get(k, 0)}" for k in shown)
            print(f"  {counts}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)
    problems = check(report)
    for p in problems:
        print("PROBLEM:", p)
    print("check_sass:", "ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
