"""Build of attnkern's C++ (always) and CUDA (when nvcc and a CUDA build of torch exist) extensions.

Environment:
  ATTNKERN_NO_CUDA=1        skip the CUDA extension even where it could be built
  ATTNKERN_REQUIRE_CUDA=1   fail instead of skipping the CUDA extension (CI: every CUDA source must compile)
  TORCH_CUDA_ARCH_LIST      CUDA archs, default "8.0;9.0a"
  ATTNKERN_CUDA_HDIMS       head-dim buckets to instantiate, e.g. "64,128" (default: all)
  ATTNKERN_CUDA_DTYPES      dtypes to instantiate, e.g. "bf16" (default: fp16,bf16)
  ATTNKERN_CUDA_PTXAS_VERBOSE=1  print registers/spills of every CUDA kernel
  ATTNKERN_NO_OPENMP=1      build the CPU kernels without OpenMP (single-threaded; for testing that path)
  ATTNKERN_DEBUG_INFO=1     keep debug info (-g) in the C++ objects (default -g0)
  MAX_JOBS                  parallel compile jobs (torch's ninja build)
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _version():
    text = open(os.path.join(ROOT, "attnkern", "_version.py")).read()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _cuda_home_from_nvcc():
    """Toolkit folder of the nvcc on PATH, even when that nvcc is a wrapper script.

    torch guesses CUDA_HOME from the nvcc path; a wrapper in /usr/local/bin would make it
    look for libcudart under /usr/local. nvcc --dryrun prints the real folder (_HERE_).
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    return os.path.dirname(m.group(1)) if m else None


if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
    found = _cuda_home_from_nvcc()
    if found:
        os.environ["CUDA_HOME"] = found

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

VERSION = _version()
# -g0 unless ATTNKERN_DEBUG_INFO=1: setuptools passes the interpreter's own CFLAGS, which hold -g
# on most Pythons (pyenv's, Debian's), and debug info of these template-heavy files was a third of
# the CPU extension's compile (264 -> 168 core-s with the header change of the same commit,
# 2 jobs, g++ 12) and 28 of its 30 MB; CMakeLists.txt's Release build had none already
CXX_FLAGS = ["-O3", f'-DATTNKERN_VERSION="{VERSION}"', "-fno-math-errno", "-Wno-maybe-uninitialized"]
if os.environ.get("ATTNKERN_DEBUG_INFO", "0") != "1":
    CXX_FLAGS.append("-g0")


def torch_openmp_library():
    """Path of the OpenMP runtime torch loads (libgomp / libiomp5 / libomp), or None.

    torch's inline at::parallel_for only runs in parallel in a translation unit compiled with
    OpenMP, and it must then call into the very runtime libtorch uses: one thread pool, one
    omp_set_num_threads. Linking that file (not the compiler's default runtime) guarantees it.
    """
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        ldd = subprocess.run(["ldd", lib], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\s(lib(?:gomp|iomp5|omp)\.so[.\d]*) => (\S+)", ldd)
    return m.group(2) if m else None


def compiler_has_openmp():
    cxx = os.environ.get("CXX", "c++")
    try:
        out = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-fsyntax-only", "-"], input="#include <omp.h>\n",
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0


def openmp_flags():
    """(compile flags, link flags) for OpenMP with torch's runtime, or ([], []) with one printed line why not."""
    if os.environ.get("ATTNKERN_NO_OPENMP", "0") == "1":
        reason = "ATTNKERN_NO_OPENMP=1"
    elif "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        # torch's native thread pool: at::parallel_for is compiled into libtorch, nothing to add
        return [], []
    elif not compiler_has_openmp():
        reason = "the C++ compiler does not accept -fopenmp"
    elif (runtime := torch_openmp_library()) is None:
        reason = "torch's OpenMP runtime was not found next to libtorch_cpu"
    else:
        # -l:<soname> from torch's folder: the extension needs the same soname torch already loaded
        return ["-fopenmp"], [f"-L{os.path.dirname(runtime)}", f"-l:{os.path.basename(runtime)}"]
    print(f"attnkern: building the CPU kernels without OpenMP ({reason}): they will run single-threaded")
    return [], []


def cpu_extension():
    sources = ["csrc/bindings.cpp", "csrc/bindings_varlen.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    omp_compile, omp_link = openmp_flags()
    return CppExtension("attnkern._C", sources, extra_compile_args={"cxx": CXX_FLAGS + omp_compile},
                        extra_link_args=omp_link)


def cuda_reason_to_skip():
    if os.environ.get("ATTNKERN_NO_CUDA", "0") == "1":
        return "ATTNKERN_NO_CUDA=1"
    if torch.version.cuda is None:
        return "torch is a CPU-only build"
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return "nvcc not found"
    if not glob.glob("csrc/cuda/*.cu"):
        return "no CUDA sources"
    return None


def cuda_archs():
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # torch reads it for -gencode flags
    return archs


def cuda_extension():
    sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda"))
    try:
        import build_sources  # csrc/cuda/build_sources.py: which instantiation files to compile
    finally:
        sys.path.pop(0)
    archs = cuda_archs()
    sources = build_sources.sources(ROOT)
    nvcc_flags = [
        "-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
        f'-DATTNKERN_VERSION="{VERSION}"', f'-DATTNKERN_CUDA_ARCHS="{archs}"',
    ] + build_sources.nvcc_defines() + build_sources.nvcc_flags()
    cxx = CXX_FLAGS + [f'-DATTNKERN_CUDA_ARCHS="{archs}"'] + build_sources.nvcc_defines()
    return CUDAExtension("attnkern._C_cuda", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc_flags})


ext_modules = [cpu_extension()]
skip = cuda_reason_to_skip()
if skip is not None and os.environ.get("ATTNKERN_REQUIRE_CUDA", "0") == "1":
    sys.exit(f"attnkern: ATTNKERN_REQUIRE_CUDA=1 but the CUDA extension cannot be built ({skip})")
if skip is None:
    ext_modules.append(cuda_extension())
    print(f"attnkern: building the CUDA extension for archs {os.environ['TORCH_CUDA_ARCH_LIST']}")
else:
    print(f"attnkern: skipping the CUDA extension ({skip})")

setup(
    name="attnkern",
    version=VERSION,
    packages=find_packages(include=["attnkern", "attnkern.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["attnkern=attnkern.__main__:main"]},
)
