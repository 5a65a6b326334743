"""Count what a piece of code asks of the device: tensor ops, host synchronisations, Triton launches.

``count_ops()`` is a context manager. Inside it every aten op that reaches PyTorch's dispatcher and every
Triton kernel launch is counted, so a test or a benchmark can say how many ops one decode step issues and
whether any of them would make the host wait for the GPU, on any machine: on the CPU the same ops run, and
an op that synchronises on CUDA (``.item()``, ``nonzero``, a boolean mask index, ...) is counted as a sync
there too.

Example::

    >>> import torch
    >>> from twilight.diagnostics import count_ops
    >>> x = torch.arange(6.0)
    >>> with count_ops() as c:
    ...     y = x.view(2, 3).t()     # two views: no work
    ...     s = (y * 2).sum()        # two ops
    ...     n = int(s)               # the host reads a device value: one sync
    ...     pos = x[x > 2]           # boolean mask: output size depends on the data, one sync
    >>> c.ops, c.syncs, c.views, c.launches
    (5, 2, 2, 0)
    >>> sorted(c.by_op)
    ['aten._local_scalar_dense', 'aten.gt', 'aten.index', 'aten.mul', 'aten.sum']
    >>> [op for op, where in c.sync_sites]
    ['aten._local_scalar_dense', 'aten.index']
    >>> print(c.summary())  # doctest: +ELLIPSIS
    5 ops, 2 syncs, 0 Triton launches (2 views, 0 allocations not counted as ops)
    most frequent ops: ...
    sync: aten._local_scalar_dense at ...
    sync: aten.index at ...

What is counted:

- ``ops``: aten ops that do work (compute, copy or fill memory), after composite ops such as ``reshape``,
  ``contiguous``, ``item`` or ``repeat_interleave(int)`` are decomposed into what they run (so the counts
  are the same with and without ``torch.inference_mode()``). ``by_op`` counts them by name
  (``aten.<op>``, overload dropped); ``sum(by_op.values()) == ops``.
- ``views``: metadata-only ops (``view``, ``select``, ``slice``, ``expand``, ``transpose``, ``permute``,
  ``unsqueeze``, ``as_strided``, ``detach``, ``alias``, ``split``/``unbind``/``chunk`` and every other op
  whose schema says its output aliases its input without writing, plus ``_unsafe_view``, ``detach_`` and
  the in-place metadata ops ``squeeze_``/``unsqueeze_``/``t_``/``transpose_``/``as_strided_``), in
  ``by_view``. They launch nothing.
- ``allocs``: uninitialised allocations (``empty``, ``empty_strided``, ``empty_like``, ``new_empty``...):
  no kernel runs (the caching allocator), so they are neither ops nor views.
- ``syncs``: ops that make the host wait for the device on CUDA: a scalar read (``aten._local_scalar_dense``:
  ``item()``, ``int()``, ``bool()``, ``float()`` of a tensor), ``tolist()`` and ``numpy()``, ops whose
  output size depends on the data (``nonzero``, ``masked_select``, ``index``/``index_put_`` with a boolean
  index, ``unique*``, ``repeat_interleave`` of a repeats tensor without ``output_size``, ``bincount``,
  ``equal``), and blocking copies between the CPU and a device (device to CPU unless ``non_blocking``, CPU
  to device unless ``non_blocking``: CUDA's ``memcpy_and_sync`` waits for the stream either way). A sync op
  is also counted in ``ops``. ``sync_sites`` lists ``SyncSite(op, where)`` for each, ``where`` being the
  innermost stack frame inside the ``twilight`` package (``"twilight/pipeline.py:97 in prune"``), followed by
  ``" > "`` and the innermost frame of the code that ran the op when that is not twilight's (e.g. transformers
  called from a patched forward), or only the latter when no twilight code is on the stack.
  With ``cpu_syncs=False`` only syncs whose tensors live on a device (not the CPU) are counted, plus the
  cross-device copies: use it on a GPU, where a scalar read of a CPU tensor waits for nothing.
- ``launches``: Triton kernel launches (``kernel[grid](...)``), compiled on a GPU or run by the CPU
  interpreter (``TRITON_INTERPRET=1``), by kernel name in ``by_kernel``. The torch ops that Triton's
  interpreter runs to emulate a launch are not counted. An autotuned kernel counts every launch its
  autotuner makes.

Threads: ops are counted on the thread that entered the block (dispatch modes are per thread); Triton
launches on any thread while the block is open (the hook is process-wide).

Not seen: ops that never reach the dispatcher (``tensor.cpu()`` of a CPU tensor, reading ``tensor.shape``),
and CUDA calls made outside aten and Triton (e.g. a C++ extension's own kernels, FlashInfer's): the CUDA
backends' launches are not counted, only their aten ops.
"""
from __future__ import annotations

