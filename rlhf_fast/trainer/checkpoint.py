"""Checkpoints that resume exactly and can never be half-written.

Layout of ``output_dir/checkpoint-<step>/``:
    model.safetensors        every trainable tensor of the policy-value model (policy or its LoRA
                             adapters, value head, separate critic), by parameter name
    optimizer.pt scheduler.pt
    rng_state_<rank>.pt      torch / numpy / python RNG states of each rank
    trainer_state.json       transformers TrainerState + rlhf_fast state (data position, KL
                             controller, score moments, skipped-step count) + a run fingerprint
    COMPLETE                 written last, inside the temporary directory, before the rename

The directory is written as ``.tmp-checkpoint-<step>-<pid>`` and renamed into place, so a process
killed while writing leaves the previous checkpoint intact and a stray temp directory that resume
ignores. The frozen reference is not saved: it is rebuilt from its source at start-up, and the
fingerprint's reference checksum proves on resume that it is the same one.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
COMPLETE = "COMPLETE"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "model.safetensors"


def _trainable_state(model) -> dict[str, torch.Tensor]:
    """Trainable tensors by name, shared storage (tied weights) kept once, contiguous CPU copies."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = (p.data_ptr(), p.numel())
        if key in seen:
            continue
        seen.add(key)
        out[name] = p.detach().to("cpu").contiguous().clone()
    return out


