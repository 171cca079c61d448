"""What every stage shares: the training config base, the optimizer loop, devices, the model and
tokenizer of a causal-LM stage, train / held-out rows, the response log-probs, the finished directory.

A stage (``sft``, ``reward``, ``dpo``, ``ppo``) imports this module, ``config``, ``data`` and ``io``;
never another stage. The optimizer, LR schedule, autocast and metrics writer come from the trainer
layer (``rlhf_fast.trainer.optim``, ``rlhf_fast.trainer.logging``), shared with the PPO trainer.

The loop (``run_training_loop``): AdamW (no weight decay on biases and norm weights), linear warmup
then cosine / linear / constant decay, gradient-norm clipping, gradient accumulation, batches grouped
by length, a tqdm bar, ``metrics.jsonl`` in the stage directory (every ``logging_steps``: loss, lr,
grad_norm, tokens_per_s = non-padding tokens through the model per second since the last line; plus
``eval_*`` lines), held-out evaluation before and after training (and every ``eval_steps``). A step with
a non-finite loss or gradient norm is skipped (logged); more than ``max_nonfinite_steps`` of them stop
the stage before anything is saved. ``train_and_finish`` runs it and writes the finished stage
directory (``rlhf_fast.stages.io``).
"""
from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from rlhf_fast.models import patch_backbone
from rlhf_fast.models.loading import backbone_hidden, ensure_pad_token, from_pretrained_or_explain
from rlhf_fast.ops import fused_linear_logprobs
from rlhf_fast.stages.config import ConfigError, config_to_dict
from rlhf_fast.stages.data import Rows, length_grouped_batches, load_preference_rows, split_rows
from rlhf_fast.stages.io import StageDirectory
from rlhf_fast.trainer.logging import MetricsLogger
from rlhf_fast.trainer.optim import autocast_ctx, build_adamw, build_lr_scheduler

__all__ = [
    "DEMO", "StageTrainingArgs", "check_training_fields", "StageResult", "resolve_device", "total_optimizer_steps",
    "batch_stream", "set_activation_checkpointing", "run_training_loop", "train_and_finish", "response_logprobs",
    "with_stage_tokenizer", "load_stage_policy", "stage_rows", "preference_rows", "print_stage_summary",
]

DEMO = "demo"  # a model_name_or_path / dataset value: the embedded demo (rlhf_fast.stages.demo_data)


@dataclass
class StageTrainingArgs:
    """Optimizer, schedule and run settings shared by the SFT, reward-model and DPO stages. A stage's
    config subclasses it and redeclares only the fields whose default differs (e.g. DPO's learning rate)."""

    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(default="cosine", metadata={"help": "Decay after warmup."})
    warmup_ratio: float = field(default=0.03, metadata={"help": "Warmup share of the steps (unless warmup_steps > 0)."})
    warmup_steps: int = field(default=0, metadata={"help": "Warmup steps; overrides warmup_ratio when > 0."})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "Final LR as a share of the peak."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (not on biases/norms)."})
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm (0: off)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the data (ignored when max_steps > 0)."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; > 0 overrides num_train_epochs."})
    logging_steps: int = field(default=10, metadata={"help": "Write a metrics line every N optimizer steps."})
    eval_steps: int | None = field(default=None, metadata={"help": "Held-out loss every N steps (always before and after)."})
    seed: int = 42
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1', ..."})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the backbone (CUDA); weights and LM head stay fp32."})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "Recompute activations in backward."})
    fused_backbone: bool = field(default=True, metadata={"help": "Fused RMSNorm/SwiGLU/rotary kernels in the model "
                                                                 "(Llama/Qwen2/Mistral; others unchanged)."})
    attn_implementation: str | None = field(default=None, metadata={"help": "None: flash_attention_2 on CUDA if installed, else sdpa."})
    logprob_chunk_size: int | None = field(default=None, metadata={"help": "Rows per chunk of the fused log-prob op (None: its default)."})
    max_nonfinite_steps: int = field(default=3, metadata={"help": "Skip up to N steps with a non-finite loss, then stop."})
    disable_tqdm: bool = False