import os
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["count_ops", "OpCounts", "SyncSite"]

# Metadata-only ops whose schema does not mark them as views (or marks them as in-place writes).
_METADATA_OPS = {
    "aten._unsafe_view", "aten.detach_", "aten.squeeze_", "aten.unsqueeze_", "aten.t_", "aten.transpose_",
    "aten.as_strided_", "aten._reshape_alias", "aten.sym_size", "aten.sym_stride", "aten.sym_numel",
    "aten.sym_storage_offset", "aten.size", "aten.stride", "aten.dim", "aten.is_contiguous", "aten.numel",
    "aten.is_same_size", "aten.is_pinned", "prim.device", "prim.layout",
}
_ALLOC_OPS = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.new_empty_strided",
              "aten.empty_permuted"}
# Ops whose output the host must read, or whose output size depends on the data, on CUDA.
_SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten._unique", "aten._unique2",
             "aten.unique_dim", "aten.unique_consecutive", "aten.unique_dim_consecutive", "aten.bincount",
             "aten.equal", "aten.nonzero_numpy"}
_BOOL_INDEX_OPS = {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl",
                   "aten._index_put_impl_", "aten._unsafe_index_put"}
_COPY_OPS = {"aten._to_copy", "aten.copy_", "aten.copy", "aten._copy_from", "aten._copy_from_and_resize"}

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_PKG_PARENT = os.path.dirname(_PKG_DIR)
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_STDLIB_DIR = os.path.dirname(os.path.abspath(os.__file__))


class SyncSite(NamedTuple):
    """One synchronising op: its name and where it was called from (``"twilight/x.py:12 in f"``)."""

    op: str
    where: str


@dataclass
class OpCounts:
    """What ran inside one ``count_ops()`` block (see the module docstring for what each field counts)."""

    ops: int = 0
    syncs: int = 0
    launches: int = 0
    views: int = 0
    allocs: int = 0
    by_op: Counter = field(default_factory=Counter)
    by_view: Counter = field(default_factory=Counter)
    by_kernel: Counter = field(default_factory=Counter)
    sync_sites: list = field(default_factory=list)
    cpu_syncs: bool = True

    def as_dict(self) -> dict:
        """A JSON-ready summary (counters as plain dicts, sync sites as ``[op, where]`` pairs)."""
        return {"ops": self.ops, "syncs": self.syncs, "launches": self.launches, "views": self.views,
                "allocs": self.allocs, "by_op": dict(self.by_op.most_common()),
                "by_kernel": dict(self.by_kernel.most_common()),
                "sync_sites": [list(s) for s in self.sync_sites]}

    def summary(self, top: int = 8) -> str:
        """One paragraph for a test failure or a log: totals, the most frequent ops, every sync site."""
        lines = [f"{self.ops} ops, {self.syncs} syncs, {self.launches} Triton launches "
                 f"({self.views} views, {self.allocs} allocations not counted as ops)"]
        if self.by_op:
            lines.append("most frequent ops: " + ", ".join(f"{k} x{v}" for k, v in self.by_op.most_common(top)))
        if self.by_kernel:
            lines.append("kernels: " + ", ".join(f"{k} x{v}" for k, v in self.by_kernel.most_common()))
        for site, n in Counter(self.sync_sites).most_common():
            lines.append(f"sync: {site.op} at {site.where}" + (f" (x{n})" if n > 1 else ""))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ call sites
