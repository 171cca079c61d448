"""Allocation tracker: a TorchDispatchMode that records the bytes of every tensor an op creates.

Independent of any allocator (CPU, CUDA, or the Triton interpreter), it proves memory claims such
as "no backend of the fused log-prob op creates a tensor larger than chunk x V elements" (the tests
and benchmarks), and it counts the bytes of the measured PPO micro-step of ``rlhf-fast memory
--measure`` (``StorageTracker``, ``rlhf_fast.memory.micro_step``). It
sees tensors created by aten ops dispatched inside the block (including inside autograd
backward); a C++ or Triton kernel writes into tensors the Python wrapper allocated through aten,
so those are seen too.

    with AllocationTracker() as t:
        loss = f(x); loss.backward()
    t.max_numel, t.peak_live_bytes, t.total_bytes

``SavedTensorCounter`` counts what autograd keeps for backward instead (saved-tensor hooks): the
activation bytes of a forward, the number the fused backbone ops are judged by.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# Ops that return views or reuse storage: they create no new bytes.
_NO_ALLOC_TAGS = ("view", "alias")


@dataclass
class Allocation:
    op: str
    shape: tuple
    dtype: torch.dtype
    nbytes: int


class AllocationTracker(TorchDispatchMode):
    """Records every new tensor storage created inside the ``with`` block.

    Attributes after the block: ``allocations`` (list of Allocation), ``max_numel`` and
    ``max_bytes`` (largest single tensor), ``total_bytes`` (sum of all), ``peak_live_bytes``
    (high-water mark of tracked tensors still alive; a tensor counts as freed when its first
    tracked owner is collected, so views kept past it make this a slight under-estimate).
    """

    def __init__(self):
        super().__init__()
        self.allocations: list[Allocation] = []
        self._live = 0
        self.peak_live_bytes = 0
        self._seen_storages: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        in_storages = set()
        for a in tree_flatten((args, kwargs))[0]:
            if isinstance(a, torch.Tensor):
                try:
                    in_storages.add(a.untyped_storage().data_ptr())
                except Exception:  # noqa: BLE001 - sparse / meta-less corner cases
                    pass
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            try:
                st = t.untyped_storage()
            except Exception:  # noqa: BLE001
                continue
            key = st.data_ptr()
            if key in in_storages or (key in self._seen_storages and key != 0):
                continue  # a view or in-place result: no new memory
            nbytes = st.nbytes()
            self._seen_storages.add(key)
            self.allocations.append(Allocation(str(func), tuple(t.shape), t.dtype, nbytes))
            self._live += nbytes
            self.peak_live_bytes = max(self.peak_live_bytes, self._live)
            # The tensor object lives as long as any C++ owner holds it (PyObject preservation).
            weakref.finalize(t, self._freed, nbytes, key)
        return out

    def _freed(self, nbytes: int, key: int) -> None:
        self._live -= nbytes
        self._seen_storages.discard(key)

    @property
    def max_bytes(self) -> int:
        return max((a.nbytes for a in self.allocations), default=0)

    @property
    def max_numel(self) -> int:
        return max((a.nbytes // a.dtype.itemsize if a.dtype.itemsize else 0 for a in self.allocations), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(a.nbytes for a in self.allocations)

    def largest(self, k: int = 5) -> list[Allocation]:
        return sorted(self.allocations, key=lambda a: -a.nbytes)[:k]


class StorageTracker(AllocationTracker):
    """AllocationTracker that also remembers which storage (data pointer) each recorded allocation made,
    so the bytes of tensors still held at the end (parameters, gradients, optimizer state) can be
    summed from the tracker's own records: autograd-created gradients have no long-lived Python
    object, so the base class's live counter does not see them."""

    def __init__(self):
        super().__init__()
        self.created: dict[int, int] = {}  # data_ptr -> nbytes of the newest allocation there

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        n = len(self.allocations)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if len(self.allocations) > n:
            for t in tree_flatten(out)[0]:
                if hasattr(t, "untyped_storage"):
                    st = t.untyped_storage()
                    if st.data_ptr() != 0:
                        self.created[st.data_ptr()] = st.nbytes()
        return out

    def bytes_of(self, tensors) -> int:
        """Recorded bytes of the distinct storages behind ``tensors`` (ones it did not see count 0)."""
        ptrs = {t.untyped_storage().data_ptr() for t in tensors if t is not None}
        return sum(self.created.get(p, 0) for p in ptrs)


def _identity(t):
    return t


class SavedTensorCounter:
    """Bytes autograd saves for backward inside the ``with`` block, via ``saved_tensors_hooks``.

    Each distinct storage counts once, at its full size (a saved view of a larger tensor keeps all of
    it alive); storages of ``exclude`` (e.g. ``model.parameters()``) are not counted. Inputs saved by
    the first op count like any other tensor. After the block: ``bytes`` and ``storages`` (data
    pointer -> bytes).

    The pack hook returns every tensor unchanged and says so with ``keeps_tensors = True``: code that
    replaces a saved tensor with a recipe to rebuild it only beneath such hooks (the fused backbone's
    SwiGLU product, rlhf_fast.models.patching) still does so while it is counted, and the count shows it.
    """

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = None

    def __enter__(self):
        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() != 0 and st.data_ptr() not in self._exclude:
                self.storages[st.data_ptr()] = st.nbytes()
            return t

        pack.keeps_tensors = True
        self._hooks = torch.autograd.graph.saved_tensors_hooks(pack, _identity)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)
        return False

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


__all__ = ["Allocation", "AllocationTracker", "StorageTracker", "SavedTensorCounter"]
