"""The multiply rate of vdpbf16ps against fp32 FMA on this CPU, bare and in the forward's block products.

Compiles benchmarks/cpu_dot_rate.cpp with the C++ compiler and the flags of the CPU extension
(it includes csrc/cpu/gemm.h and gemm_dpbf16.h, the kernels the avx512 and avx512_bf16 variants
run), runs it on one thread and records its JSON with the CPU, the compiler and the load average:

    python benchmarks/bench_cpu_dot_rate.py --out benchmarks/quiet/cpu-dot-rate-DATE.json

`instructions.dpbf16_vs_fma_mac_rate` is the figure that decides whether the avx512_bf16 variant
can beat the conversion path: vdpbf16ps does 32 multiply-adds, an fp32 FMA 16, so at equal
instruction throughput the ratio is 2; the variant's bf16 products cannot run faster than this
ratio times the fp32 products (`tile.dpbf16_vs_fma_products_speed`, at the kernels' tile shape).
`instructions.fma_dpbf16_overlap` near 0 says the two share the same units, so mixing them in one
product gains nothing either.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cpu_dot_rate.cpp")
CSRC_CPU = os.path.join(HERE, "..", "csrc", "cpu")
# setup.py's CXX_FLAGS, less the version define
FLAGS = ["-O3", "-fno-math-errno", "-std=c++17"]


def measure() -> dict:
    """Compile and run cpu_dot_rate.cpp; its JSON (``{"error": ...}`` on CPUs without
    AVX512_BF16 or without a compiler)."""
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "cpu_dot_rate")
        build = subprocess.run([cxx, *FLAGS, f"-I{CSRC_CPU}", SOURCE, "-o", exe], capture_output=True, text=True)
        if build.returncode != 0:
            return {"error": f"{cxx} failed: {build.stderr.strip()[-500:]}"}
        run = subprocess.run([exe], capture_output=True, text=True, check=True)
    result = json.loads(run.stdout)
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout.splitlines()
    result["compiler"] = f"{cxx}: {version[0] if version else '?'} {' '.join(FLAGS)}"
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(HERE, ".."))
    from attnkern.bench.report import cpu_name, write_json

    load_before = os.getloadavg()
    result = {
        "benchmark": "benchmarks/bench_cpu_dot_rate.py",
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": cpu_name(), "cpus": os.cpu_count()},
        "threads": 1,
        "loadavg_before": load_before,
        **measure(),
        "loadavg_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        write_json(args.out, result)


if __name__ == "__main__":
    main()
