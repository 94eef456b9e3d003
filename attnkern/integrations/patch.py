"""Route ``torch.nn.functional.scaled_dot_product_attention`` to attnkern for every caller.

No single hook reaches every caller, so ``patch()`` installs three:

1. The attribute ``torch.nn.functional.scaled_dot_product_attention`` is replaced by
   :func:`scaled_dot_product_attention` below (process-wide). Code that looks the name up
   when it calls reaches it, and so does torch's own ``F.multi_head_attention_forward``
   (which ``nn.MultiheadAttention`` and ``nn.Transformer*`` layers call), since it reads
   the module global at call time.
2. A ``TorchFunctionMode`` on the patching thread catches the original builtin
   (``torch._C._nn.scaled_dot_product_attention``), which is what code holds that bound the
   name before patching (``from torch.nn.functional import scaled_dot_product_attention``).
   Torch function modes are thread-local. While one is active,
   ``torch.overrides.has_torch_function`` is true, which is exactly the condition under
   which ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``/``TransformerEncoder``
   skip their C++ fast paths (``torch._native_multi_head_attention``,
   ``torch._transformer_encoder_layer_fwd``, nested tensors); those never call F.sdpa.
3. ``patch(enable=True)`` (whole program) also turns off
   ``torch.backends.mha.set_fastpath_enabled`` so modules on *other* threads take the
   F.sdpa path as well; the previous value comes back with ``unpatch()``.

Scope. ``with patch():`` affects the thread that entered it: calls from other threads
pass straight to torch (unless a program-wide patch is on). Contexts nest; the innermost
one's ``backend``/``window_size`` apply. ``patch(enable=True)`` applies to every thread
that is not inside a ``with patch()`` of its own; references bound before patching are
caught only on the thread that called it. Exit restores everything, exceptions included;
the original attribute returns when the last user on any thread is gone.

A call goes to attnkern when attnkern's argument checks accept it and a fused backend's
row in the capability table serves it; anything else (a mask together with
``is_causal``, tensor subclasses, nested or sparse tensors, tensors inside ``torch.func``
transforms, shapes attnkern rejects, devices or dtypes no fused backend runs) goes to
torch's implementation unchanged, so errors are torch's own. With ``backend="auto"`` the
float64 reference (``math``) is never chosen: torch's own kernel is the better fallback.
``stats`` counts both outcomes. Under ``torch.compile`` the routing is decided while
tracing (and guarded), and the counters do not move.
"""

from __future__ import annotations

import collections
import sys
import threading
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode

from .. import dispatch
from .._semantics import causal_bias_alignment, check_backend, is_causal_bias, normalize_torch_layout
from ._attend import checked_window

# what F.scaled_dot_product_attention is bound to when torch is imported, and what early
# importers hold; it dispatches through __torch_function__, so a mode can catch it
_BUILTIN = torch._C._nn.scaled_dot_product_attention
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


@dataclass(frozen=True)
class Settings:
    backend: str
    window_size: Optional[Tuple[int, int]]


class Stats:
    """How many F.sdpa calls went to attnkern, and why the others went to torch."""

    def __init__(self) -> None:
        self.routed = 0
        self.fell_back: collections.Counter = collections.Counter()

    def reset(self) -> None:
        self.routed = 0
        self.fell_back.clear()

    def __repr__(self) -> str:
        return f"Stats(routed={self.routed}, fell_back={dict(self.fell_back)})"


stats = Stats()


class _ThreadState:
    """One thread's patch state. A plain object (reached through a thread-local) so that a scope
    exited on another thread (a generator closed there) can still clean up its own thread's state."""

    def __init__(self) -> None:
        self.stack = []  # Settings of this thread's active `with patch()` scopes, innermost last
        self.mode = None  # the _RouteMode pushed on this thread, if any
        self.mode_users = 0
        self.passthrough = 0  # >0 while handing a call to torch: the mode must not route it again


class _Local(threading.local):
    def __init__(self) -> None:
        self.state = _ThreadState()


_local = _Local()


def _state() -> _ThreadState:
    return _local.state

_lock = threading.RLock()
_attr_users = 0
_previous_attr = None  # F.scaled_dot_product_attention as found when the first user arrived
_program: Optional[Settings] = None
_program_thread: Optional[int] = None
_program_fastpath: Optional[bool] = None


def _active_settings() -> Optional[Settings]:
    stack = _state().stack
    if stack:
        return stack[-1]
    return _program


# ---------------------------------------------------------------------------------------
# the routing decision


