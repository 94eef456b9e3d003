"""attnkern's Triton backend: kernels (forward.py, backward.py, band.py, philox.py), their launch
configurations (configs.py) and launchers (launch.py).

One compatibility fix lives here, because it must be in place before any kernel runs under
TRITON_INTERPRET=1, whichever submodule is imported first. Triton's interpreter before 3.8
(seen with 3.6) holds every scalar as a 1-element NumPy array and turns a loop bound into an
int with ``int(array)``, which NumPy 2.4 and later reject ("only 0-dimensional arrays can be
converted to Python scalars"), so every kernel's ``for n0 in range(start, end, BLOCK_N)`` fails
there. Triton 3.8 squeezes the array first; older interpreters get that same conversion. Compiled
kernels never go through it.
"""

from __future__ import annotations

import triton


def _triton_version() -> tuple:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in triton.__version__.split(".")[:2])


def _squeeze_interpreter_loop_bounds() -> None:
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    if patch_tensor is None or getattr(patch_tensor, "_attnkern_squeezes", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    patched._attnkern_squeezes = True
    interpreter._patch_lang_tensor = patched


if _triton_version() < (3, 8):
    _squeeze_interpreter_loop_bounds()