def _tensor_checksum(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().to("cpu").contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def run_fingerprint(trainer) -> dict:
    """What must match for a checkpoint to be resumable by this trainer."""
    a = trainer.args
    cfg = trainer.model.policy.config
    ref = getattr(trainer.model, "reference", None)
    if hasattr(ref, "fingerprint_params"):  # sharded under FSDP2: full copies taken before sharding
        ref_params = ref.fingerprint_params()
    else:
        ref_params = [p for _, p in list(ref.model.named_parameters())[:4]] if ref is not None and not ref.is_offloaded else []
    return {
        "model_type": getattr(cfg, "model_type", None),
        "hidden_size": getattr(cfg.get_text_config(), "hidden_size", None),
        "num_hidden_layers": getattr(cfg.get_text_config(), "num_hidden_layers", None),
        "vocab_size": getattr(cfg.get_text_config(), "vocab_size", None),
        "critic": trainer.critic_mode,
        "reference": trainer.reference_mode,
        "reference_checksum": _tensor_checksum(ref_params) if ref_params else None,
        "batch_size": getattr(a, "generation_batch_size", None) or a.batch_size,  # GRPOConfig / PPOConfig
        "num_prompts": len(trainer.prompts),
        "seed": a.seed,
        "trainable_parameters": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
    }


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir) -> list[Path]:
    """Finished checkpoints (COMPLETE present), oldest step first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / COMPLETE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def save_checkpoint(trainer) -> Path | None:
    """Write ``checkpoint-<global_step>`` atomically; keep the newest ``save_total_limit``. Returns its path."""
    from safetensors.torch import save_file

    from rlhf_fast.trainer import distributed

    a = trainer.args
    step = trainer.state.global_step
    out = Path(a.output_dir)
    final = out / f"checkpoint-{step}"
    tmp = out / f".tmp-checkpoint-{step}-{os.getpid()}"
    weights = distributed.full_trainable_state(trainer)  # every rank takes part under FSDP
    # save_only_model (TrainingArguments): the weights and run state only, no optimizer / scheduler / RNG
    only_model = bool(getattr(a, "save_only_model", False))
    optim_state = None if only_model else distributed.full_optimizer_state(trainer)
    rng = _rng_state()
    if trainer.world_size > 1:
        rngs = [None] * trainer.world_size
        torch.distributed.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if trainer.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        if not only_model:
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(trainer.lr_scheduler.state_dict(), tmp / "scheduler.pt")
            for r, s in enumerate(rngs):
                torch.save(s, tmp / f"rng_state_{r}.pt")
        trainer.state.save_to_json(str(tmp / "hf_trainer_state.json"))
        extra = {
            "global_step": step,
            "episode": trainer.state.episode,
            "sampler": trainer.sampler.state_dict(),
            "kl_controller": trainer.kl_ctl.state_dict(),
            "score_moments": trainer.score_moments.state_dict(),
            "nonfinite_steps": trainer.nonfinite_steps,
            "world_size": trainer.world_size,
            "distributed": distributed.strategy_name(trainer),
            "fingerprint": run_fingerprint(trainer),
            "save_only_model": only_model,
        }
        (tmp / STATE_FILE).write_text(json.dumps(extra, indent=1))
        if trainer.tokenizer is not None:
            trainer.tokenizer.save_pretrained(tmp)
        (tmp / COMPLETE).write_text(json.dumps({"step": step}))
        if final.exists():  # re-saving the same step (e.g. at train end): replace it whole
            old = out / f".old-checkpoint-{step}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _rotate(out, a.save_total_limit)
    if trainer.world_size > 1:
        torch.distributed.barrier()
    return final


def _rotate(out: Path, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    ckpts = list_checkpoints(out)
    for p in ckpts[:-limit]:
        shutil.rmtree(p, ignore_errors=True)


def resolve_checkpoint(output_dir, resume_from_checkpoint) -> Path:
    """``True`` -> newest finished checkpoint in output_dir; a path -> that directory (validated)."""
    if resume_from_checkpoint is True:
        ckpts = list_checkpoints(output_dir)
        if not ckpts:
            raise FileNotFoundError(f"resume_from_checkpoint=True but {output_dir} holds no finished checkpoint-*")
        return ckpts[-1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if not (path / COMPLETE).is_file():
        raise ValueError(f"checkpoint {path} is incomplete (no {COMPLETE} marker): it was being written when the "
                         "run stopped; resume from an earlier checkpoint")
    for name in (WEIGHTS_FILE, STATE_FILE):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is missing {name}")
    if json.loads((path / STATE_FILE).read_text()).get("save_only_model"):
        raise ValueError(f"checkpoint {path} was written with save_only_model=True: it holds the weights but no "
                         "optimizer, scheduler or RNG state, so training cannot resume from it (load its "
                         f"{WEIGHTS_FILE} as weights, or save without save_only_model)")
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {path} is missing {name}")
    return path


def resume_trainer(trainer, resume_from_checkpoint) -> Path:
    """Restore weights, optimizer, scheduler, RNG, data position, KL controller and step.

    Every check runs before any weight is touched: fingerprint (model, layout, batch, seed),
    weight names and shapes, file integrity."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from rlhf_fast.trainer import distributed

    path = resolve_checkpoint(trainer.args.output_dir, resume_from_checkpoint)
    extra = json.loads((path / STATE_FILE).read_text())
    saved, current = extra["fingerprint"], run_fingerprint(trainer)
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs this run {current.get(k)!r}"
             for k in current if k != "trainable_parameters" and saved.get(k) != current.get(k)]
    if saved.get("trainable_parameters") != current["trainable_parameters"]:
        diffs.append("trainable parameter names differ (another model, LoRA config or critic layout)")
    if diffs:
        raise ValueError(f"checkpoint {path} does not match this run: " + "; ".join(diffs))
    try:
        weights = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"checkpoint {path}/{WEIGHTS_FILE} is unreadable or truncated: {exc}") from exc
    params = dict(trainer.model.named_parameters())
    for name, t in weights.items():
        if name not in params:
            raise ValueError(f"checkpoint tensor {name} has no parameter in this model")
        if tuple(distributed.full_shape(params[name])) != tuple(t.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(t.shape)}, the model has "
                             f"{tuple(distributed.full_shape(params[name]))}")
    try:
        optim_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        sched_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=False)
        rng_file = path / f"rng_state_{trainer.rank}.pt"
        rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a corrupt checkpoint
        raise ValueError(f"checkpoint {path} has a corrupt optimizer/scheduler/RNG file: {exc}") from exc
    if extra.get("world_size") != trainer.world_size and rng is None:
        raise ValueError(f"checkpoint {path} was saved with world size {extra.get('world_size')}; "
                         f"this run has {trainer.world_size} ranks and rank {trainer.rank} has no RNG state")

    # ---- all checks passed: now restore
    distributed.load_full_trainable_state(trainer, weights)
    distributed.load_full_optimizer_state(trainer, optim_state)
    trainer.lr_scheduler.load_state_dict(sched_state)
    if rng is not None:
        _set_rng_state(rng)
    from transformers import TrainerState

    hf_state = TrainerState.load_from_json(str(path / "hf_trainer_state.json"))
    trainer.state.global_step = extra["global_step"]
    trainer.state.episode = extra["episode"]
    trainer.state.log_history = hf_state.log_history
    trainer.state.epoch = hf_state.epoch
    trainer.sampler.load_state_dict(extra["sampler"])
    trainer.kl_ctl.load_state_dict(extra["kl_controller"])
    trainer.score_moments.load_state_dict(extra["score_moments"])
    trainer.nonfinite_steps = extra["nonfinite_steps"]
    return path
