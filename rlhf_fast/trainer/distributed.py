"""torch.distributed plumbing for the trainers: DDP or FSDP2 wrapping and full (unsharded) state.

No home-made engine: DDP is ``torch.nn.parallel.DistributedDataParallel``; FSDP2 is
``torch.distributed.fsdp.fully_shard`` applied to each decoder layer, then to the root. State
goes through ``torch.distributed.checkpoint.state_dict`` with full, CPU-offloaded state dicts keyed
by parameter name, so a checkpoint written under FSDP2 loads under DDP (or in one process) and the
other way round.
"""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp2")


def dist_ready(group=None) -> bool:
    """True when a process group is initialised (torchrun); every reduction below is a no-op otherwise."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist_ready():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def limit_threads_per_rank(world_size: int) -> None:
    """One share of the cores per local rank: oversubscribed ranks make steps 10-20x slower."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def all_reduce_max(t: torch.Tensor, group=None) -> torch.Tensor:
    """Elementwise max over ranks (a no-op without a process group). Returns a new tensor."""
    t = t.clone()
    if dist_ready(group):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=group)
    return t


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """Sum over ranks (a no-op without a process group). Returns a new tensor."""
    t = t.clone()
    if dist_ready(group):
        torch.distributed.all_reduce(t, group=group)
    return t


def init_from_env(backend: str | None = None, timeout: float | None = None) -> bool:
    """Initialise the default process group when launched by torchrun (RANK/WORLD_SIZE set).

    gloo on CPU, nccl on CUDA; ``timeout`` in seconds (TrainingArguments.ddp_timeout). Returns True when a
    group exists afterwards."""
    if not torch.distributed.is_available():
        return False
    if torch.distributed.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=float(timeout))}
    torch.distributed.init_process_group(backend=backend, **kwargs)
    return True


def strategy_name(trainer) -> str:
    if trainer.world_size == 1:
        return "single"
    return trainer.args.distributed_strategy


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks of a causal LM (Llama/Qwen2/Mistral ``layers``, GPT-2 ``h``)."""
    for mod in model.modules():
        for attr in ("layers", "h"):
            seq = getattr(mod, attr, None)
            if isinstance(seq, nn.ModuleList) and len(seq) > 0:
                return list(seq)
    raise ValueError(f"could not find the decoder layers of {type(model).__name__} to shard with FSDP2")


def wrap_model(model: nn.Module, args, device) -> nn.Module:
    """DDP- or FSDP2-wrap ``model`` (a PolicyValueModel) for training; returns the module to call."""
    strategy = getattr(args, "distributed_strategy", "ddp")
    if strategy not in STRATEGIES:
        raise ValueError(f"distributed_strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        return DDP(model, device_ids=ids, find_unused_parameters=False)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(model.policy):
        fully_shard(layer)
    if getattr(model, "critic_backbone", None) is not None:
        for layer in decoder_layers(model.critic_backbone):
            fully_shard(layer)
    fully_shard(model)
    # Generation and scoring call the HF model and its layers directly, not the root's forward.
    # FSDP2 picks its root lazily at the first root forward and refuses layers that initialised
    # first, so initialise from the root now (private API; stable across torch 2.6-2.13).
    model._get_fsdp_state()._lazy_init()
    return model


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Gather an FSDP2 module's parameters for calls that bypass its forward hooks (a no-op otherwise)."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        yield model
        return
    mods = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.unshard()
    try:
        yield model
    finally:
        for m in mods:
            m.reshard()


def is_fsdp(trainer) -> bool:
    return strategy_name(trainer) == "fsdp2"


def full_shape(p: torch.Tensor) -> torch.Size:
    """The unsharded shape of a parameter (a DTensor under FSDP2)."""
    return p.shape  # DTensor.shape is the global shape


def _options(full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def _trainable_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def full_trainable_state(trainer) -> dict[str, torch.Tensor]:
    """Every trainable tensor, unsharded, on CPU, keyed by parameter name (collective under FSDP2)."""
    model = trainer.model
    names = _trainable_names(model)
    if is_fsdp(trainer):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        sd = get_model_state_dict(model, options=_options())
    else:
        sd = {n: p.detach() for n, p in model.named_parameters()}
    out, seen = {}, set()
    for n, t in sd.items():
        if n not in names:
            continue
        key = (t.data_ptr(), t.numel()) if not is_fsdp(trainer) else (n,)
        if key in seen:  # tied weights: store once
            continue
        seen.add(key)
        out[n] = t.detach().to("cpu").contiguous().clone()
    return out


def load_full_trainable_state(trainer, weights: dict[str, torch.Tensor]) -> None:
    model = trainer.model
    if is_fsdp(trainer):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, weights, options=_options_load())
        return
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def _options_load():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, strict=False)


def full_optimizer_state(trainer) -> dict:
    """Optimizer state keyed by parameter name (portable across DDP, FSDP2 and one process)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(trainer.model, trainer.optimizer, options=_options())