def _where(depth: int = 2) -> str:
    """Where an op was called from: the innermost frame in the twilight package (not this module) and, when the op
    came from code deeper than that (transformers, a test), that code's innermost frame too
    (``"twilight/integrations/hf/patching.py:120 in forward > transformers/masking_utils.py:88 in f"``); without
    any twilight frame on the stack, the innermost frame outside torch and the standard library."""
    frame = sys._getframe(depth)
    inner = None
    while frame is not None:
        path = _path(frame)
        if path != _THIS_FILE:
            if path.startswith(_PKG_DIR + os.sep):
                here = _fmt_frame(frame, path)
                return here if inner is None else f"{here} > {_fmt_frame(inner, _path(inner))}"
            if inner is None and not _is_library(path):
                inner = frame
        frame = frame.f_back
    return "?" if inner is None else _fmt_frame(inner, _path(inner))


def _path(frame) -> str:
    name = frame.f_code.co_filename
    return name if name.startswith("<") else os.path.abspath(name)


def _is_library(path: str) -> bool:
    """torch's own frames and the standard library's (contextlib, functools, ...): never the op's author."""
    if path.startswith(_TORCH_DIR + os.sep):
        return True
    return path.startswith(_STDLIB_DIR + os.sep) and "site-packages" not in path and "dist-packages" not in path


def _fmt_frame(frame, path: str) -> str:
    if path.startswith(_PKG_DIR + os.sep):
        path = os.path.relpath(path, _PKG_PARENT)
    else:
        for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
            if marker in path:
                path = path.split(marker, 1)[1]
                break
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


# ------------------------------------------------------------------------------------------ classification
def _op_name(func) -> str:
    packet = getattr(func, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or str(func).split(".")[-2]
    ns = getattr(func, "namespace", "aten")
    return f"{ns}.{name}"


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)
    elif isinstance(x, dict):
        for y in x.values():
            yield from _tensors(y)


def _has_bool_index(indices) -> bool:
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in (indices or ()))


def _copy_sync(name: str, args, kwargs) -> bool | None:
    """For a copy op: True if it is a blocking copy between the CPU and a device; None if not a copy."""
    if name == "aten._to_copy":
        src = args[0]
        dst_dev = kwargs.get("device")
        if dst_dev is None:
            return False
        src_type, dst_type = src.device.type, torch.device(dst_dev).type
        non_blocking = bool(kwargs.get("non_blocking", False))
    elif name in ("aten.copy_", "aten.copy"):
        dst, src = args[0], args[1]
        if not isinstance(src, torch.Tensor):
            return False
        src_type, dst_type = src.device.type, dst.device.type
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    elif name in _COPY_OPS:
        src_type, dst_type = args[0].device.type, args[1].device.type
        non_blocking = bool(args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
    else:
        return None
    if src_type == dst_type or "meta" in (src_type, dst_type):
        return False
    return not non_blocking


def _is_sync(name: str, args, kwargs, cpu_syncs: bool) -> bool:
    copy = _copy_sync(name, args, kwargs)
    if copy is not None:
        return copy
    if name in _SYNC_OPS:
        hit = True
    elif name in _BOOL_INDEX_OPS:
        hit = _has_bool_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    elif name == "aten.repeat_interleave":
        # repeat_interleave.Tensor(repeats, *, output_size=None); .self_Tensor(self, repeats, dim, output_size)
        # decomposes into it. With an int repeats the op is a view + copy and never gets here.
        hit = kwargs.get("output_size") is None and not (len(args) > 3 and args[3] is not None)
    else:
        return False
    if not hit:
        return False
    if cpu_syncs:
        return True
    return any(t.device.type not in ("cpu", "meta") for t in _tensors((args, kwargs)))


# ------------------------------------------------------------------------------------------ the modes
class _State:
    """Shared by the dispatch mode, the function mode and the Triton hook of one ``count_ops`` block."""

    def __init__(self, counts: OpCounts):
        self.counts = counts
        self.quiet = 0  # > 0 inside a Triton launch (the interpreter's own torch ops) or a counted tolist()

    def sync(self, name: str) -> None:
        self.counts.syncs += 1
        self.counts.sync_sites.append(SyncSite(name, _where(3)))


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        state = self.state
        if state.quiet:
            return func(*args, **kwargs)
        # Composite ops (seen as such under inference_mode) are counted as the ops they run.
        with self:
            out = func.decompose(*args, **kwargs)
        if out is not NotImplemented:
            return out
        c = state.counts
        name = _op_name(func)
        if name in _ALLOC_OPS:
            c.allocs += 1
        elif getattr(func, "is_view", False) or name in _METADATA_OPS:
            c.views += 1
            c.by_view[name] += 1
        else:
            c.ops += 1
            c.by_op[name] += 1
            if _is_sync(name, args, kwargs, c.cpu_syncs):
                state.sync(name)
        return func(*args, **kwargs)


_HOST_READS = {torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}


class _FunctionCounter(TorchFunctionMode):
    """``tolist()``/``numpy()`` read a CPU tensor without any aten op: counted here (on CUDA, as one sync
    instead of the device-to-host copy they run)."""

    def __init__(self, state: _State):
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _HOST_READS.get(func)
        if what is None or self.state.quiet:
            return func(*args, **kwargs)
        t = args[0] if args else None
        if isinstance(t, torch.Tensor) and (self.state.counts.cpu_syncs or t.device.type not in ("cpu", "meta")):
            self.state.sync(f"Tensor.{what}")
        self.state.quiet += 1
        try:
            return func(*args, **kwargs)
        finally:
            self.state.quiet -= 1


# ------------------------------------------------------------------------------------------ Triton hook
_ACTIVE: list[_State] = []
_LOCK = threading.Lock()
_PATCHED: dict = {}  # class -> original run


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "fn", None)
    return getattr(fn, "__name__", None) or getattr(kernel, "__name__", None) or type(kernel).__name__


