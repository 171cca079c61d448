"""The trainers' construction-time decisions as functions: the policy-value layout, the reward adapter,
TRL's batch arithmetic, and the runtime / optimizer / state set-up PPOTrainer and GRPOTrainer share. Each
returns what it decided (the last two set it on the trainer)."""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from rlhf_fast.models import PolicyValueModel, make_reward

__all__ = ["ModelLayout", "build_policy_value", "build_reward", "decide_gradient_checkpointing", "load_classifier",
           "reference_dtype",
           "BatchPlan", "plan_batches", "new_trainer_state", "resolve_stop_token", "has_active_dropout",
           "setup_runtime", "setup_training"]


class ModelLayout(NamedTuple):
    model: PolicyValueModel
    reference_mode: str  # "frozen" | "lora" | "none"
    critic_mode: str  # "shared" | "separate" | "none"


def reference_dtype(choice: str, source) -> torch.dtype:
    """``reference_dtype`` config choice -> torch dtype; "auto" keeps ``source``'s dtype (fp32 otherwise)."""
    if choice == "auto":
        dt = getattr(source, "dtype", None)
        return dt if isinstance(dt, torch.dtype) and dt in (torch.float32, torch.bfloat16, torch.float16) \
            else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[choice]


def load_classifier(model_or_path):
    """A sequence-classification model (num_labels=1) from a local directory; modules and None pass through."""
    if model_or_path is None or isinstance(model_or_path, nn.Module):
        return model_or_path
    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForSequenceClassification

        if not os.path.isdir(model_or_path):
            raise FileNotFoundError(
                f"reward/value model path {os.fspath(model_or_path)!r} is not a local directory (rlhf_fast "
                "loads models from local directories or in-memory objects)")
        return AutoModelForSequenceClassification.from_pretrained(model_or_path, num_labels=1)
    return model_or_path


def build_policy_value(args, model, ref_model, value_model, peft_config, tokenizer,
                       note: Callable[[str], None], *, prompt_len: int = 1, device=None,
                       world_size: int = 1) -> ModelLayout:
    """The policy-value layout PPOConfig asks for: critic "shared" / "separate" / "none" (from the
    estimator's spec when "auto"), reference "frozen" / "lora" / "none" (when "auto": "lora" with
    peft_config or a peft model, whose ``ref_adapter_name`` adapter is then the reference, as TRL's; "none" for a critic-free estimator with kl_coef == 0, as TRL GRPO builds no reference at
    beta 0; else "frozen", as TRL 1.12's PPO always has one and logs the KL even at kl_coef 0), and gradient
    checkpointing (``decide_gradient_checkpointing``). ``note`` receives one line per decision a user
    should see."""
    critic = args.critic
    if not args.uses_critic:
        if value_model is not None:
            raise ValueError(
                f"value_model given with advantage_estimator={args.advantage_estimator!r}: the critic-free "
                "estimators build no value model; pass value_model=None (or use advantage_estimator='gae')")
        critic = "none"
        note(f"advantage_estimator={args.advantage_estimator!r}: no critic is built (critic='none'), "
             f"{args.num_generations} responses per prompt")
    elif critic == "auto":
        critic = "separate" if value_model is not None else "shared"
    if critic == "shared" and value_model is not None:
        note("critic='shared': the value head sits on the policy backbone; the value_model passed "
             "to PPOTrainer is not trained (set critic='separate' to train it as the critic)")
    elif critic == "shared":
        note("critic='shared': one backbone for policy and value (value head on the policy)")
    reference = args.reference
    if reference == "auto":
        critic_free_without_kl = args.kl_coef == 0 and ref_model is None and not args.uses_critic
        has_adapters = peft_config is not None or (ref_model is None and hasattr(model, "peft_config"))
        reference = "lora" if has_adapters else ("none" if critic_free_without_kl else "frozen")
    if peft_config is not None and reference != "lora":
        raise ValueError(f"peft_config given with reference={reference!r}: LoRA training uses reference='lora'")
    if reference == "none" and args.kl_coef != 0:
        raise ValueError(f"reference='none' but kl_coef={args.kl_coef}: set kl_coef=0 or use a reference")
    ref_dtype = reference_dtype(args.reference_dtype, ref_model if ref_model is not None else model)
    checkpointing = decide_gradient_checkpointing(args, model, critic=critic, reference=reference,
                                                  prompt_len=prompt_len, device=device, world_size=world_size,
                                                  note=note)
    reference_model = None
    if ref_model is not None and reference == "frozen":
        from rlhf_fast.models import load_causal_lm

        # TRL's ref_model is used in place (cast to the reference dtype, frozen): the script holds it anyway,
        # so a copy would double its bytes (PPOTrainer refuses the policy object itself as ref_model).
        reference_model = load_causal_lm(ref_model)
    pv = PolicyValueModel(
        model, reference=reference, critic=critic,
        critic_model=load_classifier(value_model) if critic == "separate" else None,
        vf_coef=1.0,  # the trainer weights the value loss itself: loss = pg + vf_coef * vf (TRL)
        lora_config=peft_config, reference_dtype=ref_dtype, reference_offload=args.reference_offload,
        gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
        tokenizer=tokenizer, model_adapter_name=args.model_adapter_name, ref_adapter_name=args.ref_adapter_name,
        fused_backbone=args.fused_backbone, reference_model=reference_model,
        temperature=max(args.temperature, 1e-7),
    )
    if pv.patch_report is not None and not pv.patch_report.patched:
        note(f"fused_backbone: {pv.patch_report}")
    if args.padding_free:
        for line in pv.enable_padding_free():
            note(f"padding_free: {line}")
    return ModelLayout(pv, reference, critic)


