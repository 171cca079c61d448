"""PPOConfig: the drop-in for TRL 1.12's ``PPOConfig`` (a ``transformers.TrainingArguments``).

Every field a TRL 1.12 PPO script sets keeps its name, default and meaning. rlhf_fast's own knobs
are extra fields below them. ``TrainingArguments`` fields that this trainer does not use are
never silently ignored: ``unsupported_settings()`` names every one set to a non-default value and
the trainer warns (or, for settings that would change results, raises).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Literal

from transformers import TrainingArguments

# TrainingArguments fields the trainer reads, each with a test that changes only it and sees the effect
# (tests/trainer/test_field_walk.py holds every field of PPOConfig to one category).
HONOURED_TRAINING_ARGUMENTS = {
    "output_dir", "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "num_train_epochs", "max_steps", "seed", "data_seed", "logging_steps",
    "logging_strategy", "logging_first_step", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "report_to", "run_name", "bf16", "fp16", "use_cpu", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps",
    "max_grad_norm", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "optim",
    "gradient_checkpointing", "gradient_checkpointing_kwargs", "activation_checkpointing",
    "activation_checkpointing_kwargs", "disable_tqdm", "eval_steps", "push_to_hub", "hub_model_id", "hub_token",
    "hub_private_repo", "hub_revision", "ddp_timeout",
}
# Read by scripts, not by a Trainer (transformers' own Trainer ignores them too), or applied by TrainingArguments
# itself when it is built (ddp_backend: accelerate's process-group set-up under torchrun; dataloader_pin_memory:
# normalised per device): accepted silently.
SCRIPT_TRAINING_ARGUMENTS = {"do_train", "do_eval", "do_predict", "resume_from_checkpoint", "overwrite_output_dir",
                             "local_rank", "dataloader_pin_memory", "ddp_backend"}
# Set to a non-default value, these would change what the run computes: refuse rather than ignore.
REJECTED_TRAINING_ARGUMENTS = {"deepspeed", "fsdp", "fsdp_config", "tf32", "parallelism_config"}
# TRL PPOConfig fields with no meaning here: warned by name when set (DeepSpeed ZeRO-3 gathering).
UNUSED_TRL_FIELDS = {"ds3_gather_for_generation": True}
# Read by scripts (TRL's examples; `rlhf-fast ppo` for dataset / eval_dataset), not by the trainer.
SCRIPT_TRL_FIELDS = {"exp_name", "dataset_num_proc", "dataset", "eval_dataset"}
# Written by the trainer from the batch fields (TRL's batch arithmetic); a value passed in is overwritten.
DERIVED_FIELDS = {"world_size", "num_total_batches", "micro_batch_size", "local_batch_size", "batch_size",
                  "local_mini_batch_size", "mini_batch_size"}
SUPPORTED_OPTIMIZERS = {"adamw_torch", "adamw_torch_fused", "adamw_hf"}


@dataclass
class PPOConfig(TrainingArguments):
    """Configuration of rlhf_fast's PPOTrainer; TRL 1.12's PPOConfig fields first, then ours.

    TRL fields (same defaults): num_mini_batches, total_episodes, local_rollout_forward_batch_size,
    num_sample_generations, response_length, stop_token ("eos" | None), stop_token_id, temperature,
    missing_eos_penalty, sft_model_path, reward_model_path, num_ppo_epochs, whiten_rewards, kl_coef,
    kl_estimator, cliprange, vf_coef, cliprange_value, gamma, lam. Overridden TrainingArguments
    defaults as in TRL: learning_rate=3e-6, logging_steps=10, bf16=None (-> not fp16); gradient_checkpointing=None decides from
    memory (TRL defaults it to True but its PPO loop never enables it).

    Critic-free estimators (``advantage_estimator`` = "grpo" | "rloo" | "reinforce_pp"), TRL-GRPO style:
    - ``num_generations`` n responses are sampled per prompt. The rollout batch counts **completions**,
      as TRL's GRPOTrainer does: per rank, per_device_train_batch_size x gradient_accumulation_steps
      completions = that / n prompts, so that product must be a multiple of n (whole groups per rank).
      ``total_episodes`` counts completions too (default: num_train_epochs x prompts x n).
    - No critic is built (critic="none" is selected automatically; asking for a critic is an error).
    - ``kl_coef`` is the KL coefficient for every estimator: for "grpo"/"rloo" it is TRL GRPO's
      ``beta``, a loss term beta x k3(policy || reference) per response token, aggregated with
      ``loss_agg_mode``; for "reinforce_pp" (and "gae") it is the penalty -kl_coef x kl in the token
      rewards (``kl_estimator``). kl_coef == 0 builds no reference model.
    - ``scale_rewards`` (grpo only, TRL GRPOConfig's name): True divides by the group std (GRPO),
      False keeps s - mean_g (Dr.GRPO; pair it with loss_agg_mode="seq-mean-token-sum-norm").
    - ``whiten_advantages`` / ``whiten_rewards`` / ``lam`` / value fields apply to "gae" only
      (reinforce_pp always whitens its returns over the global batch; gamma applies to it).
    """

    # ---- TrainingArguments defaults TRL overrides
    learning_rate: float = field(default=3e-6, metadata={"help": "The initial learning rate for AdamW (TRL: 3e-6)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X PPO steps (or a ratio < 1)."})
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Recompute activations in backward: True / False force it; None decides per run from the "
                          "memory predictor (on only when the step would not fit without it) and logs the decision. "
                          "TRL 1.12 defaults to True but its PPO loop never enables it; it changes time and memory, "
                          "never the numbers."},
    )
    bf16: bool | None = field(default=None, metadata={"help": "bf16 autocast for forwards; None -> not fp16."})

    # ---- TRL 1.12 PPOConfig fields
    run_name: str | None = field(default=None, metadata={"help": "Name of the run."})
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for dataset mapping."})
    num_mini_batches: int = field(default=1, metadata={"help": "Minibatches per rollout batch."})
    total_episodes: int | None = field(default=None, metadata={"help": "Total prompts to train on."})
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Per-rank batch of the no-grad rollout forwards (generation, scoring)."}
    )
    num_sample_generations: int = field(
        default=10, metadata={"help": "Number of generate_completions() calls during training (0: none)."}
    )
    response_length: int = field(default=53, metadata={"help": "Maximum response tokens."})
    stop_token: Literal["eos"] | None = field(default=None, metadata={"help": "'eos' stops at the EOS token."})
    stop_token_id: int | None = field(default=None, metadata={"help": "Token id that stops a response."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of responses without EOS."}
    )
    sft_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the SFT model."})
    reward_model_path: str = field(default="EleutherAI/pythia-160m", metadata={"help": "Path to the reward model."})
    world_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    num_total_batches: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    micro_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    local_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    local_mini_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    mini_batch_size: int | None = field(default=None, metadata={"help": "Set by the trainer."})
    exp_name: str = field(default="ppo", metadata={"help": "Name of this experiment."})
    model_adapter_name: str | None = field(default=None, metadata={"help": "Train-target PEFT adapter name."})
    ref_adapter_name: str | None = field(default=None, metadata={"help": "Reference PEFT adapter name."})
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO epochs over each rollout batch."})
    whiten_rewards: bool = field(default=False, metadata={"help": "Whiten token rewards (mean kept)."})
    kl_coef: float = field(default=0.05, metadata={"help": "KL penalty coefficient (initial, if adaptive)."})
    kl_estimator: str = field(default="k1", metadata={"help": "KL estimator: k1 | k2 | k3 | abs."})
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip range."})
    vf_coef: float = field(default=0.1, metadata={"help": "Value loss coefficient."})
    cliprange_value: float = field(default=0.2, metadata={"help": "Value clip range."})
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda."})
    ds3_gather_for_generation: bool = field(default=True, metadata={"help": "DeepSpeed-only (not used)."})

    # ---- rlhf_fast knobs
    dataset: str = field(
        default="demo", metadata={"help": "`rlhf-fast ppo`: prompts file (.jsonl/.json/.parquet, 'prompt' column) or 'demo'."}
    )
    eval_dataset: str | None = field(default=None, metadata={"help": "`rlhf-fast ppo`: prompts for generate_completions."})
    critic: Literal["auto", "shared", "separate", "none"] = field(
        default="auto",
        metadata={"help": "auto: 'none' with a critic-free advantage_estimator, else 'separate' when a value_model "
                          "is passed, else 'shared' (value head on the policy)."},
    )
    reference: Literal["auto", "frozen", "lora", "none"] = field(
        default="auto",
        metadata={"help": "auto: 'lora' with peft_config, 'none' when kl_coef == 0, else 'frozen'."},
    )
    reference_dtype: Literal["auto", "bf16", "fp16", "fp32"] = field(
        default="auto", metadata={"help": "Dtype of a frozen reference; auto keeps the passed model's dtype."}
    )
    reference_offload: bool = field(default=False, metadata={"help": "Keep the frozen reference on CPU between uses."})
    cliprange_high: float | None = field(default=None, metadata={"help": "Upper ratio clip (default: cliprange)."})
    dual_clip: float | None = field(default=None, metadata={"help": "Dual-clip constant c > 1 for A < 0."})
    loss_agg_mode: str = field(
        default="token-mean",
        metadata={"help": "token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm"},
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Entropy bonus coefficient."})
    whiten_advantages: bool = field(default=True, metadata={"help": "Whiten advantages over the global batch."})
    reward_clip: float | None = field(default=None, metadata={"help": "Clip scores to [-c, c]."})
    reward_norm: bool = field(default=False, metadata={"help": "Normalise scores by running mean/std."})
    # ---- improvements over TRL 1.12, each off by default so a migrated script computes TRL's numbers
    position_rules: Literal["auto", "trl", "eos"] = field(
        default="auto",
        metadata={"help": "Which response tokens count. trl: TRL 1.12's PPOTrainer (a response ends before its first "
                          "pad token; values and the score one token further); eos: every token up to and including "
                          "the stop token, the score on it. auto: trl with a critic, eos for the critic-free "
                          "estimators (TRL GRPO's completion mask)."},
    )
    padding_aware_metrics: bool = field(
        default=False,
        metadata={"help": "Average policy/approxkl_avg and val/ratio over valid tokens; False averages over every "
                          "response column as TRL 1.12 does (padding counts as log-ratio 0, ratio 1)."},
    )
    kl_clamp: float | None = field(
        default=None, metadata={"help": "Clamp each per-token KL estimate to [-c, c] (the ops' default 10); None "
                                         "clamps nothing, as TRL."},
    )
    micro_batch_token_budget: int | None = field(
        default=None,
        metadata={"help": "Tokens per micro-batch per rank (veRL's ppo_max_token_len_per_gpu): each minibatch is split "
                          "into length-balanced micro-batches of about this many tokens instead of "
                          "per_device_train_batch_size rows; same update (global loss normalisation)."},
    )
    fused_backbone: bool = field(
        default=True,
        metadata={"help": "Swap rlhf_fast's fused RMSNorm (+ residual), SwiGLU and rotary kernels into the policy, "
                          "critic and reference (Llama / Qwen2 / Mistral; others unchanged). Same numbers up to float "
                          "rounding, less activation memory."},
    )
    padding_free: bool = field(
        default=True,
        metadata={"help": "Run every training and scoring forward on packed rows of the valid tokens (attention per "
                          "sequence); False runs padded batches. Same numbers up to float rounding."},
    )
    decode_compile: str | None = field(
        default=None,
        metadata={"help": "Compile the lean decoder's per-token step: 'reduce-overhead' (CUDA graphs: on a GPU the "
                          "per-token kernel launches go), 'default', 'max-autotune', or 'aot_eager' (traces without "
                          "code generation: checks the step compiles). None steps eagerly. Same samples up to float "
                          "rounding; the first rollouts pay the compile (one graph per batch size and 64-column "
                          "cache width)."},
    )
    clip_grad_norm: bool = field(
        default=False, metadata={"help": "Clip the gradient norm at max_grad_norm before each optimizer step. TRL 1.12's "
                                         "PPO loop never clips, whatever max_grad_norm says."},
    )
    kl_controller: Literal["fixed", "adaptive"] = field(default="fixed", metadata={"help": "KL coefficient control."})
    kl_target: float = field(default=6.0, metadata={"help": "Adaptive KL target (summed per sequence)."})
    kl_horizon: int = field(default=10000, metadata={"help": "Adaptive KL horizon (episodes)."})
    advantage_estimator: str = field(
        default="gae",
        metadata={"help": "gae (PPO with a critic) | grpo | rloo | reinforce_pp (critic-free) | any name registered "
                          "with rlhf_fast.algos.register_advantage_estimator."},
    )
    policy_loss: str = field(
        default="ppo",
        metadata={"help": "ppo (clipped, optional dual clip) | any name registered with rlhf_fast.algos.register_policy_loss."},
    )
    num_generations: int = field(
        default=1, metadata={"help": "Responses sampled per prompt (group estimators); the batch counts completions."}
    )
    scale_rewards: bool = field(
        default=True, metadata={"help": "grpo: divide by the group std (True, GRPO) or not (False, Dr.GRPO)."}
    )
    max_nonfinite_steps: int = field(
        default=3, metadata={"help": "Stop after this many skipped steps with a non-finite reward, loss or grad norm."}
    )
    distributed_strategy: Literal["ddp", "fsdp2"] = field(
        default="ddp", metadata={"help": "Under torchrun: DDP, or FSDP2 (fully_shard per decoder layer, then the root)."}
    )

    def __post_init__(self):
        self.bf16 = (not self.fp16) if self.bf16 is None else self.bf16
        if self.stop_token is not None and self.stop_token != "eos":
            raise ValueError(f"stop_token must be 'eos' or None, got {self.stop_token!r}")
        if self.stop_token and self.stop_token_id is not None:
            raise ValueError("set either stop_token or stop_token_id, not both")
        if self.response_length <= 0:
            raise ValueError(f"response_length must be > 0, got {self.response_length}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.missing_eos_penalty is not None and self.missing_eos_penalty < 0:
            raise ValueError(f"missing_eos_penalty must be a positive value, got {self.missing_eos_penalty}")
        for name in ("num_mini_batches", "num_ppo_epochs", "local_rollout_forward_batch_size", "num_generations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("cliprange", "cliprange_value"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.micro_batch_token_budget is not None and self.micro_batch_token_budget < 1:
            raise ValueError(f"micro_batch_token_budget must be a positive number of tokens or None, got "
                             f"{self.micro_batch_token_budget}")
        if self.kl_clamp is not None and not self.kl_clamp > 0:
            raise ValueError(f"kl_clamp must be > 0 or None, got {self.kl_clamp}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1, got {self.dual_clip}")
        from rlhf_fast.models.decode import DECODE_COMPILE_MODES

        if self.decode_compile is not None and self.decode_compile not in DECODE_COMPILE_MODES:
            raise ValueError(f"decode_compile must be one of {DECODE_COMPILE_MODES} or None, got {self.decode_compile!r}")
        self._check_estimator()
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        finish_post_init(self, "PPOTrainer")

    @property
    def resolved_position_rules(self) -> str:
        """"trl" or "eos": ``position_rules``, with "auto" resolved from the estimator (trl with a critic)."""
        if self.position_rules != "auto":
            return self.position_rules
        return "trl" if self.uses_critic else "eos"

    @property
    def estimator_spec(self):
        """The rlhf_fast.algos.EstimatorSpec of ``advantage_estimator``: what it needs from the trainer."""
        from rlhf_fast.algos import get_estimator_spec

        return get_estimator_spec(self.advantage_estimator)

    @property
    def uses_critic(self) -> bool:
        """True when the advantage estimator needs a value model ("gae"); False for the critic-free ones."""
        return self.estimator_spec.needs_critic

    def _check_estimator(self) -> None:
        from rlhf_fast.algos import ADVANTAGE_ESTIMATORS, get_kl_estimator, get_policy_loss

        registered = list(ADVANTAGE_ESTIMATORS.names(sort=False))  # the built-ins first
        if self.advantage_estimator not in registered:
            raise ValueError(
                f"advantage_estimator={self.advantage_estimator!r} is not registered; valid: {registered} "
                "(add one with rlhf_fast.algos.register_advantage_estimator)"
            )
        get_policy_loss(self.policy_loss)  # ValueError naming the registered losses
        get_kl_estimator(self.kl_estimator)  # likewise for the KL estimators
        spec = self.estimator_spec
        if self.scale_rewards in ("group", "none"):  # TRL GRPOConfig's string spellings
            self.scale_rewards = self.scale_rewards == "group"
        if not isinstance(self.scale_rewards, bool):
            raise ValueError(f"scale_rewards must be True (GRPO), False (Dr.GRPO), 'group' or 'none', got "
                             f"{self.scale_rewards!r} (per-batch scaling is not supported)")
        n = self.num_generations
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"num_generations must be an int, got {type(n).__name__}")
        est = self.advantage_estimator
        if spec.needs_critic:
            if n != 1:
                raise ValueError(
                    f"num_generations={n} with advantage_estimator={est!r}: GAE samples one response per prompt (as "
                    "does any estimator with a critic); use num_generations=1, or a group estimator (advantage_estimator='grpo' | "
                    "'rloo' | 'reinforce_pp')"
                )
            if self.critic == "none":
                raise ValueError(f"critic='none' with advantage_estimator={est!r}: GAE needs a value model (as does any "
                                 "estimator with a critic); use "
                                 "critic='auto'/'shared'/'separate' or a critic-free estimator ('grpo', 'rloo', "
                                 "'reinforce_pp')")
            return
        if n < spec.min_generations:
            raise ValueError(
                f"advantage_estimator={est!r} needs num_generations >= {spec.min_generations} (the baseline is the "
                f"mean of the other responses to the same prompt), got {n}: set num_generations="
                f"{spec.min_generations} or more, or use 'grpo'"
            )
        if self.critic in ("shared", "separate"):
            raise ValueError(
                f"critic={self.critic!r} with advantage_estimator={self.advantage_estimator!r}: the critic-free "
                "estimators build no value model; leave critic='auto' (or set critic='none')"
            )
        local = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if local % n:
            lower, upper = (local // n) * n, (local // n + 1) * n
            sizes = " or ".join(str(x) for x in (lower, upper) if x > 0)
            raise ValueError(
                f"the per-rank rollout batch (per_device_train_batch_size x gradient_accumulation_steps = "
                f"{self.per_device_train_batch_size} x {self.gradient_accumulation_steps} = {local} completions) "
                f"is not divisible by num_generations={n}: each rank must hold whole groups of {n} responses per "
                f"prompt; make that product a multiple of {n} (e.g. {sizes}) or change num_generations"
            )

    def unsupported_settings(self) -> dict:
        """TrainingArguments fields set to a non-default value that this trainer does not read."""
        out = unused_training_arguments(self, PPOConfig, HONOURED_TRAINING_ARGUMENTS | SCRIPT_TRAINING_ARGUMENTS)
        out.update({name: getattr(self, name) for name, default in UNUSED_TRL_FIELDS.items()
                    if getattr(self, name) != default})
        return out


def unused_training_arguments(cfg, config_class, read: set[str]) -> dict:
    """TrainingArguments fields of ``cfg`` set to a non-default value that are neither in ``read`` nor
    redefined by ``config_class`` (a TrainingArguments subclass): {name: value}."""
    own = {f.name for f in dataclasses.fields(config_class)} - {f.name for f in dataclasses.fields(TrainingArguments)}
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(TrainingArguments)
                if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    out = {}
    for f in dataclasses.fields(TrainingArguments):
        if f.name in read or f.name in own or f.name.startswith("_"):
            continue
        if f.name not in defaults or not f.init:
            continue
        value = getattr(cfg, f.name, defaults[f.name])
        if f.name == "accelerator_config" and value is not None and value == type(value)():
            continue  # transformers normalises the default None into a default AcceleratorConfig
        if value != defaults[f.name] and value not in (None, [], {}, ""):
            out[f.name] = value
    return out


def finish_post_init(cfg, trainer_name: str) -> None:
    """The end of PPOConfig's and GRPOConfig's ``__post_init__``: the optimizer check and the refused fields
    (before transformers acts on them: imports, globals), TrainingArguments' own post-init keeping an unset
    gradient_checkpointing None ("decide from memory"), then a warning naming each field set but unused."""
    if cfg.optim not in SUPPORTED_OPTIMIZERS and str(getattr(cfg.optim, "value", cfg.optim)) not in SUPPORTED_OPTIMIZERS:
        raise ValueError(f"optim={cfg.optim!r} is not supported; use one of {sorted(SUPPORTED_OPTIMIZERS)}")
    refuse_rejected_training_arguments(cfg, trainer_name)
    decide_checkpointing = cfg.gradient_checkpointing is None and getattr(cfg, "activation_checkpointing", None) is None
    with warnings.catch_warnings():
        # A TRL script's explicit gradient_checkpointing trips transformers 5's rename warning.
        warnings.filterwarnings("ignore", message=".*gradient_checkpointing.*deprecated.*")
        TrainingArguments.__post_init__(cfg)
    if decide_checkpointing:  # transformers turns "unset" into False; None means "decide from memory" here
        cfg.gradient_checkpointing = None
        if hasattr(cfg, "activation_checkpointing"):
            cfg.activation_checkpointing = None
    for name, value in cfg.unsupported_settings().items():
        if name not in REJECTED_TRAINING_ARGUMENTS:
            warnings.warn(f"{type(cfg).__name__}.{name}={value!r} is not used by rlhf_fast's {trainer_name} and has "
                          "no effect", stacklevel=4)


def refuse_rejected_training_arguments(cfg, trainer_name: str) -> None:
    """ValueError for a REJECTED_TRAINING_ARGUMENTS field set on ``cfg`` (before transformers acts on it)."""
    for name in sorted(REJECTED_TRAINING_ARGUMENTS):
        value = getattr(cfg, name, None)
        if value not in (None, False, "", [], {}):
            why = ("tf32 changes matmul precision process-wide" if name == "tf32" else
                   "use torchrun with distributed_strategy='ddp' | 'fsdp2' instead")
            raise ValueError(f"{type(cfg).__name__}.{name}={value!r} is not supported by rlhf_fast's {trainer_name} "
                             f"({why})")