def _wrap_run(original):
    def run(self, *args, grid, warmup=False, **kwargs):
        if warmup or not _ACTIVE:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        states = list(_ACTIVE)
        name = _kernel_name(self)
        for st in states:
            if not st.quiet:
                st.counts.launches += 1
                st.counts.by_kernel[name] += 1
            st.quiet += 1
        try:
            return original(self, *args, grid=grid, warmup=warmup, **kwargs)
        finally:
            for st in states:
                st.quiet -= 1

    run.__twilight_launch_hook__ = True
    return run


def _triton_launchers() -> list[type]:
    """The classes whose ``run`` is one kernel launch: the compiled ``JITFunction`` and the interpreter's."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction

        classes.append(JITFunction)
    except Exception:  # noqa: BLE001 - no (working) triton: nothing to hook
        return []
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except Exception:  # noqa: BLE001 - older triton without the interpreter
        pass
    return classes


def _install(state: _State) -> None:
    with _LOCK:
        if not _ACTIVE:
            for cls in _triton_launchers():
                if "run" in cls.__dict__ and not getattr(cls.__dict__["run"], "__twilight_launch_hook__", False):
                    _PATCHED[cls] = cls.__dict__["run"]
                    cls.run = _wrap_run(cls.__dict__["run"])
        _ACTIVE.append(state)


def _uninstall(state: _State) -> None:
    with _LOCK:
        _ACTIVE.remove(state)
        if not _ACTIVE:
            for cls, original in _PATCHED.items():
                cls.run = original
            _PATCHED.clear()


def triton_hook_installed() -> bool:
    """Whether Triton's launchers are wrapped right now (inside a ``count_ops`` block, with triton installed)."""
    return bool(_PATCHED)


@contextmanager
def count_ops(cpu_syncs: bool = True) -> Iterator[OpCounts]:
    """Count the aten ops, host syncs and Triton launches of the code inside the block.

    Args:
        cpu_syncs: also count scalar reads and data-dependent ops on CPU tensors as syncs (the default: on the
            CPU they stand for what the same code does on a GPU). Pass ``False`` on a GPU to count only syncs
            on device tensors and copies between the CPU and the device.
    Yields:
        an ``OpCounts``, filled in as the block runs.
    """
    counts = OpCounts(cpu_syncs=cpu_syncs)
    state = _State(counts)
    _install(state)
    try:
        with _FunctionCounter(state), _DispatchCounter(state):
            yield counts
    finally:
        _uninstall(state)
