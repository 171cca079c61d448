"""Direct Preference Optimization on the fused log-prob op (no reward model, no RL loop).

    loss = −log σ(β·((log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))))      per pair, mean over pairs

log π(y) is the **sum** of the response tokens' log-probs (prompt and padding excluded), computed
like SFT: the backbone gives hidden states, only the positions that predict a response token reach
the LM head, through ``fused_linear_logprobs`` (never [tokens, vocab] logits). Chosen and rejected of
a micro-batch are concatenated into one batch of 2P sequences, so each step runs one forward and one
backward.

Reference log-probs are computed **once**, before training, for every train and held-out pair, and
cached as two fp32 vectors [P] on the device. They come from the initial policy (default: nothing is
copied, the policy itself is run under no_grad before its first update) or from a separate reference
model (``ref_model=`` / ``ref_model_name_or_path``) that is dropped right after. No reference model is
in memory while training.

Metrics use TRL's DPO names and formulas (TRL 1.12, loss_type "sigmoid"):
``rewards/chosen`` = mean β·(log π(c) − log π_ref(c)), ``rewards/rejected`` likewise,
``rewards/accuracies`` = share of pairs with chosen reward > rejected reward (ties count as wrong, so
it is 0 before the first update, when every implicit reward is 0), ``rewards/margins`` = mean
(chosen − rejected reward), ``logps/chosen`` / ``logps/rejected`` = mean summed log-prob, ``loss``.
Training lines of ``metrics.jsonl`` average them over the micro-batches since the previous line;
held-out lines carry them with an ``eval_`` prefix.

Training is the stages' loop (``rlhf_fast.stages.base.run_training_loop``: AdamW, warmup + decay,
clipping, accumulation, length-grouped batches, non-finite step skipping) and writes a finished stage
directory (``rlhf_fast.stages.io``).
"""
from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast.models import patch_backbone
from rlhf_fast.models.loading import get_backbone, get_lm_head
from rlhf_fast.stages.base import (
    DEMO,
    StageResult,
    StageTrainingArgs,
    check_training_fields,
    load_stage_policy,
    preference_rows,
    print_stage_summary,
    resolve_device,
    response_logprobs,
    train_and_finish,
)
from rlhf_fast.stages.data import (
    DatasetFormatError,
    Rows,
    SFTExample,
    collate_sft,
    length_grouped_batches,
    load_preference_rows,
    tokenize_sft_rows,
)
from rlhf_fast.stages.io import StageDirectory, load_stage_causal_lm
from rlhf_fast.trainer.optim import autocast_ctx

__all__ = [
    "DPOConfig", "DPOTrainer", "DPOResult", "DPOExample", "DPOLossOutput", "dpo_loss", "sequence_logps",
    "tokenize_dpo_rows", "collate_pairs", "load_dpo_rows", "compute_reference_logps", "evaluate_dpo", "train_dpo", "run_dpo_stage",
]

DPOResult = StageResult

METRIC_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


