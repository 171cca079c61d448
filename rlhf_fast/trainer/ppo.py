"""PPOTrainer: the drop-in for TRL 1.12's ``trl.experimental.ppo.PPOTrainer``, on rlhf_fast's kernels.

Same constructor, ``train()``, ``save_model()``, ``generate_completions()``, ``state.log_history``,
TrainerCallbacks and metric names/formulas. ``step()`` is the PPO step of ``rlhf_fast.trainer.ppo_step``
called in order (prompts -> rollout -> score -> rollout forward -> advantages -> update -> metrics);
this module holds only what a trainer adds around those functions: model and batch set-up, the
optimizer, callbacks and state, checkpoints, SIGTERM handling and logging.

Critic-free estimators (``advantage_estimator`` = "grpo" | "rloo" | "reinforce_pp", TRL-GRPO style):
``num_generations`` responses per prompt, contiguous rows per group, no value model; what each
estimator needs comes from its ``rlhf_fast.algos.EstimatorSpec``.

Everything runs on torch.distributed when a process group is initialised (torchrun): prompts are
sharded by rank, whitening statistics and token counts are global, gradients are averaged by DDP.
"""
from __future__ import annotations

import contextlib
import os
import time
import warnings

import torch
from torch import nn

from rlhf_fast.models import ensure_pad_token
from rlhf_fast.trainer import ppo_step
from rlhf_fast.trainer.batching import (
    PromptSampler,
    check_context,
    collate_prompts,
    group_indices,
    left_pad,
    prompt_token_lists,
)
from rlhf_fast.trainer.controllers import KLController
from rlhf_fast.trainer.distributed import (
    all_reduce_sum,
)
from rlhf_fast.trainer.logging import MetricsLogger, should_log, step_metrics
from rlhf_fast.trainer.optim import autocast_ctx
from rlhf_fast.trainer.ppo_config import PPOConfig
from rlhf_fast.trainer.ppo_step import Advantages, RolloutForward
from rlhf_fast.trainer.rollout import Rollout, prompt_seeds
from rlhf_fast.trainer.setup import (
    build_policy_value,
    build_reward,
    plan_batches,
    resolve_stop_token,
    setup_runtime,
    setup_training,
)
from rlhf_fast.trainer.signals import StopSignal
from rlhf_fast.trainer.trainer_api import TrainerAPI


class NonFiniteError(RuntimeError):
    """Raised when more than ``max_nonfinite_steps`` updates were skipped for non-finite values."""