def _unservable(query, key, value, attn_mask, is_causal) -> Optional[str]:
    """Reasons to leave a call to torch that attnkern's own checks would not report as such."""
    for t in (query, key, value) + (() if attn_mask is None else (attn_mask,)):
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return f"argument of type {type(t).__name__} (tensor subclasses stay with torch)"
        if t.is_nested or t.layout != torch.strided:
            return "nested or non-strided tensor"
        if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(t):
            # attnkern's ops have no vmap rule and their autograd is not functorch-ready
            # (dynamo cannot trace this check; torch.func inside a compiled region is not covered)
            return "tensor inside a torch.func transform (vmap, grad, ...)"
    if attn_mask is not None and is_causal:
        return "attn_mask together with is_causal (torch rejects it)"
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return "empty tensor"
    return None


def _pick_backend(problem, backend: str) -> Tuple[Optional[str], Optional[str]]:
    if backend == "auto":
        for name in dispatch.AUTO_ORDER.get(problem.device_type, ()):
            # the float64 reference materialises every score: torch's own kernel is the better fallback
            if name != "math" and dispatch.CAPABILITIES[name].why_not(problem) is None:
                return name, None
        return None, f"no fused attnkern backend serves {problem.dtype} on {problem.device_type}"
    reason = dispatch.CAPABILITIES[backend].why_not(problem)
    return (None, reason) if reason else (backend, None)


def _note_fallback(reason: str) -> None:
    if not torch.compiler.is_compiling():
        stats.fell_back[reason] += 1