def load_full_optimizer_state(trainer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(trainer.model, trainer.optimizer, state, options=_options_load())


# =============================================================================== frozen models under FSDP2
def shard_frozen(module: nn.Module, offload: bool = False) -> nn.Module:
    """FSDP2-shard a frozen model (reference or reward): each decoder layer, then the root group
    (embeddings, final norm, heads). Its memory per rank drops to 1/world_size of its weights plus one
    gathered layer at a time. offload: keep the shards in host memory (FSDP2's CPUOffloadPolicy; CUDA)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs = {"offload_policy": CPUOffloadPolicy(pin_memory=True)} if offload and torch.cuda.is_available() else {}
    for layer in decoder_layers(module):
        fully_shard(layer, **kwargs)
    fully_shard(module, **kwargs)
    # Callers run the backbone and read head weights directly, not the root forward: initialise the
    # root now (as wrap_model does) so layers never become roots themselves.
    module._get_fsdp_state()._lazy_init()
    return module


@contextlib.contextmanager
def root_gathered(module: nn.Module):
    """All-gather only the root group of a sharded frozen model (embeddings, norm, heads) for a call
    that bypasses the root forward; decoder layers gather themselves in their pre-forward hooks."""
    module.unshard()
    try:
        yield module
    finally:
        module.reshard()


def _fingerprint_tensors(model: nn.Module, n: int = 4) -> list[torch.Tensor]:
    return [p.detach().clone() for _, p in list(model.named_parameters())[:n]]


class ShardedReference:
    """A ``FrozenReference`` whose weights are FSDP2-sharded across ranks.

    Same interface as FrozenReference (``model``, ``backbone``, ``lm_head``, ``onload``, ``offload``):
    the policy-value model calls ``onload`` before a reference forward and ``offload`` after it (its
    ``auto_offload`` is True), which here gather and release the root group; the layers gather one at
    a time in their hooks. ``fingerprint_params`` keeps a full copy of the first tensors, taken before
    sharding, so a checkpoint's reference checksum is the same under DDP, FSDP2 or one process.
    """

    auto_offload = True

    def __init__(self, reference, offload: bool = False):
        self._fingerprint = _fingerprint_tensors(reference.model)
        reference.onload()  # a host-parked reference comes back before its weights are split
        self.model = shard_frozen(reference.model, offload=offload)
        self.backbone, self.lm_head = reference.backbone, reference.lm_head
        self.dtype = reference.dtype
        self.device = reference.device
        self._gathered = False

    @property
    def is_offloaded(self) -> bool:
        return not self._gathered

    def fingerprint_params(self) -> list[torch.Tensor]:
        return self._fingerprint

    def resident_bytes(self) -> int:
        """Bytes of this rank's shards (plus the root group while it is gathered)."""
        return sum(_local(p).numel() * p.element_size() for p in self.model.parameters())

    def onload(self, device=None) -> None:
        if not self._gathered:
            self.model.unshard()
            self._gathered = True

    def offload(self) -> None:
        if self._gathered:
            self.model.reshard()
            self._gathered = False

    def __repr__(self) -> str:
        return f"ShardedReference({type(self.model).__name__}, dtype={self.dtype})"


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


class ShardedReward:
    """A ``ModelReward`` whose sequence-classification model is FSDP2-sharded across ranks: every
    scoring call gathers the root group (embeddings, norm, score head) around the adapter's own call.
    Other attributes (``tokenizer``, ``model``, ``device``) pass through to the adapter."""

    def __init__(self, reward, offload: bool = False):
        self.inner = reward
        shard_frozen(reward.model, offload=offload)

    def __call__(self, *args, **kwargs):
        with root_gathered(self.inner.model):
            return self.inner(*args, **kwargs)

    def score_ids(self, *args, **kwargs):
        with root_gathered(self.inner.model):
            return self.inner.score_ids(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def shard_frozen_models(trainer) -> None:
    """Under FSDP2, shard the frozen reference and the reward model too (not only the trainable model),
    so no rank holds a full copy of either. A callable reward or reference='lora'/'none' is left as is."""
    from rlhf_fast.models import FrozenReference

    offload = bool(getattr(trainer.args, "reference_offload", False))
    ref = getattr(trainer.model, "reference", None)
    if isinstance(ref, FrozenReference):
        trainer.model.reference = ShardedReference(ref, offload=offload)
    reward_model = getattr(trainer.reward, "model", None)
    if isinstance(reward_model, nn.Module) and hasattr(trainer.reward, "score_ids"):
        trainer.reward = ShardedReward(trainer.reward)
