"""Supervised fine-tuning: next-token loss on response tokens only, through the fused log-prob op.

The causal LM's own ``forward`` is never called (it would build [tokens, vocab] logits): the
backbone gives hidden states [B, T, H], the positions that predict a response token are gathered
([N, H], prompt and padding positions never reach the LM head) and ``fused_linear_logprobs`` turns
them into log-probs with the LM head weight, chunk by chunk.

Loss of an optimizer step = −Σ log p(response tokens) / (number of response tokens in the whole
accumulated batch), so gradient accumulation gives the same update as one big batch.

Training: AdamW (no weight decay on biases and norm weights), linear warmup then cosine / linear /
constant decay, gradient-norm clipping, gradient accumulation, batches grouped by length, a tqdm bar,
``metrics.jsonl`` in the output directory (every ``logging_steps``: loss, lr, grad_norm,
tokens_per_s = non-padding tokens through the model per second since the last line; plus eval_loss
lines), held-out loss before and after training (and every ``eval_steps``). A step with a
non-finite loss or gradient norm is skipped (logged); more than ``max_nonfinite_steps`` of them stop
the stage before anything is saved. The output is a finished stage directory (see ``rlhf_fast.stage_io``).
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

from rlhf_fast.config import ConfigError, config_to_dict
from rlhf_fast.data import (
    Rows,
    SFTExample,
    collate_sft,
    length_grouped_batches,
    load_sft_rows,
    split_rows,
    tokenize_sft_rows,
)
from rlhf_fast.models.loading import backbone_hidden, ensure_pad_token, get_backbone, get_lm_head
from rlhf_fast.ops import fused_linear_logprobs
from rlhf_fast.stage_io import StageDirectory
from rlhf_fast.trainer.logging import MetricsLogger
from rlhf_fast.trainer.optim import autocast_ctx, build_adamw, build_lr_scheduler

__all__ = [
    "SFTConfig", "SFTResult", "train_sft", "response_logprobs", "evaluate_sft_loss", "resolve_device",
    "StageTrainingArgs", "with_stage_tokenizer",
]

DEMO = "demo"


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
    attn_implementation: str | None = field(default=None, metadata={"help": "None: flash_attention_2 on CUDA if installed, else sdpa."})
    logprob_chunk_size: int | None = field(default=None, metadata={"help": "Rows per chunk of the fused log-prob op (None: its default)."})
    max_nonfinite_steps: int = field(default=3, metadata={"help": "Skip up to N steps with a non-finite loss, then stop."})
    disable_tqdm: bool = False


@dataclass
class SFTConfig(StageTrainingArgs):
    """Settings of ``rlhf-fast sft`` (YAML section ``sft:``). Names follow TRL / transformers where they exist."""

    model_name_or_path: str = field(default=DEMO, metadata={"help": "HF model dir or hub name; 'demo' builds the tiny random Qwen2 + BPE tokenizer."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    dataset: str = field(default=DEMO, metadata={"help": ".jsonl/.json/.parquet file or save_to_disk dir; 'demo' = pydoc corpus pairs."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; None: split eval_fraction off the train set."})
    eval_fraction: float = field(default=0.05, metadata={"help": "Held-out share when eval_dataset is None (not for 'demo')."})
    output_dir: str = field(default="runs/sft", metadata={"help": "Finished stage directory to write."})
    max_length: int = field(default=256, metadata={"help": "Max prompt+response tokens."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompt tokens kept when truncating (default max_length//2)."})
    use_chat_template: bool = field(default=True, metadata={"help": "Format string prompts with the tokenizer's chat template when it has one."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Sequences per micro-batch."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Sequences per eval batch."})
    demo_vocab_size: int = field(default=1024, metadata={"help": "'demo' model: BPE vocabulary size."})
    demo_prompt_words: int = field(default=8, metadata={"help": "'demo' dataset: prompt length in words."})
    demo_response_words: int = field(default=30, metadata={"help": "'demo' dataset: response length in words."})

    def __post_init__(self):
        check_training_fields(self)
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")


def check_training_fields(cfg) -> None:
    """Range checks shared by the SFT and reward-model configs; the message names the field."""
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


class SFTResult(NamedTuple):
    """output_dir: the finished stage directory; metrics: the summary also written to its COMPLETE marker."""

    output_dir: Path
    model: nn.Module
    tokenizer: Any
    metrics: dict


# --------------------------------------------------------------------------- shared training pieces
def resolve_device(device: str) -> torch.device:
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
    """The optimizer loop shared by SFT and reward-model training.

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