def decide_gradient_checkpointing(args, model, *, critic: str, reference: str, prompt_len: int, device=None,
                                  world_size: int = 1, note: Callable[[str], None] = print) -> bool:
    """``args.gradient_checkpointing`` when it is True or False; for None, on only when the memory predictor
    puts one step above 90% of the memory free on ``device`` without recompute (the decision is noted).

    Recompute changes time and memory, never the numbers. ``model``: the policy (module, or a local
    directory / preset name whose config the predictor reads)."""
    if args.gradient_checkpointing is not None:
        return bool(args.gradient_checkpointing)
    from rlhf_fast import memory
    from rlhf_fast.measure import available_bytes

    device = torch.device("cpu") if device is None else torch.device(device)
    if isinstance(model, nn.Module):
        shape = memory.model_shape(model)
        dtype = next(model.parameters()).dtype
    else:
        shape = memory.model_shape(memory.build_meta_model(memory.load_model_config(os.fspath(model))))
        dtype = torch.float32
    dtype_name = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")
    setup = memory.Setup(
        batch=args.per_device_train_batch_size, prompt_len=max(int(prompt_len), 1), response_len=args.response_length,
        layout="four-model" if critic == "separate" else "shared",
        reference=reference if reference in memory.REFERENCE_MODES else "frozen", dtype=dtype_name,
        precision="amp" if (args.bf16 or args.fp16) and dtype_name == "fp32" else "pure",
        grad_checkpointing=False, gpus=max(world_size, 1), fsdp=world_size > 1 and args.distributed_strategy == "fsdp2",
        gen_batch=args.local_rollout_forward_batch_size, device="cuda" if device.type == "cuda" else "cpu")
    need = memory.predict(shape, setup).peak_bytes
    free = available_bytes(str(device))
    on = free is not None and need > 0.9 * free
    where = f"{free / 2**30:.1f} GiB free on {device}" if free is not None else f"free memory on {device} unknown"
    note(f"gradient_checkpointing=None: predicted {need / 2**30:.2f} GiB per step without recompute, {where}: "
         f"checkpointing {'on' if on else 'off'} (set gradient_checkpointing=True/False to force it)")
    return on


def build_reward(reward_model) -> Any:
    """A reward adapter: callables ``(prompts, completions) -> scores`` (non-finite scores allowed through,
    the trainer skips such steps), or a sequence-classification model / local path."""
    if callable(reward_model) and not isinstance(reward_model, nn.Module):
        from rlhf_fast.models.reward import CallableReward

        return reward_model if isinstance(reward_model, CallableReward) \
            else CallableReward(reward_model, allow_nonfinite=True)
    return make_reward(load_classifier(reward_model))


class BatchPlan(NamedTuple):
    prompts_per_step: int  # global prompts per step (batch_size / num_generations)
    sample_generations_freq: int  # steps between generate_completions samples (0: never)