def check_training_fields(cfg) -> None:
    """Range checks shared by the stage configs (SFT, RM, DPO); the message names the field."""
    positive_ints = ["max_length", "per_device_train_batch_size", "per_device_eval_batch_size",
                     "gradient_accumulation_steps", "logging_steps"]
    for name in positive_ints:
        if getattr(cfg, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_steps is not None and cfg.eval_steps < 1:
        raise ValueError(f"eval_steps must be >= 1 or None, got {cfg.eval_steps}")
    if cfg.max_prompt_length is not None and not 0 <= cfg.max_prompt_length < cfg.max_length:
        raise ValueError(f"max_prompt_length must be in [0, max_length={cfg.max_length}), got {cfg.max_prompt_length}")
    if not cfg.learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    if not 0.0 <= cfg.warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    if not 0.0 <= cfg.min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    for name in ("warmup_steps", "weight_decay", "max_grad_norm", "max_nonfinite_steps"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps <= 0 and not cfg.num_train_epochs > 0:
        raise ValueError(f"set max_steps > 0 or num_train_epochs > 0 (got {cfg.max_steps} and {cfg.num_train_epochs})")
    if cfg.logprob_chunk_size is not None and cfg.logprob_chunk_size < 1:
        raise ValueError(f"logprob_chunk_size must be >= 1 or None, got {cfg.logprob_chunk_size}")
    if not 0.0 <= cfg.eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {cfg.eval_fraction}")


class StageResult(NamedTuple):
    """What a stage returns. output_dir: the finished stage directory; metrics: the summary also written
    to its COMPLETE marker."""

    output_dir: Path
    model: nn.Module
    tokenizer: Any
    metrics: dict


# --------------------------------------------------------------------------- the loop
def resolve_device(device: str) -> torch.device:
    """The torch device of a stage config's ``device`` ("auto": cuda when available, else cpu)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} but CUDA is not available on this machine; use device=auto or cpu")
    return dev


def total_optimizer_steps(num_batches: int, cfg) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_train_epochs * num_batches / cfg.gradient_accumulation_steps))


def batch_stream(lengths: list[int], batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless length-grouped index batches, reshuffled each epoch."""
    epoch = 0
    while True:
        yield from length_grouped_batches(lengths, batch_size, shuffle=True, seed=seed + epoch)
        epoch += 1


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Turn recomputation of activations in backward on/off (transformers 5 name, else the 4.x one).

    The KV cache is off while it is on (transformers warns and disables it anyway).
    """
    suffix = "enable" if enabled else "disable"
    fn = getattr(model, f"activation_checkpointing_{suffix}", None) or getattr(model, f"gradient_checkpointing_{suffix}")
    fn()
    model.config.use_cache = not enabled


def run_training_loop(
    *, model: nn.Module, cfg, stage: str, num_examples: int, lengths: list[int],
    micro_loss: Callable[[list[int]], tuple[torch.Tensor, int, int]],
    count_units: Callable[[list[int]], int], evaluate: Callable[[], dict], metrics: MetricsLogger,
    extra_metrics: Callable[[], dict] | None = None, on_step_end: Callable[[int], None] | None = None,
) -> dict:
    """The optimizer loop of the SFT, reward-model and DPO stages.

    micro_loss(indices) -> (sum of the per-unit losses, as a differentiable scalar; tokens processed;
    units): the loss of an optimizer step is Σ micro sums / Σ units of the step (count_units gives the
    units of a micro-batch before its forward, so each micro-batch's backward is already scaled right).
    extra_metrics() -> dict is merged into each logged metrics line (e.g. DPO's reward statistics,
    accumulated by micro_loss since the last line); on_step_end(step) runs after every optimizer step.
    Returns the last metrics and counters.
    """
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    batches_per_epoch = math.ceil(num_examples / cfg.per_device_train_batch_size)
    total_steps = total_optimizer_steps(batches_per_epoch, cfg)
    # CPU keeps the unfused update (fused CPU AdamW rounds differently in the last bit)
    optimizer = build_adamw(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                            fused_allowed=device.type == "cuda")
    scheduler = build_lr_scheduler(optimizer, schedule=cfg.lr_scheduler_type, total_steps=total_steps,
                                   warmup_steps=cfg.warmup_steps, warmup_ratio=cfg.warmup_ratio,
                                   min_lr_ratio=cfg.min_lr_ratio)
    stream = batch_stream(lengths, cfg.per_device_train_batch_size, cfg.seed)
    eval_every = cfg.eval_steps
    history: dict[str, Any] = {"skipped_nonfinite_steps": 0, "tokens": 0}
    first_eval = evaluate()
    history["initial_eval"] = first_eval
    metrics.log({f"eval_{k}": v for k, v in first_eval.items()}, step=0)
    bar = tqdm(total=total_steps, desc=stage, disable=cfg.disable_tqdm, dynamic_ncols=True)
    window_tokens, window_start = 0, time.perf_counter()
    start = time.perf_counter()
    last_loss = float("nan")
    model.train()
    for step in range(1, total_steps + 1):
        micro = [next(stream) for _ in range(cfg.gradient_accumulation_steps)]
        units = sum(count_units(m) for m in micro)
        loss_total = torch.zeros((), device=device)
        step_tokens = 0
        for indices in micro:
            with autocast_ctx(device, cfg.bf16):
                loss_sum, tokens, _ = micro_loss(indices)
            loss = loss_sum / max(units, 1)
            loss.backward()
            loss_total += loss.detach()
            step_tokens += tokens
        if cfg.max_grad_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
            )
        loss_value, grad_value = loss_total.item(), float(grad_norm)  # one host sync per optimizer step
        lr = scheduler.get_last_lr()[0]
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            optimizer.zero_grad(set_to_none=True)
            history["skipped_nonfinite_steps"] += 1
            metrics.log({"skipped_nonfinite": True, "loss": str(loss_value), "grad_norm": str(grad_value)}, step=step)
            if history["skipped_nonfinite_steps"] > cfg.max_nonfinite_steps:
                raise FloatingPointError(
                    f"{stage}: non-finite loss or gradient at {history['skipped_nonfinite_steps']} steps (last: step "
                    f"{step}); stopping before any weights are saved. Lower learning_rate or check the data"
                )
            with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended on a skip
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            bar.update(1)
            continue
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last_loss = loss_value
        history["tokens"] += step_tokens
        window_tokens += step_tokens
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
        if step % cfg.logging_steps == 0 or step == total_steps:
            now = time.perf_counter()
            metrics.log({
                "epoch": round(step * cfg.gradient_accumulation_steps / batches_per_epoch, 4),
                "loss": loss_value, "lr": lr, "grad_norm": grad_value,
                "tokens_per_s": window_tokens / max(now - window_start, 1e-9), "tokens": history["tokens"],
                **(extra_metrics() if extra_metrics is not None else {}),
            }, step=step)
            window_tokens, window_start = 0, now
        if eval_every and step % eval_every == 0 and step != total_steps:
            ev = evaluate()
            model.train()
            metrics.log({f"eval_{k}": v for k, v in ev.items()}, step=step)
        if on_step_end is not None:
            on_step_end(step)
    bar.close()
    final_eval = evaluate()
    metrics.log({f"eval_{k}": v for k, v in final_eval.items()}, step=total_steps)
    runtime = time.perf_counter() - start
    history.update(
        steps=total_steps, final_eval=final_eval, train_loss=last_loss, runtime_s=round(runtime, 3),
        tokens_per_s=history["tokens"] / max(runtime, 1e-9),
    )
    return history


def train_and_finish(stage_dir: StageDirectory, *, model: nn.Module, tokenizer, cfg,
                     summarize: Callable[[dict], dict], **loop) -> StageResult:
    """Train ``model`` with ``run_training_loop(**loop)`` (metrics.jsonl in the stage directory, activation
    checkpointing on while training when ``cfg.gradient_checkpointing``), then finish ``stage_dir`` with the
    model, tokenizer, ``stage_config.json`` and the summary ``summarize(history)``."""
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    with stage_dir:
        with MetricsLogger(stage_dir.path, stdout=False) as metrics:
            hist = run_training_loop(model=model, cfg=cfg, stage=stage_dir.stage, metrics=metrics, **loop)
        model.eval()
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model, False)
        summary = summarize(hist)
        (stage_dir.path / "stage_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        out = stage_dir.finish(model, tokenizer, summary)
    return StageResult(out, model, tokenizer, summary)


def print_stage_summary(stage: str, output_dir, metrics: dict) -> int:
    """The end of a stage command: the finished directory and the summary as JSON; exit code 0."""
    print(f"{stage}: finished stage directory {output_dir}")
    print(json.dumps(metrics, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------- model, tokenizer, rows
def with_stage_tokenizer(cfg, model, tokenizer):
    """(model, tokenizer) for a stage: the tokenizer given, else ``tokenizer_name_or_path``, else the
    model directory's; given a pad token (from EOS when missing) that the model's config shares."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = cfg.tokenizer_name_or_path or (cfg.model_name_or_path if cfg.model_name_or_path != DEMO else None)
        if source is None:
            raise ValueError("a model passed in memory needs tokenizer= (or tokenizer_name_or_path in the config)")
        tokenizer = from_pretrained_or_explain(AutoTokenizer.from_pretrained, source, "tokenizer")
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_stage_policy(cfg, model: nn.Module | None, tokenizer, load: Callable[[], nn.Module], corpus=None):
    """(model, tokenizer) of a causal-LM stage (SFT, DPO): the in-memory ``model`` when given; else for
    ``model_name_or_path: demo`` the tiny random Qwen2 with a BPE tokenizer trained on ``corpus`` (default:
    the demo corpus) unless a tokenizer is given; else ``load()``. Then ``with_stage_tokenizer``."""
    if model is None:
        if cfg.model_name_or_path == DEMO:
            from rlhf_fast.stages.demo_data import build_demo_model, build_demo_tokenizer, demo_corpus

            if tokenizer is None:
                corpus = corpus if corpus is not None else demo_corpus()
                tokenizer = build_demo_tokenizer(corpus.train, vocab_size=cfg.demo_vocab_size)
            model = build_demo_model(tokenizer, seed=cfg.seed)
        else:
            model = load()
    if getattr(cfg, "fused_backbone", False):
        patch_backbone(model)
    return with_stage_tokenizer(cfg, model, tokenizer)


def stage_rows(cfg, train_dataset, eval_dataset, load: Callable[..., Rows],
               demo: Callable[[], tuple[Rows, Rows]]) -> tuple[Rows, Rows]:
    """Train and held-out rows of a stage: ``demo()`` when no train_dataset is given and ``cfg.dataset`` is
    'demo'; else ``load`` (the stage's row loader) over train_dataset (or cfg.dataset) and eval_dataset (or
    cfg.eval_dataset), splitting ``eval_fraction`` off the train rows when no held-out set is given."""
    if train_dataset is None and cfg.dataset == DEMO:
        return demo()
    train = load(train_dataset if train_dataset is not None else cfg.dataset, name="dataset")
    if eval_dataset is None and cfg.eval_dataset is not None:
        eval_dataset = cfg.eval_dataset
    if eval_dataset is not None:
        return train, load(eval_dataset, name="eval_dataset")
    if cfg.eval_fraction > 0 and len(train.rows) >= 2:
        return split_rows(train, cfg.eval_fraction, cfg.seed)
    return train, Rows([], [], "none")


def preference_rows(cfg, train_dataset, eval_dataset, load=load_preference_rows) -> tuple[Rows, Rows]:
    """``stage_rows`` of a preference stage (RM or DPO, each with its row loader ``load``); the demo is
    ``cfg.demo_num_pairs`` corpus pairs judged by the gold judge (noisy labels unless
    ``demo_noisy_labels`` is off), ``eval_fraction`` of them from held-out paragraphs."""

    def demo():
        from rlhf_fast.stages.demo_data import demo_corpus, synthetic_preference_rows

        split = demo_corpus()
        n_eval = max(1, round(cfg.demo_num_pairs * cfg.eval_fraction)) if cfg.eval_fraction > 0 else 0
        train = synthetic_preference_rows(split.train, cfg.demo_num_pairs - n_eval, seed=cfg.seed,
                                          noisy=cfg.demo_noisy_labels)
        # Held-out pairs come from held-out paragraphs and carry noiseless labels: accuracy then
        # measures agreement with the gold judge itself.
        ev = synthetic_preference_rows(split.heldout, n_eval, seed=cfg.seed + 1, noisy=False) if n_eval else []
        return (load(train, name="demo preference pairs"),
                load(ev, name="demo held-out pairs") if ev else Rows([], [], "none"))

    return stage_rows(cfg, train_dataset, eval_dataset, load, demo)


# --------------------------------------------------------------------------- response log-probs
def response_logprobs(backbone: nn.Module, lm_head: nn.Module, batch: dict[str, torch.Tensor],
                      chunk_size: int | None = None) -> torch.Tensor:
    """fp32 [N] log-probs of the N labelled (response) tokens of a collated batch, in row-major order.

    Only the N positions that predict a response token reach the LM head (via the fused op).
    """
    hidden = backbone_hidden(backbone, batch["input_ids"], batch["attention_mask"])
    if "label_positions" in batch:  # from collate_sft: no device->host sync to find N
        positions, targets = batch["label_positions"], batch["target_ids"]
    else:
        selected = (batch["labels"] != -100).flatten()
        positions = selected.nonzero().squeeze(-1)
        targets = batch["labels"].flatten()[positions]
    h = hidden.flatten(0, 1).index_select(0, positions)
    h = h.to(lm_head.weight.dtype)  # under bf16 autocast the head still runs in the weight's dtype
    logp, _ = fused_linear_logprobs(h, lm_head.weight, targets, bias=lm_head.bias, chunk_size=chunk_size)
    return logp