# --------------------------------------------------------------------------- SFT proper
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


@torch.no_grad()
def evaluate_sft_loss(model: nn.Module, examples: list[SFTExample], pad_id: int, batch_size: int = 16,
                      chunk_size: int | None = None, bf16: bool = False) -> dict:
    """Mean negative log-likelihood per response token over ``examples`` ({"loss", "tokens"})."""
    if not examples:
        return {"loss": None, "tokens": 0}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    backbone, head = get_backbone(model), get_lm_head(model)
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = 0
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in examples]
    for indices in length_grouped_batches(lengths, batch_size, shuffle=False):
        batch = {k: v.to(device) for k, v in collate_sft([examples[i] for i in indices], pad_id).items()}
        with autocast_ctx(device, bf16):
            logp = response_logprobs(backbone, head, batch, chunk_size)
        total -= logp.double().sum()
        tokens += logp.numel()
    model.train(was_training)
    return {"loss": (total / max(tokens, 1)).item(), "tokens": tokens}


def with_stage_tokenizer(cfg, model, tokenizer):
    """(model, tokenizer) for a stage: the tokenizer given, else ``tokenizer_name_or_path``, else the
    model directory's; given a pad token (from EOS when missing) that the model's config shares."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = cfg.tokenizer_name_or_path or (cfg.model_name_or_path if cfg.model_name_or_path != DEMO else None)
        if source is None:
            raise ValueError("a model passed in memory needs tokenizer= (or tokenizer_name_or_path in the config)")
        tokenizer = AutoTokenizer.from_pretrained(source)
    ensure_pad_token(tokenizer)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_model_and_tokenizer(cfg: SFTConfig, model, tokenizer, demo_split):
    if model is None:
        if cfg.model_name_or_path == DEMO:
            from rlhf_fast.demo_data import build_demo_model, build_demo_tokenizer

            if tokenizer is None:
                tokenizer = build_demo_tokenizer(demo_split.train, vocab_size=cfg.demo_vocab_size)
            model = build_demo_model(tokenizer, seed=cfg.seed)
        else:
            from rlhf_fast.models.loading import load_causal_lm

            model = load_causal_lm(cfg.model_name_or_path, dtype=torch.float32,
                                   attn_implementation=cfg.attn_implementation)
    return with_stage_tokenizer(cfg, model, tokenizer)


def _sft_rows(cfg: SFTConfig, train_dataset, eval_dataset, demo_split) -> tuple[Rows, Rows]:
    if train_dataset is None and cfg.dataset == DEMO:
        from rlhf_fast.demo_data import sft_pairs

        kw = dict(prompt_words=cfg.demo_prompt_words, response_words=cfg.demo_response_words)
        train = load_sft_rows(sft_pairs(demo_split.train, **kw), name="demo train pairs")
        ev = load_sft_rows(sft_pairs(demo_split.heldout, **kw), name="demo held-out pairs")
        return train, ev
    train = load_sft_rows(train_dataset if train_dataset is not None else cfg.dataset, name="dataset")
    if eval_dataset is None and cfg.eval_dataset is not None:
        eval_dataset = cfg.eval_dataset
    if eval_dataset is not None:
        return train, load_sft_rows(eval_dataset, name="eval_dataset")
    if cfg.eval_fraction > 0 and len(train.rows) >= 2:
        return split_rows(train, cfg.eval_fraction, cfg.seed)
    return train, Rows([], [], "none")


def train_sft(cfg: SFTConfig, model: nn.Module | None = None, tokenizer=None, train_dataset=None,
              eval_dataset=None) -> SFTResult:
    """Run the SFT stage and write ``cfg.output_dir`` as a finished stage directory.

    model / tokenizer: in-memory objects instead of ``cfg.model_name_or_path``. train_dataset /
    eval_dataset: rows (list of dicts, ``datasets.Dataset`` or a path) instead of ``cfg.dataset``.
    Returns the trained model, its tokenizer, the output directory and the summary metrics
    (``initial_eval_loss``, ``final_eval_loss``, ``train_loss``, ``steps``, ``tokens_per_s`` ...).
    """
    if not isinstance(cfg, SFTConfig):
        raise TypeError(f"cfg must be an SFTConfig, got {type(cfg).__name__}")
    device = resolve_device(cfg.device)
    stage_dir = StageDirectory(cfg.output_dir, stage="sft")  # fails now, not after training, on a bad output_dir
    torch.manual_seed(cfg.seed)
    demo_split = None
    if cfg.dataset == DEMO or cfg.model_name_or_path == DEMO:
        from rlhf_fast.demo_data import demo_corpus

        demo_split = demo_corpus()
    model, tokenizer = _load_model_and_tokenizer(cfg, model, tokenizer, demo_split)
    train_rows, eval_rows = _sft_rows(cfg, train_dataset, eval_dataset, demo_split)
    tok_kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  use_chat_template=cfg.use_chat_template)
    train_ex = tokenize_sft_rows(train_rows, tokenizer, **tok_kw)
    eval_ex = tokenize_sft_rows(eval_rows, tokenizer, **tok_kw) if eval_rows.rows else []
    model.to(device)
    if cfg.gradient_checkpointing:
        set_activation_checkpointing(model, True)
    backbone, head = get_backbone(model), get_lm_head(model)
    pad_id = tokenizer.pad_token_id
    lengths = [len(e.prompt_ids) + len(e.response_ids) for e in train_ex]

    def micro_loss(indices):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_sft([train_ex[i] for i in indices], pad_id).items()}
        logp = response_logprobs(backbone, head, batch, cfg.logprob_chunk_size)
        tokens = sum(len(train_ex[i].prompt_ids) + len(train_ex[i].response_ids) for i in indices)  # host-side count
        return -logp.sum(), tokens, logp.numel()

    def count_units(indices):
        return sum(len(train_ex[i].response_ids) for i in indices)

    def evaluate():
        return evaluate_sft_loss(model, eval_ex, pad_id, cfg.per_device_eval_batch_size, cfg.logprob_chunk_size, cfg.bf16)

    with stage_dir:
        with MetricsLogger(stage_dir.path, stdout=False) as metrics:
            hist = run_training_loop(
                model=model, cfg=cfg, stage="sft", num_examples=len(train_ex), lengths=lengths,
                micro_loss=micro_loss, count_units=count_units, evaluate=evaluate, metrics=metrics,
            )
        model.eval()
        if cfg.gradient_checkpointing:
            set_activation_checkpointing(model, False)
        summary = {
            "train_examples": len(train_ex), "eval_examples": len(eval_ex), "steps": hist["steps"],
            "train_loss": hist["train_loss"], "initial_eval_loss": hist["initial_eval"]["loss"],
            "final_eval_loss": hist["final_eval"]["loss"], "tokens": hist["tokens"],
            "tokens_per_s": hist["tokens_per_s"], "runtime_s": hist["runtime_s"],
            "skipped_nonfinite_steps": hist["skipped_nonfinite_steps"], "dataset": train_rows.source,
        }
        (stage_dir.path / "stage_config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        out = stage_dir.finish(model, tokenizer, summary)
    return SFTResult(out, model, tokenizer, summary)