def plan_batches(args, world_size: int, num_prompts: int) -> BatchPlan:
    """TRL 1.12's batch arithmetic, written onto ``args`` as TRL does: world_size, local_batch_size,
    micro_batch_size, batch_size, mini_batch_size, local_mini_batch_size, total_episodes, num_total_batches.

    Group estimators count completions (TRL GRPO): one epoch over the prompts is num_prompts x
    num_generations episodes (num_generations is 1 for GAE)."""
    a = args
    a.world_size = world_size
    a.local_batch_size = a.per_device_train_batch_size * a.gradient_accumulation_steps
    a.micro_batch_size = a.per_device_train_batch_size * a.world_size
    a.batch_size = a.local_batch_size * a.world_size
    if a.local_batch_size % a.num_mini_batches:
        raise ValueError(f"local batch size ({a.local_batch_size} = per_device_train_batch_size x "
                         f"gradient_accumulation_steps) must be a multiple of num_mini_batches ({a.num_mini_batches})")
    a.mini_batch_size = a.batch_size // a.num_mini_batches
    a.local_mini_batch_size = a.local_batch_size // a.num_mini_batches
    if a.local_batch_size % a.num_generations:
        raise ValueError(f"local batch size ({a.local_batch_size} completions) must be a multiple of "
                         f"num_generations ({a.num_generations})")
    if a.total_episodes is None:
        a.total_episodes = int(a.num_train_epochs * num_prompts * a.num_generations)
    a.num_total_batches = math.ceil(a.total_episodes / a.batch_size)
    if a.max_steps and a.max_steps > 0:
        a.num_total_batches = min(a.num_total_batches, a.max_steps)
    freq = max(1, a.num_total_batches // a.num_sample_generations) if a.num_sample_generations > 0 else 0
    return BatchPlan(a.batch_size // a.num_generations, freq)


def new_trainer_state(args, max_steps: int, num_train_epochs: float, is_main: bool):
    """A transformers TrainerState for a fresh run of ``max_steps`` steps, with TRL's OnlineTrainerState
    ``episode`` and the step counts (logging/save steps given as a ratio < 1 become a share of max_steps,
    as in TRL)."""
    from transformers import TrainerState

    state = TrainerState()
    state.episode = 0
    state.is_local_process_zero = state.is_world_process_zero = is_main
    state.max_steps = max_steps
    state.num_train_epochs = num_train_epochs
    state.logging_steps = math.ceil(args.logging_steps * state.max_steps) if args.logging_steps < 1 \
        else int(args.logging_steps)
    state.save_steps = math.ceil(args.save_steps * state.max_steps) if args.save_steps < 1 else int(args.save_steps)
    eval_steps = args.eval_steps if args.eval_steps is not None else state.logging_steps
    state.eval_steps = math.ceil(eval_steps * state.max_steps) if eval_steps < 1 else int(eval_steps)
    return state


def resolve_stop_token(args, tokenizer) -> int | None:
    """The token id that ends a response: the tokenizer's EOS for stop_token="eos", else stop_token_id."""
    if args.stop_token == "eos":
        if tokenizer.eos_token_id is None:
            raise ValueError("stop_token='eos' but the tokenizer has no eos_token_id")
        return int(tokenizer.eos_token_id)
    return args.stop_token_id


def has_active_dropout(model: nn.Module) -> bool:
    """Whether any module would drop activations in train mode (then a forward cannot stand in for another)."""
    return any((isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "attention_dropout", 0.0) or 0.0) > 0
               for m in model.modules())


# =============================================================================== trainer construction (PPO and GRPO)
def setup_runtime(trainer, args) -> None:
    """Seed, join the process group under torchrun (as TRL's accelerate does, with ddp_timeout), and set the
    trainer's args, rank, world size, reduction group (token counts and statistics are global) and device."""
    from transformers import set_seed

    from rlhf_fast.trainer.distributed import init_from_env, limit_threads_per_rank, rank_and_world_size

    trainer.args = args
    set_seed(args.seed)
    init_from_env(args.ddp_backend, timeout=args.ddp_timeout)
    trainer.rank, trainer.world_size = rank_and_world_size()
    trainer.is_main = trainer.rank == 0
    trainer.group = torch.distributed.group.WORLD if trainer.world_size > 1 else None
    trainer.device = torch.device("cpu") if args.use_cpu or not torch.cuda.is_available() else args.device
    if trainer.world_size > 1:
        limit_threads_per_rank(trainer.world_size)


def setup_training(trainer, optimizers, callbacks, *, total_steps: int, num_train_epochs: float) -> None:
    """After ``trainer.model``: distributed wrapping, the optimizer and LR schedule over ``total_steps`` (unless
    ``optimizers`` gives them), the trainer state, callbacks and the non-finite counters."""
    from transformers import TrainerControl
    from transformers.trainer_callback import CallbackHandler, DefaultFlowCallback

    from rlhf_fast.trainer.controllers import RunningMoments
    from rlhf_fast.trainer.optim import build_adamw, build_hf_scheduler

    args = trainer.args
    trainer.optimizer, trainer.lr_scheduler = optimizers
    fsdp = trainer.world_size > 1 and args.distributed_strategy == "fsdp2"
    if trainer.optimizer is not None and fsdp:
        raise ValueError("with distributed_strategy='fsdp2' the optimizer must be built after sharding: "
                         "pass optimizers=(None, None) or (None, scheduler_factory)")
    trainer.ddp_model = trainer._wrap_distributed()  # FSDP2 replaces parameters: before the optimizer sees them
    if trainer.optimizer is None:
        trainer.optimizer = build_adamw(
            trainer.model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay,
            betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
            fused_allowed=str(getattr(args.optim, "value", args.optim)) == "adamw_torch_fused" and not fsdp)
    if trainer.lr_scheduler is None:
        trainer.lr_scheduler = build_hf_scheduler(
            trainer.optimizer, args.lr_scheduler_type, total_steps=total_steps, warmup_steps=args.warmup_steps,
            warmup_ratio=getattr(args, "warmup_ratio", None), scheduler_kwargs=args.lr_scheduler_kwargs)
    trainer.score_moments = RunningMoments()
    trainer.state = new_trainer_state(args, total_steps, num_train_epochs, trainer.is_main)
    trainer.control = TrainerControl()
    trainer.callback_handler = CallbackHandler([DefaultFlowCallback] + list(callbacks or []), trainer.model,
                                               trainer.tokenizer, trainer.optimizer, trainer.lr_scheduler)
    trainer.logger = None
    trainer.nonfinite_steps = 0
    trainer._dropout_free = not has_active_dropout(trainer.model)