def _serve(settings: Settings, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """attnkern's output for this call, or None when torch should serve it."""
    bottom_right = causal_bias_alignment(attn_mask)
    if bottom_right is not None and not is_causal:
        # torch's CausalBias: causal in its alignment, its tensor data is no mask
        attn_mask, is_causal = None, True
    reason = _unservable(query, key, value, attn_mask, is_causal)
    if reason is None:
        try:
            # attnkern's argument checks decide what it accepts; what they reject goes to
            # torch, which serves it or raises its own error (no kernel is run here)
            q, k, v, mask, problem, out_shape = normalize_torch_layout(
                query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, settings.window_size,
                bool(bottom_right),
            )
        except (TypeError, ValueError) as exc:
            reason = f"attnkern's argument checks: {exc}"
    if reason is None:
        name, reason = _pick_backend(problem, settings.backend)
    if reason is not None:
        _note_fallback(reason)
        return None
    if not torch.compiler.is_compiling():
        stats.routed += 1
    out, _ = dispatch.run(problem, q, k, v, mask, name)
    return out.reshape(out_shape)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
):
    """What ``torch.nn.functional.scaled_dot_product_attention`` is while patched."""
    # a call torch makes while serving one handed to it (CausalBias._dispatch) stays with torch
    settings = None if _state().passthrough else _active_settings()
    if settings is not None:
        out = _serve(settings, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if out is not None:
            return out
    previous = _previous_attr if _previous_attr is not None else _BUILTIN
    return _call_torch(previous, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _call_torch(fn, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's own F.sdpa. A CausalBias mask takes its own path (CausalBias._dispatch): its
    __torch_function__ recognises only F.scaled_dot_product_attention, which is attnkern's now."""
    if is_causal_bias(attn_mask):
        fn = sys.modules["torch.nn.attention.bias"].CausalBias._dispatch
    state = _state()
    state.passthrough += 1
    try:
        return fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    finally:
        state.passthrough -= 1


class _RouteMode(TorchFunctionMode):
    """Catches the builtin F.sdpa on this thread; every other function passes through."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _BUILTIN and not _state().passthrough:
            call = _bind_sdpa(*args, **kwargs)
            settings = _active_settings()
            if settings is not None:
                out = _serve(settings, *call)
                if out is not None:
                    return out
            return _call_torch(func, *call)
        # this mode is popped while its handler runs, so this reaches torch (or outer modes)
        return func(*args, **kwargs)


def _bind_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


# ---------------------------------------------------------------------------------------
# installing and removing the hooks


def _acquire_attribute() -> None:
    global _attr_users, _previous_attr
    with _lock:
        if _attr_users == 0:
            # torch caches the overridable functions by walking torch.nn.functional on first use
            # (torch.compile asks it whether to dispatch a function to torch function modes and
            # subclasses); built while patched, the builtin would be missing from it for good
            torch.overrides.get_overridable_functions()
            _previous_attr = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = scaled_dot_product_attention
        _attr_users += 1


def _release_attribute() -> None:
    global _attr_users, _previous_attr
    with _lock:
        _attr_users -= 1
        if _attr_users == 0:
            # someone who replaced it after us keeps theirs
            if F.scaled_dot_product_attention is scaled_dot_product_attention:
                F.scaled_dot_product_attention = _previous_attr
            _previous_attr = None


def _acquire_mode(state: _ThreadState) -> None:
    # a mode left by a scope that another thread closed is still on this thread's stack: reuse it
    if state.mode is None:
        mode = _RouteMode()
        mode.__enter__()
        state.mode = mode
    state.mode_users += 1


def _remove_mode(mode: TorchFunctionMode) -> None:
    """Take ``mode`` off this thread's torch function mode stack, keeping any modes above it
    (a user's mode entered inside the patch and still open) in their order."""
    above = []
    while torch._C._len_torch_function_stack() > 0:
        top = torch._C._pop_torch_function_stack()
        if top is mode:
            break
        above.append(top)
    for m in reversed(above):
        torch._C._push_on_torch_function_stack(m)


def _release_mode(state: _ThreadState) -> None:
    state.mode_users -= 1
    if state.mode_users > 0 or state.mode is None:
        return
    if state is not _state():
        # closed from another thread: torch's mode stacks are per thread, so the mode stays on
        # its own thread's stack, inert (no settings there route nothing) until that thread's
        # next patch scope reuses it and removes it on exit
        return
    mode, state.mode = state.mode, None
    if _get_current_function_mode() is mode:
        mode.__exit__(None, None, None)
    else:
        _remove_mode(mode)


def _acquire(settings: Optional[Settings]) -> _ThreadState:
    state = _state()
    with _lock:
        _acquire_attribute()
        try:
            _acquire_mode(state)
        except BaseException:
            _release_attribute()
            raise
        if settings is not None:
            state.stack.append(settings)
    return state


def _release(settings: Optional[Settings], state: Optional[_ThreadState] = None) -> None:
    state = state if state is not None else _state()
    with _lock:
        try:
            if settings is not None:
                # this scope's entry, wherever it is: scopes may close in any order
                for i in range(len(state.stack) - 1, -1, -1):
                    if state.stack[i] is settings:
                        del state.stack[i]
                        break
            _release_mode(state)
        finally:
            _release_attribute()


class Patch:
    """The scope returned by :func:`patch`; use it in a ``with`` statement."""

    def __init__(self, settings: Settings, program_wide: bool = False) -> None:
        self.settings = settings
        self._program_wide = program_wide
        self._entered = []  # the thread state of each open entry of this scope, innermost last

    def __enter__(self) -> "Patch":
        if self._program_wide:
            raise TypeError(
                "patch(enable=True) already patched the whole program (undo it with attnkern.unpatch()); "
                "use `with attnkern.patch():` for a scope"
            )
        self._entered.append(_acquire(self.settings))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        # exits in any order, on any thread (a generator holding the scope may be closed
        # elsewhere), undo exactly what the matching __enter__ did on its own thread
        if not self._entered:
            raise RuntimeError("attnkern.patch: __exit__ without a matching __enter__")
        here = [i for i, state in enumerate(self._entered) if state is _state()]
        _release(self.settings, self._entered.pop(here[-1] if here else -1))
        return False

    def __repr__(self) -> str:
        kind = "program-wide" if self._program_wide else "scope"
        return f"attnkern.patch({kind}, backend={self.settings.backend!r}, window_size={self.settings.window_size})"


def patch(enable: bool = False, *, backend: str = "auto", window_size: Optional[Tuple[int, int]] = None) -> Patch:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` to attnkern.

    ``with attnkern.patch():`` patches for a scope on the calling thread (nestable,
    restored on exit, exceptions included). ``attnkern.patch(enable=True)`` patches the
    whole program until :func:`unpatch`; calling it again replaces its settings.

    ``backend`` picks attnkern's backend (``"auto"``: the fastest fused one that serves the
    call; calls none serves go to torch). ``window_size=(left, right)`` makes every routed
    call local attention (top-left aligned, intersected with ``is_causal`` and masks).
    Calls attnkern cannot serve run torch's original; see the module docstring for what
    is caught where.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    settings = Settings(check_backend(backend), checked_window(window_size))
    if not enable:
        return Patch(settings)
    global _program, _program_thread, _program_fastpath
    with _lock:
        if _program is None:
            _acquire(None)
            _program_thread = threading.get_ident()
            _program_fastpath = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(False)
        _program = settings
    return Patch(settings, program_wide=True)


def unpatch() -> bool:
    """Undo ``patch(enable=True)``; returns False if the program was not patched.

    Must run on the thread that called ``patch(enable=True)`` (its mode lives there).
    ``with patch()`` scopes still open keep working until they exit.
    """
    global _program, _program_thread, _program_fastpath
    with _lock:
        if _program is None:
            return False
        if threading.get_ident() != _program_thread:
            raise RuntimeError("attnkern.unpatch() must be called on the thread that called patch(enable=True)")
        _release(None)
        torch.backends.mha.set_fastpath_enabled(bool(_program_fastpath))
        _program = None
        _program_thread = None
        _program_fastpath = None
    return True


def is_patched() -> bool:
    """True if F.sdpa calls from this thread currently go through attnkern's router."""
    return _active_settings() is not None
