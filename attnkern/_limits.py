"""Fixed limits of the Triton kernels, and whether Triton is interpreting.

Both the capability table (``dispatch.py``) and the Triton launchers (``triton/launch.py``,
``triton/launch_varlen.py``) check them; they live here, below both, so that neither imports the
other. Nothing here imports triton.
"""

from __future__ import annotations

import os

# the Triton kernels' launch configurations (triton/configs.py) cover padded head dims up to this
TRITON_MAX_HEAD_DIM = 256
# the Triton grid puts heads and batch on CUDA grid dims 1 and 2
TRITON_MAX_GRID_DIM = 65535


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1: Triton then runs kernels on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
