"""GRPOTrainer: the drop-in for TRL 1.16's ``trl.GRPOTrainer``, on PPOTrainer's engine.

Same constructor (model, reward_funcs, args, train_dataset, eval_dataset, processing_class,
reward_processing_classes, callbacks, optimizers, peft_config), ``train()`` (returning transformers'
TrainOutput), ``save_model()``, ``state.log_history`` with TRL's metric names and values, TrainerCallbacks.

What it shares with PPOTrainer (a subclass): the policy layout without a critic (``build_policy_value``:
fused LM-head log-probs, frozen / LoRA / no reference), the lean KV-cache decoder, the optimizer and
schedule, checkpoints and resume, torchrun + DDP / FSDP2, callbacks, the train loop and the non-finite
guard. What is GRPO's own (``grpo_step``): TRL 1.16's batch arithmetic (a generation batch sampled once,
shuffled, split into steps_per_generation micro-batches, reused num_iterations times; one optimizer step per
gradient_accumulation_steps micro-batches), reward functions with TRL's arguments, its advantages, its loss
types on the fused policy-loss family, and its metrics. DAPO's dynamic sampling and overlong shaping are
options (off by default). Differences from TRL are listed in docs/migrating_from_trl.md.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
import warnings
from collections import defaultdict
from typing import NamedTuple

import torch
from torch import nn

from rlhf_fast.trainer import grpo_step, ppo_step
from rlhf_fast.trainer.batching import PromptSampler, group_indices, left_pad
from rlhf_fast.trainer.controllers import KLController
from rlhf_fast.trainer.distributed import all_reduce_sum, dist_ready
from rlhf_fast.trainer.grpo_config import GRPOConfig
from rlhf_fast.trainer.logging import should_log
from rlhf_fast.trainer.ppo import PPOTrainer
from rlhf_fast.trainer.ppo_step import ResponseMasks
from rlhf_fast.trainer.rollout import Rollout
from rlhf_fast.trainer.setup import build_policy_value, load_classifier, setup_runtime, setup_training

__all__ = ["GRPOTrainer", "Generation"]


class Generation(NamedTuple):
    """One scored generation batch (this rank's rows; prompt groups contiguous).

    rollout: the decoded rows; masks: ResponseMasks (policy = TRL's completion mask, zero on masked truncated
    rows); advantages fp32 [B]; old_logprobs / ref_logprobs fp32 [B, R] or None; num_items: the valid tokens of
    the whole generation batch on every rank (fp32 [1]); slices: the shuffled row indices of each micro-batch."""

    rollout: Rollout
    masks: ResponseMasks
    advantages: torch.Tensor
    old_logprobs: torch.Tensor | None
    ref_logprobs: torch.Tensor | None
    num_items: torch.Tensor
    slices: list[torch.Tensor]


def _gather_objects(obj) -> list:
    if not dist_ready():
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-sized per-rank tensors along dim 0."""
    if not dist_ready():
        return t
    parts = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


class GRPOTrainer(PPOTrainer):
    """Drop-in for TRL 1.16's GRPOTrainer (module docstring). ``trainer.model`` is the policy module
    (``rlhf_fast.models.PolicyValueModel`` without a value head); the causal LM is ``trainer.policy_model``."""

    _progress_name = "GRPO"
    _card_method = "GRPO (rlhf_fast's drop-in GRPOTrainer for TRL 1.16)"

    def __init__(self, model, reward_funcs=None, args: GRPOConfig | None = None, train_dataset=None,
                 eval_dataset=None, processing_class=None, reward_processing_classes=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None, tools=None, rollout_func=None,
                 environment_factory=None):
        for name, value in (("quantization_config", quantization_config), ("tools", tools),
                            ("rollout_func", rollout_func), ("environment_factory", environment_factory)):
            if value:
                raise ValueError(f"GRPOTrainer({name}=...) is not supported by rlhf_fast (text generation by its own "
                                 "decoder, full-precision or LoRA training); drop it")
        if args is None:
            name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else \
                getattr(getattr(model, "config", None), "_name_or_path", "") or "model"
            args = GRPOConfig(f"{str(name).rstrip('/').split('/')[-1]}-GRPO")
        if not isinstance(args, GRPOConfig):
            raise TypeError(f"args must be a rlhf_fast GRPOConfig, got {type(args).__name__}")
        setup_runtime(self, args)
        model = self._load_model(model, args)
        self.tokenizer = self._processing_class(processing_class, model)
        self.pad_token_id = self.tokenizer.pad_token_id
        model.config.get_text_config().pad_token_id = self.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = self.pad_token_id
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        # Every EOS the model declares ends a completion, not only the tokenizer's (TRL).
        self.eos_token_ids = eos if self.tokenizer.eos_token_id in eos else [self.tokenizer.eos_token_id, *eos]
        self.stop_token_id = self.eos_token_ids[0]
        self._set_rewards(reward_funcs, reward_processing_classes, args)

        # ---- data: rows with a "prompt" column (text or chat messages), every column reaching the rewards
        if train_dataset is None:
            raise ValueError("train_dataset is required (rows with a 'prompt' column)")
        if not hasattr(train_dataset, "__len__"):
            raise TypeError("train_dataset must be a map-style dataset with a length (a datasets.Dataset or a list of "
                            f"dicts); got {type(train_dataset).__name__} (iterable datasets are not supported)")
        if len(train_dataset) == 0 or "prompt" not in train_dataset[0]:
            raise ValueError("train_dataset rows need a 'prompt' column (text, or a list of chat messages)")
        self.train_dataset, self.eval_dataset, self.data_collator = train_dataset, eval_dataset, None
        self.prompts = list(train_dataset["prompt"]) if hasattr(train_dataset, "column_names") else \
            [row["prompt"] for row in train_dataset]
        self._prompt_ids: dict[int, list[int]] = {}
        if len(self.prompts) < args.prompts_per_generation:
            raise ValueError(f"train_dataset has {len(self.prompts)} prompts, fewer than one generation batch "
                             f"({args.prompts_per_generation} prompts = generation_batch_size / num_generations)")

        # ---- models
        self.log_messages: list[str] = []
        longest = max(len(self._tokens(i)) for i in range(min(len(self.prompts), 64)))
        layout = build_policy_value(args.engine_view(), model, None, None, peft_config, self.tokenizer, self._note,
                                    device=self.device, prompt_len=longest, world_size=self.world_size)
        self.model, self.reference_mode, self.critic_mode = layout
        self.model.to(self.device)
        for f in self.reward_funcs:
            if isinstance(f, nn.Module):
                f.to(self.device).eval()

        # ---- batches and steps, as TRL's RepeatSampler and transformers' Trainer count them
        data_seed = args.seed if args.data_seed is None else args.data_seed
        self.sampler = PromptSampler(len(self.prompts), args.prompts_per_generation, data_seed, self.rank,
                                     self.world_size, shuffle=bool(args.shuffle_dataset))
        generations_per_epoch = len(self.prompts) // args.prompts_per_generation
        self.micro_steps_per_epoch = generations_per_epoch * args.num_iterations * args.steps_per_generation
        ga = args.gradient_accumulation_steps
        steps_per_epoch = max(-(-self.micro_steps_per_epoch // ga), 1)
        total = args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
        setup_training(self, optimizers, callbacks, total_steps=total, num_train_epochs=total / steps_per_epoch)
        self.kl_ctl = KLController("fixed", args.beta)
        self.spec = grpo_step.loss_spec(args)
        self.sample_generations_freq = 0
        self._micro, self._buffer = 0, None
        self._metrics: dict[str, list] = defaultdict(list)
        self._pending_metrics: dict[str, list] = defaultdict(list)
        self._pending_extra: dict[str, list] = defaultdict(list)
        self._logs: dict[str, list] = {}
        self._tr_loss, self._total_loss, self._last_logged = 0.0, 0.0, 0
        self._last_reward = float("nan")

    # ------------------------------------------------------------------ construction helpers
    def _load_model(self, model, args):
        from rlhf_fast.models import load_causal_lm

        if isinstance(model, (str, os.PathLike)):
            kwargs = dict(args.model_init_kwargs or {})
            dtype = kwargs.pop("dtype", kwargs.pop("torch_dtype", "float32"))
            dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
            return load_causal_lm(model, dtype=None if dtype == "auto" else dtype, **kwargs)
        if args.model_init_kwargs is not None:
            warnings.warn("GRPOConfig.model_init_kwargs is ignored: the model is already instantiated", stacklevel=3)
        return model

    @staticmethod
    def _processing_class(processing_class, model):
        if processing_class is None:
            from transformers import AutoTokenizer

            processing_class = AutoTokenizer.from_pretrained(model.config._name_or_path, padding_side="left",
                                                             truncation_side="left")
        tok = getattr(processing_class, "tokenizer", processing_class)  # a processor's tokenizer (text only)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _set_rewards(self, reward_funcs, reward_processing_classes, args) -> None:
        funcs = [] if reward_funcs is None else list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) \
            else [reward_funcs]
        if not funcs:
            raise ValueError("No reward source provided. Pass `reward_funcs`.")
        funcs = [load_classifier(f) if isinstance(f, (str, os.PathLike)) else f for f in funcs]
        for f in funcs:
            if not (callable(f) or isinstance(f, nn.Module)):
                raise TypeError(f"reward_funcs must be callables or sequence-classification models, got {type(f).__name__}")
        self.reward_funcs = funcs
        self.reward_func_names = [grpo_step.reward_func_name(f) for f in funcs]
        if args.reward_weights is not None:
            if len(args.reward_weights) != len(funcs):
                raise ValueError(f"Number of reward weights ({len(args.reward_weights)}) must match number of reward "
                                 f"functions ({len(funcs)})")
            self.reward_weights = torch.tensor(args.reward_weights, dtype=torch.float32)
        else:
            self.reward_weights = torch.ones(len(funcs), dtype=torch.float32)
        procs = reward_processing_classes
        procs = [None] * len(funcs) if procs is None else list(procs) if isinstance(procs, (list, tuple)) else [procs]
        if len(procs) != len(funcs):
            raise ValueError(f"The number of reward processing classes ({len(procs)}) must match the number of reward "
                             f"functions ({len(funcs)}).")
        for i, (f, proc) in enumerate(zip(funcs, procs)):
            if isinstance(f, nn.Module):
                if proc is None:
                    from transformers import AutoTokenizer

                    proc = AutoTokenizer.from_pretrained(f.config._name_or_path)
                if proc.pad_token_id is None:
                    proc.pad_token = proc.eos_token
                f.config.get_text_config().pad_token_id = proc.pad_token_id  # pooling reads the last non-pad token
                procs[i] = proc
        self.reward_processing_classes = procs

    def _tokens(self, index: int) -> list[int]:
        if index not in self._prompt_ids:
            self._prompt_ids[index] = grpo_step.prompt_token_ids(
                [self.prompts[index]], self.tokenizer, self.args.chat_template_kwargs, self.args.max_prompt_length)[0]
        return self._prompt_ids[index]

    # ------------------------------------------------------------------ one optimizer step
    def _progress_postfix(self, metrics: dict) -> dict:
        return {"reward": f"{self._last_reward:.3f}"}

    def step(self) -> dict | None:
        """One optimizer step: gradient_accumulation_steps micro-batches (generating when TRL would), clip,
        step, log. Returns the logged metrics (None when this step does not log)."""
        a = self.args
        t0 = time.perf_counter()
        if self._buffer is None:  # a fresh run, or resumed: micro-steps continue from the restored step
            self._micro = self.state.global_step * a.gradient_accumulation_steps
        micro = [self._next_micro_batch() for _ in range(a.gradient_accumulation_steps)]
        self.state.episode += sum(len(idx) for _, idx in micro) * self.world_size
        n_seqs = torch.tensor([float(sum(len(idx) for _, idx in micro) * self.world_size)], device=self.device)
        step_tokens = all_reduce_sum(sum(g.masks.policy[idx].sum().float() for g, idx in micro).reshape(1), self.group) \
            if self.spec.count == "step_tokens" else None
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        for k, (gen, idx) in enumerate(micro):
            last = k == len(micro) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.ddp_model, "no_sync") else self.ddp_model.no_sync()
            with sync:
                loss, stats = grpo_step.micro_loss(
                    self.ddp_model, gen.rollout.query_responses[idx],
                    ResponseMasks(gen.masks.attention[idx], gen.masks.policy[idx], gen.masks.value[idx]),
                    gen.advantages[idx], None if gen.old_logprobs is None else gen.old_logprobs[idx],
                    None if gen.ref_logprobs is None else gen.ref_logprobs[idx], spec=self.spec,
                    # dapo / cispo: the micro-batch's generation's num_items_in_batch x GA / steps_per_generation
                    num_tokens=step_tokens if step_tokens is not None else
                    gen.num_items * a.gradient_accumulation_steps / a.steps_per_generation,
                    num_seqs=n_seqs, beta=a.beta, bias_correction_kl=a.use_bias_correction_kl,
                    temperature=a.temperature, top_entropy_quantile=a.top_entropy_quantile,
                    entropy_coef=a.entropy_coef, grad_accum=a.gradient_accumulation_steps,
                    world_size=self.world_size, autocast=self._autocast)
            loss_sum = loss_sum + loss
            for key, v in stats.items():
                self._metrics[key].append(v)
        grad_norm = ppo_step.clip_grad_norm(self.model, a.max_grad_norm)  # Trainer clips at max_grad_norm (> 0)
        if bool(torch.isfinite(grad_norm)):
            self.optimizer.step()
        else:
            self._on_nonfinite_grad(grad_norm)
        lr = self.lr_scheduler.get_last_lr()[0]
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.global_step += 1
        self.state.epoch = self._micro / self.micro_steps_per_epoch
        self._metrics["step_time"].append(time.perf_counter() - t0)
        step_loss = float(all_reduce_sum(loss_sum.reshape(1), self.group)[0]) / self.world_size
        if math.isfinite(step_loss):
            self._tr_loss += step_loss
        else:  # transformers' logging_nan_inf_filter
            self._tr_loss += self._tr_loss / (1 + self.state.global_step - self._last_logged)
        if not should_log(a, self.state, a.gradient_accumulation_steps / self.micro_steps_per_epoch):
            return None
        return self._log_step(lr, float(grad_norm))

    def _next_micro_batch(self) -> tuple[Generation, torch.Tensor]:
        a = self.args
        if self._micro % (a.steps_per_generation * a.num_iterations) == 0 or self._buffer is None:
            self._buffer = self._generate_and_score()
        idx = self._buffer.slices[self._micro % a.steps_per_generation]
        self._micro += 1
        return self._buffer, idx

    def _log_step(self, lr: float, grad_norm: float) -> dict:
        steps = self.state.global_step - self._last_logged
        logs = {"loss": self._tr_loss / steps, "grad_norm": grad_norm, "learning_rate": lr}
        self._total_loss += self._tr_loss
        self._tr_loss, self._last_logged = 0.0, self.state.global_step
        for key, values in self._metrics.items():
            vals = [float(v) for v in values]
            valid = [v for v in vals if not math.isnan(v)]
            logs[key] = sum(valid) / len(valid) if valid else None
        self._metrics.clear()
        self.log(logs)
        if self.args.log_completions and self.is_main and self._logs:
            self._write_completions()
        return logs

    # ------------------------------------------------------------------ generation
    def _sample(self, indices: torch.Tensor, round_index: int) -> dict:
        """Generate and score the completions of this rank's prompts ``indices`` (groups of num_generations),
        sampling with the seeds of (prompt, generation, ``round_index``)."""
        a = self.args
        rows_idx, seeds = group_indices(indices, a.num_generations, a.seed, round_index)
        rows = [self.train_dataset[int(i)] for i in rows_idx]
        prompts = [r["prompt"] for r in rows]
        ids, pmask = left_pad([self._tokens(int(i)) for i in rows_idx], self.pad_token_id, self.device)
        self.model.eval()
        with self._full_params(), self._autocast():
            ro = ppo_step.generate_rollout(
                self.model, ids, pmask, response_length=a.max_completion_length, temperature=a.temperature,
                pad_token_id=self.pad_token_id, stop_token_ids=self.eos_token_ids, seeds=seeds,
                chunk_size=ids.shape[0], inference_mode=not (self.world_size > 1 and a.distributed_strategy == "fsdp2"),
                top_k=a.top_k, top_p=a.top_p)
        completion_ids = [r[m].tolist() for r, m in zip(ro.responses.cpu(), ro.response_mask.cpu())]
        conversational = grpo_step.is_conversational(prompts[0])
        completions = grpo_step.decode_completions(self.tokenizer, completion_ids, conversational)
        rewards = grpo_step.call_reward_funcs(
            self.reward_funcs, self.reward_processing_classes, prompts, completions, completion_ids, rows,
            trainer_state=self.state, log_extra=self._log_extra, log_metric=self._log_metric,
            chat_template_kwargs=a.chat_template_kwargs)
        lengths = ro.response_mask.sum(1).cpu()
        if a.overlong_buffer_length is not None:
            pen = grpo_step.overlong_penalty(lengths, a.max_completion_length, a.overlong_buffer_length,
                                             a.overlong_penalty_factor)
            rewards = torch.cat([rewards, pen.unsqueeze(1)], 1)
        return {"rollout": ro, "prompt_mask": pmask, "rewards": rewards, "prompts": prompts,
                "completions": completions, "completion_ids": completion_ids}

    def _weights_and_names(self):
        if self.args.overlong_buffer_length is None:
            return self.reward_weights, self.reward_func_names
        return torch.cat([self.reward_weights, torch.ones(1)]), [*self.reward_func_names, "overlong_penalty"]

    def _collect(self) -> dict:
        """This rank's generation batch; with dynamic_sampling, only groups whose rewards vary (DAPO), sampling
        more prompts until the batch is full or dynamic_sampling_max_rounds rounds were drawn (zero-variance
        groups then fill it, and the shortfall is logged)."""
        a = self.args
        G = a.num_generations
        need = a.generation_batch_size // self.world_size // G
        weights, _ = self._weights_and_names()
        kept, spare, rounds = [], [], 0
        while True:
            # the micro-step (restored on resume) and the dynamic-sampling round make each draw's seeds new
            part = self._sample(self.sampler.next_batch()[0], self._micro * a.dynamic_sampling_max_rounds + rounds)
            rounds += 1
            if not a.dynamic_sampling:
                return part
            total = (part["rewards"] * weights).nansum(1)
            varying = grpo_step.varying_groups(total, G)
            for g in range(varying.numel()):
                (kept if varying[g] else spare).append((part, g))
            short = float(len(kept) < need and rounds < a.dynamic_sampling_max_rounds)
            if not bool(all_reduce_sum(torch.tensor([short]), self.group)[0] > 0):  # every rank draws alike
                break
        chosen = (kept + spare)[:need]
        self._metrics["dynamic_sampling/rounds"].append(float(rounds))
        self._metrics["dynamic_sampling/filled_with_zero_std"].append(float(max(need - len(kept), 0)) / need)
        return _merge_groups(chosen, G, self.pad_token_id)

    def _generate_and_score(self) -> Generation:
        a = self.args
        part = self._collect()
        ro, pmask = part["rollout"], part["prompt_mask"]
        weights, names = self._weights_and_names()
        rewards_all = _gather_rows(part["rewards"].to(self.device)).cpu()
        adv_all, total_all, std_zero = grpo_step.group_advantages(
            rewards_all, weights, a.num_generations, a.scale_rewards, a.multi_objective_aggregation)
        B = ro.responses.shape[0]
        adv = adv_all[self.rank * B:(self.rank + 1) * B].to(self.device)
        last = torch.tensor([ids[-1] if ids else self.pad_token_id for ids in part["completion_ids"]])
        truncated = ~torch.isin(last, torch.tensor([*self.eos_token_ids, self.pad_token_id]))
        policy = ro.response_mask.bool()
        if a.mask_truncated_completions:
            policy = policy & ~truncated.to(self.device).unsqueeze(1)
        masks = ResponseMasks(torch.cat([pmask.bool(), policy], 1), policy, policy)
        on_policy = a.gradient_accumulation_steps % (a.steps_per_generation * a.num_iterations) == 0
        fwd = None
        if a.beta != 0.0 or not on_policy:
            self.model.train()  # as TRL: these forwards see the training-mode model (dropout is off anyway)
            fwd = ppo_step.rollout_forward(self.model, ro, masks, temperature=a.temperature,
                                           need_reference=a.beta != 0.0, chunk_size=a.per_device_train_batch_size,
                                           autocast=self._autocast, need_policy=not on_policy)
        num_items = all_reduce_sum(policy.sum().float().reshape(1), self.group)
        self._generation_metrics(part, rewards_all, total_all, std_zero, adv_all, truncated, names)
        perm = self._shuffle(B)
        slices = list(perm.split(B // a.steps_per_generation))
        return Generation(ro, masks, adv, None if fwd is None else fwd.logprobs,
                          None if fwd is None else fwd.ref_logprobs, num_items, slices)

    def _shuffle(self, n: int) -> torch.Tensor:
        """The row order of a generation batch before it is split into micro-batches (TRL shuffles it)."""
        g = torch.Generator().manual_seed(self.args.seed * 7919 + self._micro)
        return torch.randperm(n, generator=g)

    def _generation_metrics(self, part, rewards_all, total_all, std_zero, adv_all, truncated, names) -> None:
        m = self._metrics
        ro = part["rollout"]
        lengths = _gather_rows(ro.response_mask.sum(1))
        prompt_tokens = all_reduce_sum(part["prompt_mask"].sum().float().reshape(1), self.group)
        self.state.num_input_tokens_seen = int(getattr(self.state, "num_input_tokens_seen", 0) or 0) + int(
            float(prompt_tokens[0]) + float(lengths.sum()))
        m["num_tokens"] = [self.state.num_input_tokens_seen]
        for k, v in grpo_step.completion_metrics(lengths.cpu(), _gather_rows(truncated.to(self.device)).cpu()).items():
            m[k].append(v)
        for k, v in grpo_step.reward_metrics(rewards_all, total_all, std_zero, names).items():
            m[k].append(v)
        self._last_reward = m["reward"][-1]
        for name in sorted(set().union(*_gather_objects(list(self._pending_metrics)))):
            vals = self._pending_metrics.get(name, [])
            tot = all_reduce_sum(torch.tensor([float(sum(vals)), float(len(vals))]), self.group)
            m[name].append(float(tot[0] / tot[1]))
        self._pending_metrics.clear()
        if self.args.log_completions:
            prompts = sum(_gather_objects(part["prompts"]), [])
            self._logs = {"step": [self.state.global_step] * len(prompts), "prompt": prompts,
                          "completion": sum(_gather_objects(part["completions"]), []),
                          **{n: rewards_all[:, i].tolist() for i, n in enumerate(names)},
                          **{c: sum(_gather_objects(v), []) for c, v in self._pending_extra.items()},
                          "advantage": adv_all.tolist()}
        self._pending_extra.clear()

    def _log_extra(self, column: str, values: list) -> None:
        """Reward functions' ``log_extra(column, values)``: a column of the completions log."""
        self._pending_extra[column].extend(values)

    def _log_metric(self, name: str, value: float) -> None:
        """Reward functions' ``log_metric(name, value)``: averaged into the next logged step."""
        self._pending_metrics[name].append(value)

    def _write_completions(self) -> None:
        """log_completions: print the latest generation's rows (num_completions_to_print) and save them as
        output_dir/completions/completions_<step>.parquet (jsonl without pandas), as TRL does."""
        table = {**self._logs, "step": [self.state.global_step] * len(self._logs["prompt"])}
        n = self.args.num_completions_to_print
        for i in range(len(table["prompt"]) if n is None else min(n, len(table["prompt"]))):
            print(f"[completion] step {table['step'][i]}: {table['prompt'][i]!r} -> {table['completion'][i]!r} "
                  f"(advantage {table['advantage'][i]:.3f})", flush=True)
        out = os.path.join(self.args.output_dir, "completions")
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"completions_{self.state.global_step:05d}")
        try:
            import pandas as pd

            pd.DataFrame(table).to_parquet(path + ".parquet")
        except ImportError:
            with open(path + ".jsonl", "w", encoding="utf-8") as f:
                for i in range(len(table["prompt"])):
                    f.write(json.dumps({k: v[i] for k, v in table.items()}, default=str) + "\n")

    # ------------------------------------------------------------------ the end of train()
    def _train_summary(self):
        """Log and return transformers' TrainOutput (train_runtime, samples and steps per second, train_loss)."""
        from transformers.trainer_utils import TrainOutput

        runtime = time.time() - self._start_time
        steps = max(self.state.global_step, 1)
        metrics = {"train_runtime": runtime,
                   "train_samples_per_second": self.state.max_steps * self.args.per_device_train_batch_size
                   * self.args.gradient_accumulation_steps * self.world_size / max(runtime, 1e-9),
                   "train_steps_per_second": self.state.max_steps / max(runtime, 1e-9), "total_flos": 0.0,
                   "train_loss": (self._total_loss + self._tr_loss) / steps}
        self.log(metrics)
        return TrainOutput(self.state.global_step, metrics["train_loss"], metrics)

    def generate_completions(self, sampling: bool = False):
        raise NotImplementedError("GRPOTrainer has no generate_completions (TRL's has none either); set "
                                  "log_completions=True to see the training completions")


def _merge_groups(chosen: list, G: int, pad_token_id: int) -> dict:
    """One generation part from groups (part, group index) of several sampling rounds: prompts left-padded and
    responses right-padded to the widest."""
    P = max(p["rollout"].context_length for p, _ in chosen)
    R = max(p["rollout"].responses.shape[1] for p, _ in chosen)
    cols = {k: [] for k in ("prompt", "pmask", "resp", "rmask", "stop")}
    lists = {k: [] for k in ("rewards", "prompts", "completions", "completion_ids")}
    for part, g in chosen:
        ro, rows = part["rollout"], slice(g * G, (g + 1) * G)
        p, r = ro.context_length, ro.responses.shape[1]
        pad = torch.nn.functional.pad
        cols["prompt"].append(pad(ro.query_responses[rows, :p], (P - p, 0), value=pad_token_id))
        cols["pmask"].append(pad(part["prompt_mask"][rows], (P - p, 0)))
        cols["resp"].append(pad(ro.responses[rows], (0, R - r), value=pad_token_id))
        cols["rmask"].append(pad(ro.response_mask[rows], (0, R - r)))
        cols["stop"].append(ro.contains_stop[rows])
        lists["rewards"].append(part["rewards"][rows])
        for k in ("prompts", "completions", "completion_ids"):
            lists[k].extend(part[k][rows])
    prompt, resp = torch.cat(cols["prompt"]), torch.cat(cols["resp"])
    ro = Rollout(torch.cat([prompt, resp], 1), resp, torch.cat(cols["rmask"]), torch.cat(cols["stop"]), P)
    return {"rollout": ro, "prompt_mask": torch.cat(cols["pmask"]), "rewards": torch.cat(lists["rewards"]),
            "prompts": lists["prompts"], "completions": lists["completions"],
            "completion_ids": lists["completion_ids"]}