# =============================================================================== the trainer
class PPOTrainer(TrainerAPI):
    """Drop-in for TRL 1.12's PPOTrainer on rlhf_fast's fused kernels and shared-weight layout.

    Args (TRL's, same order): args (PPOConfig), processing_class (tokenizer), model (causal LM or
    path; None -> args.sft_model_path), ref_model (frozen reference; None -> a copy, LoRA-disabled
    weights with peft_config, or none for a critic-free estimator at kl_coef 0), reward_model (sequence-classification
    model, path, or callable ``(prompts, completions) -> list[float]``; None -> args.reward_model_path),
    train_dataset (rows with ``input_ids`` or ``prompt``), value_model (becomes the separate critic,
    unless args.critic == "shared"), data_collator (used to collate prompt rows when given),
    eval_dataset (for generate_completions), optimizers ((optimizer, scheduler) or (None, None)),
    callbacks (transformers TrainerCallbacks), peft_config (LoRA; the reference is then the
    adapter-disabled policy).
    """

    def __init__(self, args: PPOConfig, processing_class, model=None, ref_model=None, reward_model=None,
                 train_dataset=None, value_model=None, data_collator=None, eval_dataset=None,
                 optimizers=(None, None), callbacks=None, peft_config=None):
        if not isinstance(args, PPOConfig):
            raise TypeError(f"args must be a rlhf_fast PPOConfig, got {type(args).__name__}")
        if ref_model is not None and ref_model is model:
            raise ValueError("model and ref_model cannot be the same object: pass a copy, or None")
        setup_runtime(self, args)

        if processing_class is None:
            raise ValueError("processing_class (the tokenizer) is required")
        self.tokenizer = ensure_pad_token(processing_class)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.stop_token_id = resolve_stop_token(args, self.tokenizer)
        self.data_collator = data_collator
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.prompts = prompt_token_lists(train_dataset, self.tokenizer)

        # ---- models: policy-value layout, reward adapter, batch sizes (TRL's definitions)
        self.log_messages: list[str] = []
        layout = build_policy_value(args, args.sft_model_path if model is None else model, ref_model, value_model,
                                    peft_config, self.tokenizer, self._note, device=self.device,
                                    prompt_len=max(len(p) for p in self.prompts), world_size=self.world_size)
        self.model, self.reference_mode, self.critic_mode = layout
        self.model.to(self.device)
        self.reward = build_reward(args.reward_model_path if reward_model is None else reward_model)
        if isinstance(getattr(self.reward, "model", None), nn.Module):
            self.reward.model.to(self.device)
            if args.padding_free and hasattr(self.reward, "enable_padding_free"):
                if (why := self.reward.enable_padding_free()) is not None:
                    self._note(f"padding_free: reward model: padded forwards ({why})")
        self.prompts_per_step, self.sample_generations_freq = plan_batches(args, self.world_size, len(self.prompts))
        data_seed = args.seed if args.data_seed is None else args.data_seed
        self.sampler = PromptSampler(len(self.prompts), self.prompts_per_step, data_seed, self.rank, self.world_size)
        setup_training(self, optimizers, callbacks, total_steps=args.num_total_batches,
                            num_train_epochs=args.total_episodes / (len(self.prompts) * args.num_generations))
        self.kl_ctl = KLController(args.kl_controller, args.kl_coef, args.kl_target, args.kl_horizon)
        # When the first update is one micro-batch of the whole batch, its forward doubles as the rollout
        # forward (see _first_update_reuses_rollout_forward); False always runs the separate no-grad pass.
        self.reuse_rollout_forward = True
        self._completions_rows: list[dict] = []

    # ------------------------------------------------------------------ setup helpers
    def _note(self, msg: str) -> None:
        self.log_messages.append(msg)
        if self.is_main:
            print(f"[rlhf_fast] {msg}", flush=True)

    def _wrap_distributed(self):
        """DDP or FSDP2 over the trainable model when a process group exists; under FSDP2 the frozen
        reference and reward model are sharded too (see rlhf_fast.trainer.distributed)."""
        if self.world_size == 1:
            return self.model
        from rlhf_fast.trainer.distributed import shard_frozen_models, wrap_model

        wrapped = wrap_model(self.model, self.args, self.device)
        if self.args.distributed_strategy == "fsdp2":
            shard_frozen_models(self)
        return wrapped

    # ------------------------------------------------------------------ public API
    def get_train_dataloader(self):
        return self.sampler

    _progress_name = "PPO"

    def _progress_postfix(self, metrics: dict) -> dict:
        return {"score": f"{metrics['objective/scores']:.3f}", "kl": f"{metrics['objective/kl']:.3f}"}

    def train(self, resume_from_checkpoint: bool | str | None = None):
        """Run ``args.num_total_batches`` PPO steps (resuming from a checkpoint when asked)."""
        from tqdm.auto import tqdm

        a = self.args
        if resume_from_checkpoint:
            from rlhf_fast.trainer.checkpoint import resume_trainer

            resume_trainer(self, resume_from_checkpoint)
        self.logger = MetricsLogger(a.output_dir if self.is_main else None, a.report_to, a.run_name,
                                    enabled=self.is_main, config=a.to_dict() if hasattr(a, "to_dict") else None)
        self.control = self.callback_handler.on_train_begin(a, self.state, self.control)
        self._start_time = time.time()
        self._episodes_at_start = self.state.episode
        bar = tqdm(total=self.state.max_steps, initial=self.state.global_step, desc=self._progress_name,
                   disable=a.disable_tqdm or not self.is_main, dynamic_ncols=True)
        self._stop = StopSignal(announce=self.is_main)
        restore = self._stop.install()
        try:
            while self.state.global_step < self.state.max_steps:
                if self._stop.requested():
                    self._stop_gracefully()
                    break
                self.control = self.callback_handler.on_step_begin(a, self.state, self.control)
                metrics = self.step()
                bar.update(1)
                if metrics is not None:
                    bar.set_postfix(self._progress_postfix(metrics))
                self.control = self.callback_handler.on_step_end(a, self.state, self.control)
                if self.control.should_save:
                    self._save_checkpoint()
                if (self.sample_generations_freq and self.eval_dataset is not None
                        and (self.state.global_step - 1) % self.sample_generations_freq == 0):
                    self.generate_completions(sampling=True)
                if self.control.should_training_stop:
                    break
            else:
                if self._stop.requested():
                    self._stop_gracefully()
        finally:
            restore()
            bar.close()
        self.control = self.callback_handler.on_train_end(a, self.state, self.control)
        if self.control.should_save:
            self._save_checkpoint()
        out = self._train_summary()
        self.logger.close()
        return out

    def _train_summary(self):
        """What ``train`` returns (TRL 1.12's PPOTrainer: nothing); GRPOTrainer logs and returns Trainer's."""
        return None

    # ------------------------------------------------------------------ SIGTERM / Ctrl-C
    def _stop_gracefully(self) -> None:
        """Save the last completed step (unless saving is off or nothing was completed) and end training."""
        done = self.state.global_step
        saved = False
        if done > 0 and str(self.args.save_strategy) not in ("no", "SaveStrategy.NO"):
            from rlhf_fast.trainer.checkpoint import list_checkpoints

            existing = [p.name for p in list_checkpoints(self.args.output_dir)]
            if f"checkpoint-{done}" not in existing:
                self._save_checkpoint()
            saved = True
        self.control.should_training_stop = True
        self.control.should_save = False
        if self.is_main:
            what = f"checkpoint-{done} saved" if saved else "nothing saved"
            print(f"[rlhf_fast] stopped after step {done} ({self._stop.name or 'signal'}): {what}", flush=True)

    def _save_checkpoint(self) -> None:
        from rlhf_fast.trainer.checkpoint import save_checkpoint

        save_checkpoint(self)
        self.control = self.callback_handler.on_save(self.args, self.state, self.control)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the policy (HF format, safetensors) + value head + tokenizer to ``output_dir``."""
        out = output_dir or self.args.output_dir
        if self.args.push_to_hub and not _internal_call:  # as transformers' Trainer.save_model
            self.push_to_hub(commit_message="Model save")
            return
        if self.is_main:
            self.model.save_pretrained(out)

    def log(self, metrics: dict) -> None:
        """Append to ``state.log_history`` (TRL's Trainer.log), fire ``on_log`` and write to the sinks."""
        if self.state.epoch is not None:  # as transformers' Trainer.log, which TRL's trainer uses
            metrics = {**metrics, "epoch": self.state.epoch}
        entry = {**metrics, "step": self.state.global_step}
        self.state.log_history.append(entry)
        self.control = self.callback_handler.on_log(self.args, self.state, self.control, logs=metrics)
        if self.logger is not None:
            self.logger.log(metrics, self.state.global_step)

    # ------------------------------------------------------------------ one PPO step
    def step(self) -> dict | None:
        """One PPO step: prompts, rollout, score, rollout forward, advantages, update, metrics.

        Returns the metrics (None when a non-finite reward skipped the step)."""
        a = self.args
        t0 = time.perf_counter()
        # 1. Prompts: this rank's share of the global batch (group estimators: n contiguous rows per prompt).
        prompt_ids, prompt_mask, seeds = self._next_prompts()
        self.state.episode += a.batch_size
        # 2. Rollout: sample responses with the lean decoder (FSDP2: the root's parameters gathered).
        self.model.eval()
        fsdp = self.world_size > 1 and a.distributed_strategy == "fsdp2"
        with self._full_params(), self._autocast():
            rollout = ppo_step.generate_rollout(
                self.model, prompt_ids, prompt_mask, response_length=a.response_length, temperature=a.temperature,
                pad_token_id=self.pad_token_id, stop_token_ids=self._stop_ids(), seeds=seeds,
                chunk_size=a.local_rollout_forward_batch_size, inference_mode=not fsdp, decode_compile=a.decode_compile)
        t_gen = time.perf_counter()
        # 3. Score: reward model or callable on each row's tokens under the position rules, EOS penalty,
        #    running normalisation, clipping.
        masks = ppo_step.response_masks(rollout, prompt_mask, rules=a.resolved_position_rules,
                                        pad_token_id=self.pad_token_id)
        scores, raw_scores = self._score(rollout, prompt_mask, masks)
        t_score = time.perf_counter()
        if not bool(all_reduce_sum(torch.isfinite(scores).all().float().reshape(1) - 1.0)[0] == 0):
            return self._skip_step("non-finite reward", t0)
        # 4. Rollout forward: old log-probs and values, reference log-probs.
        fwd, first_out = self._rollout_forward(rollout, masks)
        # 5. Advantages: the registered estimator on KL-shaped rewards (or sequence scores).
        spec = a.estimator_spec
        adv = ppo_step.compute_advantages(
            fwd, scores, masks, kl_coef=self.kl_ctl.value, kl_estimator=a.kl_estimator, kl_clamp=a.kl_clamp,
            gamma=a.gamma, lam=a.lam, whiten_rewards=a.whiten_rewards, whiten_advantages=a.whiten_advantages,
            estimator=a.advantage_estimator, num_generations=a.num_generations,
            estimator_kwargs={kw: getattr(a, field) for kw, field in spec.config_kwargs}, group=self.group)
        t_fwd = time.perf_counter()
        # 6. Update: epochs x minibatches x micro-batches of clipped policy (and value) updates.
        stats, skipped, first_epoch = self._update(rollout, masks, fwd, adv, first_out)
        t_upd = time.perf_counter()
        # 7. KL control, state and metrics (TRL's names and formulas).
        mask = masks.policy
        # Entropy and KL of the sampling policy: from the rollout forward, or (on-policy update, no rollout
        # forward) from the first epoch's forwards, which ran on the same weights.
        neg_logprob_sum = (-fwd.logprobs * mask).sum() if fwd.logprobs is not None else first_epoch["neg_logprob_sum"]
        kl_sum = adv.kl.sum() if fwd.logprobs is not None else first_epoch["kl_sum"]
        kl_coef = self.kl_ctl.value
        metrics = step_metrics(
            stats, batch_size=a.batch_size, kl_sum=kl_sum, neg_logprob_sum=neg_logprob_sum, kl_coef=kl_coef,
            raw_scores=raw_scores, eos_token_id=self.tokenizer.eos_token_id,
            response_tokens=rollout.responses, group_scores=None if a.uses_critic else scores,
            num_generations=a.num_generations, group=self.group)
        self.kl_ctl.update(metrics["objective/kl"], a.batch_size)
        self.state.global_step += 1
        self.state.epoch = self.state.episode / (len(self.prompts) * a.num_generations)
        elapsed = time.time() - self._start_time
        metrics["eps"] = int((self.state.episode - self._episodes_at_start) / max(elapsed, 1e-9))
        n_tokens = float(all_reduce_sum(mask.sum().float().reshape(1))[0])
        metrics.update({
            "lr": self.lr_scheduler.get_last_lr()[0], "episode": self.state.episode, "objective/kl_coef": self.kl_ctl.value,
            "time/generate": t_gen - t0, "time/score": t_score - t_gen, "time/forward": t_fwd - t_score,
            "time/update": t_upd - t_fwd, "time/step": t_upd - t0,
            "tokens_per_second": n_tokens / max(t_upd - t0, 1e-9), "skipped_updates": skipped,
        })
        self.lr_scheduler.step()
        if should_log(self.args, self.state, a.batch_size / (len(self.prompts) * a.num_generations)):
            self.log(metrics)
        self._last_rollout = rollout
        return metrics

    def _next_prompts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(prompt_ids int64 [B, P] left-padded, prompt_mask [B, P], sampling seeds int64 [B]) of this step."""
        a = self.args
        indices, epoch = self.sampler.next_batch()
        if a.uses_critic:
            seeds = prompt_seeds(a.seed, indices, epoch)
        else:  # rows [g*n, (g+1)*n) = n samples of prompt g, each with its own seed
            indices, seeds = group_indices(indices, a.num_generations, a.seed, epoch)
        return (*self._prompt_batch(indices), seeds)

    def _stop_ids(self) -> list[int]:
        return [self.stop_token_id] if self.stop_token_id is not None else []

    @torch.no_grad()
    def _score(self, rollout: Rollout, prompt_mask: torch.Tensor, masks) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores used for the advantages, raw scores for the metrics), fp32 [B]."""
        a = self.args
        scores = ppo_step.score_rollout(self.reward, self.tokenizer, rollout, prompt_mask, masks).to(self.device)
        contains_eos = (rollout.responses == self.tokenizer.eos_token_id).any(1) \
            if self.tokenizer.eos_token_id is not None else torch.zeros_like(scores, dtype=torch.bool)
        if a.missing_eos_penalty is not None:
            scores = scores - a.missing_eos_penalty * (~contains_eos).float()
        raw_scores = scores
        if a.reward_norm:
            self.score_moments.update(scores, self.group)
            scores = (scores - self.score_moments.mean) / (self.score_moments.std + 1e-8)
        if a.reward_clip is not None:
            scores = scores.clamp(-a.reward_clip, a.reward_clip)
        return scores, raw_scores

    def _rollout_forward(self, rollout: Rollout, masks):
        """(RolloutForward, first_out): first_out is the first update's forward when it doubles as this one."""
        a = self.args
        need_reference = self.reference_mode != "none"
        kw = dict(temperature=max(a.temperature, 1e-7), need_reference=need_reference,
                  chunk_size=a.local_rollout_forward_batch_size, autocast=self._autocast)
        if not self._first_update_reuses_rollout_forward(rollout):
            return ppo_step.rollout_forward(self.model, rollout, masks, need_policy=not self._on_policy_update(),
                                            **kw), None
        # One forward serves twice: its detached outputs are the old log-probs and values, and its graph
        # is the first update's forward (same weights, no dropout, one micro-batch = the whole batch).
        # The reference runs first, so its transient buffers never overlap the policy's graph.
        ref_fwd = ppo_step.rollout_forward(self.model, rollout, masks, need_policy=False, **kw)
        self.model.train()
        return ppo_step.rollout_forward_with_grad(self.ddp_model, rollout, masks, ref_fwd.ref_logprobs,
                                                  temperature=kw["temperature"], autocast=self._autocast)

    def _skip_step(self, reason: str, t0: float) -> None:
        self.nonfinite_steps += 1
        self.state.global_step += 1
        self.lr_scheduler.step()
        msg = (f"step {self.state.global_step}: {reason}; update skipped "
               f"({self.nonfinite_steps}/{self.args.max_nonfinite_steps} allowed)")
        warnings.warn(msg, stacklevel=2)
        self.log({"nonfinite/skipped_steps": self.nonfinite_steps, "nonfinite/reason": reason,
                  "time/step": time.perf_counter() - t0})
        if self.nonfinite_steps >= self.args.max_nonfinite_steps:
            raise NonFiniteError(f"stopping: {self.nonfinite_steps} steps had non-finite values (last: {reason}); "
                                 "no checkpoint is written from them")
        return None

    def _on_policy_update(self) -> bool:
        """Critic-free, one epoch and one minibatch (TRL GRPO's default): the only update sees the weights
        that sampled, so the old log-probs equal its own (detached) ones and the rollout's policy forward
        is skipped, as TRL does. An estimator with the KL in its rewards still needs them before the update."""
        a = self.args
        if a.uses_critic or a.num_ppo_epochs != 1 or a.num_mini_batches != 1:
            return False
        return not (a.estimator_spec.kl_in_reward and self.reference_mode != "none")

    def _prompt_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seqs = collate_prompts(indices, self.prompts, self.train_dataset, self.data_collator)
        check_context(seqs, self.args.response_length, self.model.policy.config)
        return left_pad(seqs, self.pad_token_id, self.device)

    def _full_params(self):
        """Generation calls the HF model directly (not the wrapped forward): under FSDP2 gather the
        root's sharded parameters for it; the decoder layers gather their own in their hooks."""
        from rlhf_fast.trainer.distributed import unsharded

        return unsharded(self.model) if self.world_size > 1 else contextlib.nullcontext()

    def _autocast(self):
        return autocast_ctx(self.device, bool(self.args.bf16), bool(self.args.fp16))

    def _first_update_reuses_rollout_forward(self, rollout: Rollout) -> bool:
        """PPO with a critic whose first update is one micro-batch holding the whole rollout batch
        (num_mini_batches = 1, no gradient accumulation, nothing chunked) on weights without dropout:
        that update's forward computes exactly the rollout forward's log-probs and values."""
        a = self.args
        if not self.reuse_rollout_forward or not a.uses_critic or a.num_mini_batches != 1 or a.micro_batch_token_budget:
            return False
        B = rollout.responses.shape[0]
        if a.per_device_train_batch_size < B or a.local_rollout_forward_batch_size < B:
            return False
        return self._dropout_free  # the model's dropout is fixed at construction: checked once there

    def _update(self, rollout: Rollout, masks, fwd: RolloutForward, adv: Advantages,
                first_out=None):
        """``ppo_step.ppo_update`` with this trainer's model, optimizer, seed and non-finite policy."""
        self.model.train()
        return ppo_step.ppo_update(
            self.ddp_model, self.optimizer, rollout, masks, fwd, adv, args=self.args, kl_coef=self.kl_ctl.value,
            step_seed=self.args.seed * 7919 + self.state.global_step, world_size=self.world_size,
            autocast=self._autocast, clip_grads=self._clip_grads, on_nonfinite=self._on_nonfinite_grad,
            first_out=first_out)

    def _clip_grads(self) -> torch.Tensor:
        """The gradient norm (for the non-finite check), clipped at max_grad_norm only when clip_grad_norm is on
        (TRL 1.12's PPO loop never clips)."""
        return ppo_step.clip_grad_norm(self.model, self.args.max_grad_norm if self.args.clip_grad_norm else None)

    def _on_nonfinite_grad(self, grad_norm: torch.Tensor) -> None:
        self.nonfinite_steps += 1
        warnings.warn(f"non-finite loss or gradient norm ({float(grad_norm)}): optimizer step skipped", stacklevel=3)
        if self.nonfinite_steps >= self.args.max_nonfinite_steps:
            raise NonFiniteError(f"stopping: {self.nonfinite_steps} updates had non-finite gradients")

    # ------------------------------------------------------------------ sampling for humans
    @torch.no_grad()
    def generate_completions(self, sampling: bool = False) -> list[dict]:
        """Completions for eval_dataset prompts, sampled at temperature 0.01 as TRL does (seeded by the prompt
        and the step), with their scores; prints a table, appends to output_dir/completions.jsonl.
        ``sampling=True`` does only the first batch (TRL's meaning)."""
        import json

        if self.eval_dataset is None:
            return []
        a = self.args
        prompts = prompt_token_lists(self.eval_dataset, self.tokenizer)
        bs = a.per_device_eval_batch_size
        rows = []
        self.model.eval()
        for s in range(0, len(prompts), bs):
            ids, pmask = left_pad(prompts[s:s + bs], self.pad_token_id, self.device)
            with self._autocast():
                ro = ppo_step.generate_rollout(self.model, ids, pmask, response_length=a.response_length,
                                               temperature=0.01, pad_token_id=self.pad_token_id,
                                               stop_token_ids=self._stop_ids(), chunk_size=bs,
                                               seeds=prompt_seeds(a.seed, torch.arange(s, s + ids.shape[0]),
                                                                  self.state.global_step))
            rows += [{"step": self.state.global_step, **row}
                     for row in ppo_step.scored_completions(self.reward, self.tokenizer, ro, pmask)]
            if sampling:
                break
        if self.is_main:
            for r in rows[:5]:
                print(f"[completion] {r['query']!r} -> {r['model response']!r} (score {r['score']:.3f})")
            os.makedirs(a.output_dir, exist_ok=True)
            with open(os.path.join(a.output_dir, "completions.jsonl"), "a", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        self._completions_rows += rows
        return rows