@dataclass
class DPOConfig(StageTrainingArgs):
    """Settings of ``rlhf-fast dpo`` (YAML section ``dpo:``). Names follow TRL's DPOConfig where they exist."""

    model_name_or_path: str = field(default="runs/sft", metadata={"help": "Finished SFT stage directory, a hub name, or 'demo' (tiny random Qwen2)."})
    allow_unmarked_model_dir: bool = field(default=False, metadata={"help": "Accept a local HF model dir without the COMPLETE marker."})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "Reference model for the cached log-probs; None: the initial policy."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Defaults to model_name_or_path."})
    dataset: str = field(default=DEMO, metadata={"help": "Preference file (.jsonl/.json/.parquet, rows prompt/chosen/rejected) or 'demo'."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out file; None: split eval_fraction off."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Held-out share when eval_dataset is None."})
    output_dir: str = field(default="runs/dpo", metadata={"help": "Finished stage directory to write."})
    beta: float = field(default=0.1, metadata={"help": "DPO temperature: strength of the implicit KL to the reference."})
    max_length: int = field(default=256, metadata={"help": "Max prompt+response tokens per side."})
    max_prompt_length: int | None = field(default=None, metadata={"help": "Prompt tokens kept when truncating (default max_length//2)."})
    use_chat_template: bool = field(default=True, metadata={"help": "Format string prompts with the chat template when there is one."})
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Pairs per micro-batch (2x sequences per forward)."})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "Pairs per eval / reference batch."})
    learning_rate: float = field(default=1e-6, metadata={"help": "Peak learning rate."})
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = field(default="linear", metadata={"help": "Decay after warmup."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup share of the steps (unless warmup_steps > 0)."})
    demo_vocab_size: int = field(default=1024, metadata={"help": "'demo' model: BPE vocabulary size."})
    demo_num_pairs: int = field(default=2000, metadata={"help": "'demo' dataset: pairs to build from the corpus."})
    demo_noisy_labels: bool = field(default=True, metadata={"help": "'demo' dataset: sample labels from the gold judge's sigmoid."})

    def __post_init__(self):
        check_training_fields(self)
        if not (isinstance(self.beta, (int, float)) and self.beta > 0):
            raise ValueError(f"beta must be > 0, got {self.beta!r}")
        if self.demo_num_pairs < 2:
            raise ValueError(f"demo_num_pairs must be >= 2, got {self.demo_num_pairs}")


class DPOExample(NamedTuple):
    """Token ids of one preference pair: prompt+chosen and prompt+rejected, each split at the response."""

    chosen: SFTExample
    rejected: SFTExample


class DPOLossOutput(NamedTuple):
    """losses [P] (differentiable); chosen_rewards, rejected_rewards [P] = β·(log π − log π_ref), detached."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


# --------------------------------------------------------------------------- math
def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> DPOLossOutput:
    """Per-pair DPO loss −log σ(β·((π_c − ref_c) − (π_r − ref_r))) on summed sequence log-probs [P]; fp32.

    Computed with logsigmoid (stable for any margin). Gradient flows into the policy terms only.
    """
    shape = policy_chosen.shape
    for name, t in (("policy_rejected", policy_rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if t.shape != shape:
            raise ValueError(f"{name} must have the shape of policy_chosen {tuple(shape)}, got {tuple(t.shape)}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    chosen_logratio = policy_chosen.float() - ref_chosen.detach().float()
    rejected_logratio = policy_rejected.float() - ref_rejected.detach().float()
    losses = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio))
    return DPOLossOutput(losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def sequence_logps(backbone: nn.Module, lm_head: nn.Module, batch: dict[str, torch.Tensor],
                   chunk_size: int | None = None) -> torch.Tensor:
    """fp32 [B] summed log-probs of each row's response tokens of a ``collate_sft`` batch (differentiable).

    The per-token log-probs come from the fused op on the response positions only; they are summed per
    row with ``index_add`` (row = flat position // T, computed on the host at collate time when present).
    """
    logp = response_logprobs(backbone, lm_head, batch, chunk_size)
    B, T = batch["input_ids"].shape
    rows = batch["label_rows"] if "label_rows" in batch else batch["label_positions"] // T
    return torch.zeros(B, dtype=torch.float32, device=logp.device).index_add(0, rows, logp)


# --------------------------------------------------------------------------- data
def load_dpo_rows(source: Any, name: str = "dataset") -> Rows:
    """Preference rows for DPO; a row missing a column is refused with its location and the fix."""
    try:
        return load_preference_rows(source, name=name)
    except DatasetFormatError as e:
        if "missing column" not in str(e):
            raise
        raise DatasetFormatError(
            f"{e}. DPO needs every row to hold 'prompt', 'chosen' (the preferred response) and 'rejected' (the "
            f"dispreferred one): add the missing column to that row or drop the row"
        ) from None


def tokenize_dpo_rows(rows: Rows, tokenizer, max_length: int = 512, max_prompt_length: int | None = None,
                      use_chat_template: bool = True) -> list[DPOExample]:
    """Tokenize validated preference rows into (prompt, chosen response) / (prompt, rejected response) pairs.

    Each side is truncated like an SFT example (prompt's end, response's start, at most max_length tokens).
    """
    expanded, locations = [], []
    for row, where in zip(rows.rows, rows.locations):
        expanded += [{"prompt": row["prompt"], "response": row["chosen"]},
                     {"prompt": row["prompt"], "response": row["rejected"]}]
        locations += [where, where]
    sides = tokenize_sft_rows(Rows(expanded, locations, rows.source), tokenizer, max_length=max_length,
                              max_prompt_length=max_prompt_length, use_chat_template=use_chat_template)
    return [DPOExample(sides[2 * i], sides[2 * i + 1]) for i in range(len(rows.rows))]


def collate_pairs(examples: list[DPOExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2P sequences [chosen_0..chosen_{P-1}, rejected_0..rejected_{P-1}]
    (``collate_sft`` keys plus ``label_rows`` [N]: the row of each labelled position)."""
    batch = collate_sft([e.chosen for e in examples] + [e.rejected for e in examples], pad_id)
    batch["label_rows"] = batch["label_positions"] // batch["input_ids"].shape[1]
    return batch


def _pair_lengths(examples: list[DPOExample]) -> list[int]:
    return [max(len(e.chosen.prompt_ids) + len(e.chosen.response_ids),
                len(e.rejected.prompt_ids) + len(e.rejected.response_ids)) for e in examples]


def _pair_tokens(e: DPOExample) -> int:
    return sum(len(s.prompt_ids) + len(s.response_ids) for s in (e.chosen, e.rejected))


@torch.no_grad()
def compute_reference_logps(model: nn.Module, examples: list[DPOExample], pad_id: int, batch_size: int = 16,
                            chunk_size: int | None = None, bf16: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (chosen [P], rejected [P]) of ``model``, fp32 on the model's device."""
    device = next(model.parameters()).device
    chosen = torch.zeros(len(examples), dtype=torch.float32, device=device)
    rejected = torch.zeros(len(examples), dtype=torch.float32, device=device)
    if not examples:
        return chosen, rejected
    was_training = model.training
    model.eval()
    backbone, head = get_backbone(model), get_lm_head(model)
    for indices in length_grouped_batches(_pair_lengths(examples), batch_size, shuffle=False):
        batch = {k: v.to(device, non_blocking=True) for k, v in collate_pairs([examples[i] for i in indices], pad_id).items()}
        with autocast_ctx(device, bf16):
            seq = sequence_logps(backbone, head, batch, chunk_size)
        idx = torch.tensor(indices, device=device)
        chosen[idx] = seq[: len(indices)]
        rejected[idx] = seq[len(indices):]
    model.train(was_training)
    return chosen, rejected


class _MetricSums:
    """Device-side sums of the DPO statistics (no host sync until ``means()``)."""

    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float64, device=self.device)
        self.pairs = 0

    def add(self, out: DPOLossOutput, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor) -> None:
        rc, rr = out.chosen_rewards, out.rejected_rewards
        self.sums += torch.stack([
            out.losses.detach().sum(), rc.sum(), rr.sum(), (rc > rr).sum(), (rc - rr).sum(),
            policy_chosen.detach().sum(), policy_rejected.detach().sum(),
        ]).double()
        self.pairs += rc.numel()

    def means(self) -> dict:
        if self.pairs == 0:
            return dict.fromkeys(METRIC_NAMES)
        values = (self.sums / self.pairs).tolist()
        return dict(zip(METRIC_NAMES, values))


@torch.no_grad()
def evaluate_dpo(model: nn.Module, examples: list[DPOExample], ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
                 pad_id: int, beta: float, batch_size: int = 16, chunk_size: int | None = None,
                 bf16: bool = False) -> dict:
    """Held-out DPO metrics (TRL names, means over pairs) plus ``pairs``; ``None`` values when empty."""
    if not examples:
        return {**dict.fromkeys(METRIC_NAMES), "pairs": 0}
    device = next(model.parameters()).device
    policy_c, policy_r = compute_reference_logps(model, examples, pad_id, batch_size, chunk_size, bf16)
    sums = _MetricSums(device)
    sums.add(dpo_loss(policy_c, policy_r, ref_chosen, ref_rejected, beta), policy_c, policy_r)
    return {**sums.means(), "pairs": len(examples)}


# --------------------------------------------------------------------------- trainer
class DPOTrainer:
    """The DPO stage: ``DPOTrainer(cfg, ...).train()`` -> DPOResult (``train_dpo`` does exactly that).

    model / tokenizer: an in-memory causal LM and its tokenizer instead of ``cfg.model_name_or_path``.
    ref_model: an in-memory reference model instead of ``cfg.ref_model_name_or_path`` (None for both:
    the initial policy). train_dataset / eval_dataset: rows ``[{"prompt", "chosen", "rejected"}]``, a
    ``datasets.Dataset`` or a path, instead of ``cfg.dataset`` / ``cfg.eval_dataset``.
    The output directory and the data are checked here, before any model work.
    """

    def __init__(self, cfg: DPOConfig, model: nn.Module | None = None, tokenizer=None, train_dataset=None,
                 eval_dataset=None, ref_model: nn.Module | None = None):
        if not isinstance(cfg, DPOConfig):
            raise TypeError(f"cfg must be a DPOConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.stage_dir = StageDirectory(cfg.output_dir, stage="dpo")  # fails now, not after training
        torch.manual_seed(cfg.seed)
        self.train_rows, self.eval_rows = preference_rows(cfg, train_dataset, eval_dataset, load=load_dpo_rows)
        self.model, self.tokenizer = self._load_policy(model, tokenizer)
        tok_kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                      use_chat_template=cfg.use_chat_template)
        self.train_examples = tokenize_dpo_rows(self.train_rows, self.tokenizer, **tok_kw)
        self.eval_examples = tokenize_dpo_rows(self.eval_rows, self.tokenizer, **tok_kw) if self.eval_rows.rows else []
        if not self.train_examples:
            raise DatasetFormatError(f"{self.train_rows.source}: no preference rows to train on")
        self._ref_model = ref_model
        self.pad_id = self.tokenizer.pad_token_id
        self.ref_train: tuple[torch.Tensor, torch.Tensor] | None = None
        self.ref_eval: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_policy(self, model, tokenizer):
        cfg = self.cfg
        return load_stage_policy(cfg, model, tokenizer, lambda: load_stage_causal_lm(
            cfg.model_name_or_path, "dpo model_name_or_path", cfg.allow_unmarked_model_dir, cfg.attn_implementation))

    def precompute_reference_logps(self) -> None:
        """Fill ``ref_train`` / ``ref_eval`` (fp32 [P] pairs on the device), then drop any reference model."""
        cfg = self.cfg
        ref, loaded = self._ref_model, False
        if ref is None and cfg.ref_model_name_or_path is not None:
            ref = load_stage_causal_lm(cfg.ref_model_name_or_path, "dpo ref_model_name_or_path",
                                       cfg.allow_unmarked_model_dir, cfg.attn_implementation)
            if cfg.fused_backbone:
                patch_backbone(ref)
            loaded = True
        if ref is None:
            ref = self.model
        elif get_lm_head(ref).weight.shape[0] != get_lm_head(self.model).weight.shape[0]:
            raise ValueError(
                f"the reference model's vocabulary ({get_lm_head(ref).weight.shape[0]}) differs from the policy's "
                f"({get_lm_head(self.model).weight.shape[0]}); both must use the policy's tokenizer"
            )
        ref_device = next(ref.parameters()).device
        ref.to(self.device)
        kw = dict(pad_id=self.pad_id, batch_size=cfg.per_device_eval_batch_size, chunk_size=cfg.logprob_chunk_size,
                  bf16=cfg.bf16)
        self.ref_train = compute_reference_logps(ref, self.train_examples, **kw)
        self.ref_eval = compute_reference_logps(ref, self.eval_examples, **kw)
        self._ref_model = None
        if ref is not self.model and not loaded:
            ref.to(ref_device)  # the caller's model goes back where it was
        del ref
        if loaded:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def evaluate(self) -> dict:
        cfg = self.cfg
        return evaluate_dpo(self.model, self.eval_examples, *self.ref_eval, pad_id=self.pad_id, beta=cfg.beta,
                            batch_size=cfg.per_device_eval_batch_size, chunk_size=cfg.logprob_chunk_size, bf16=cfg.bf16)

    def train(self, on_step_end=None) -> DPOResult:
        """Precompute the reference log-probs, train, write the stage directory. ``on_step_end(step)``:
        optional callback after every optimizer step (benchmarks use it as their clock)."""
        cfg, device = self.cfg, self.device
        model = self.model.to(device)
        self.precompute_reference_logps()
        backbone, head = get_backbone(model), get_lm_head(model)
        ref_chosen, ref_rejected = self.ref_train
        examples, pad_id = self.train_examples, self.pad_id
        window = _MetricSums(device)

        def micro_loss(indices):
            batch = {k: v.to(device, non_blocking=True) for k, v in collate_pairs([examples[i] for i in indices], pad_id).items()}
            seq = sequence_logps(backbone, head, batch, cfg.logprob_chunk_size)
            P = len(indices)
            idx = torch.tensor(indices).to(device, non_blocking=True)
            out = dpo_loss(seq[:P], seq[P:], ref_chosen[idx], ref_rejected[idx], cfg.beta)
            window.add(out, seq[:P], seq[P:])
            return out.losses.sum(), sum(_pair_tokens(examples[i]) for i in indices), P

        def extra_metrics():
            means = window.means()
            window.reset()
            means.pop("loss")  # the loop logs the step loss itself
            return means

        def summarize(hist):
            first, last = hist["initial_eval"], hist["final_eval"]
            return {
                "train_pairs": len(examples), "eval_pairs": len(self.eval_examples), "steps": hist["steps"],
                "beta": cfg.beta, "train_loss": hist["train_loss"],
                "initial_eval_loss": first["loss"], "final_eval_loss": last["loss"],
                "initial_eval_accuracy": first["rewards/accuracies"], "final_eval_accuracy": last["rewards/accuracies"],
                "initial_eval_margin": first["rewards/margins"], "final_eval_margin": last["rewards/margins"],
                "tokens": hist["tokens"], "tokens_per_s": hist["tokens_per_s"], "runtime_s": hist["runtime_s"],
                "skipped_nonfinite_steps": hist["skipped_nonfinite_steps"], "dataset": self.train_rows.source,
                "reference": cfg.ref_model_name_or_path or "initial policy",
            }

        return train_and_finish(
            self.stage_dir, model=model, tokenizer=self.tokenizer, cfg=cfg, summarize=summarize,
            num_examples=len(examples), lengths=_pair_lengths(examples), micro_loss=micro_loss, count_units=len,
            evaluate=self.evaluate, extra_metrics=extra_metrics, on_step_end=on_step_end,
        )


def train_dpo(cfg: DPOConfig, model: nn.Module | None = None, tokenizer=None, train_dataset=None,
              eval_dataset=None, ref_model: nn.Module | None = None) -> DPOResult:
    """Run the DPO stage and write ``cfg.output_dir`` as a finished stage directory (see ``DPOTrainer``).

    Returns the trained model, tokenizer, output directory and summary metrics (``initial_eval_accuracy``,
    ``final_eval_accuracy``, ``final_eval_margin``, ``final_eval_loss``, ...).
    """
    return DPOTrainer(cfg, model, tokenizer, train_dataset, eval_dataset, ref_model).train()


def run_dpo_stage(cfg: DPOConfig) -> int:
    """The ``rlhf-fast dpo`` command body: train, then print the output directory and the summary."""
    result = train_dpo(cfg)
    return print_stage_summary("dpo", result.output_dir, result.metrics)
