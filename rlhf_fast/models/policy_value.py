"""Policy + value (+ reference) on one trainable backbone, for any Hugging Face causal LM.

Layout (``PolicyValueModel``):
- ``policy``: the causal LM (peft-wrapped in ``reference="lora"`` mode). Only its backbone runs; the LM
  head's weight [V, H] (and bias) go to ``fused_linear_logprobs``, so [tokens, V] logits never exist.
- ``value_head``: ``nn.Linear(H, 1)`` in fp32 on the last hidden state.
- ``critic="shared"``: the value head reads the policy backbone's hidden states; the value gradient
  entering the backbone is multiplied by ``vf_coef`` (the value head itself gets the full gradient).
  **The trainer therefore adds the value loss with weight 1**: ``(pg_loss + vf_loss).backward()``.
  ``critic="separate"``: a second backbone (from a reward/value ``AutoModelForSequenceClassification``,
  whose ``score`` head initialises the value head; a copy of the policy backbone when none is given);
  no value gradient reaches the policy.
  ``critic="none"``: no value head and no critic backbone at all (critic-free estimators: GRPO, RLOO,
  REINFORCE++); ``value_head`` is None and ``forward`` returns ``values=None``.
- reference: ``"lora"`` (same weights, adapters disabled), ``"frozen"`` (``FrozenReference``: bf16/fp16/
  fp32 copy, optionally offloaded to host memory between uses) or ``"none"`` (KL coefficient 0).

Alignment. The hidden state at position t predicts token t+1 (TRL 1.12 PPO convention, values too:
``value = full_value[:, context_length - 1 : -1]``, i.e. the value for response token t comes from the
hidden state at t-1, the same one that gives its log-prob). Two input forms:
- ``response_start=P``: ``input_ids`` [B, P + R] = left-padded prompts [B, P] + right-padded responses
  [B, R]. Returns [B, R]: entry j is log p(input_ids[:, P + j] | input_ids[:, :P + j]) and the value from
  the hidden state at P + j - 1. The last prompt column must be a real token (left padding).
- ``response_mask`` [B, T] (bool/0-1, general form, e.g. multi-turn): returns [B, T] aligned with
  ``input_ids``; entry t scores token t from the hidden state at t-1; ``response_mask[:, 0]`` must be 0.
Log-probs (and entropy) are 0 where the token is not scored (mask 0 / padding) and carry no gradient
there. Values are returned unmasked, as TRL does; masking them is the loss's job.
Positions come from the attention mask (left pads do not shift positions), so a left-padded row
computes exactly what it computes without padding.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from rlhf_fast._backend import should_check_values
from rlhf_fast.models.loading import (
    backbone_hidden,
    ensure_pad_token,
    get_backbone,
    get_lm_head,
    load_causal_lm,
    position_ids_from_mask,
)
from rlhf_fast.models.packing import enable_packing, packed_hidden, packing_unsupported_reason
from rlhf_fast.models.patching import patch_backbone
from rlhf_fast.models.reference import FrozenReference
from rlhf_fast.models.reward import classifier_backbone, score_head
from rlhf_fast.ops import fused_linear_logprobs

REFERENCE_MODES = ("lora", "frozen", "none")
CRITIC_MODES = ("shared", "separate", "none")
VALUE_HEAD_FILE = "value_head.pt"
IGNORE_INDEX = -100


class ModelOutput(NamedTuple):
    """logprobs: fp32 [B, R] or [B, T]; entropy: fp32, same shape, or None; values: fp32, same shape, or None."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None
    values: torch.Tensor | None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale`` (the shared critic's vf_coef)."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def _disable_dropout(model: nn.Module) -> None:
    """PPO ratios must be 1 at the first step: no dropout anywhere (as TRL's disable_dropout does)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def _is_peft_model(model) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def _enable_checkpointing(model: nn.Module, kwargs: dict | None = None) -> None:
    """Activation checkpointing (transformers >= 5 name first, the older one as fallback); ``kwargs`` go to
    torch.utils.checkpoint (default non-reentrant)."""
    kwargs = {"use_reentrant": False} if kwargs is None else dict(kwargs)
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing (no *_checkpointing_enable)")


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on for ``model`` (a transformers model or backbone)."""
    for attr in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), attr) or hasattr(model, attr):
            return bool(getattr(model, attr))
    return False


def _check_batch(input_ids, attention_mask, response_start, response_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    if input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
    if (response_start is None) == (response_mask is None):
        raise ValueError("give exactly one of response_start= (int, prompt width P) or response_mask= ([B, T])")
    T = input_ids.shape[1]
    if response_start is not None:
        if not isinstance(response_start, int) or isinstance(response_start, bool):
            raise TypeError(f"response_start must be an int, got {type(response_start).__name__}")
        if not 1 <= response_start < T:
            raise ValueError(f"response_start must be in [1, {T - 1}] for input_ids with T={T}, got {response_start}")
        if should_check_values(attention_mask) and not bool(attention_mask[:, response_start - 1].bool().all()):
            rows = (~attention_mask[:, response_start - 1].bool()).nonzero().flatten().tolist()
            raise ValueError(
                f"attention_mask[:, response_start - 1] must be 1 (prompts left-padded, the last prompt column a "
                f"real token), but rows {rows[:8]} have padding there: left-pad the prompts or pass response_mask="
            )
    else:
        if not isinstance(response_mask, torch.Tensor) or response_mask.shape != input_ids.shape:
            got = tuple(response_mask.shape) if isinstance(response_mask, torch.Tensor) else type(response_mask).__name__
            raise ValueError(f"response_mask must have the shape of input_ids {tuple(input_ids.shape)}, got {got}")
        if should_check_values(response_mask) and bool(response_mask[:, 0].bool().any()):
            raise ValueError("response_mask[:, 0] must be 0: the first token has no hidden state before it to predict it")


def _predictor_slices(hidden, input_ids, attention_mask, response_start, response_mask):
    """(hidden states that predict each scored token [B, N, H], labels [B, N] with ignore_index, pad_front)."""
    if response_start is not None:
        P = response_start
        h = hidden[:, P - 1 : -1]
        tokens, scored = input_ids[:, P:], attention_mask[:, P:].bool()
        pad_front = 0
    else:
        h = hidden[:, :-1]
        tokens, scored = input_ids[:, 1:], response_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
        pad_front = 1  # entry 0 of a [B, T] output has nothing predicting it
    labels = torch.where(scored, tokens, torch.full_like(tokens, IGNORE_INDEX))
    return h, labels, pad_front


def _front_pad(x: torch.Tensor | None, n: int) -> torch.Tensor | None:
    if x is None or n == 0:
        return x
    return torch.nn.functional.pad(x, (n, 0))


class PolicyValueModel(nn.Module):
    """One trainable causal-LM backbone giving response log-probs, entropy and values in one forward.

    Args:
        model: a transformers causal LM (in memory) or a local directory / model name to load. An
            in-memory model becomes the policy itself (not copied): LoRA injection, dtype cast and
            dropout removal happen on it.
        reference: "lora" | "frozen" | "none" (see module docstring).
        critic: "shared" | "separate" | "none" (no value head, no critic: values are None). critic_model: optional AutoModelForSequenceClassification
            (num_labels=1) whose backbone becomes the separate critic and whose ``score`` initialises
            the value head.
        vf_coef: value-gradient scale into the shared backbone.
        lora_config: a ``peft.LoraConfig`` or dict of its fields (reference="lora"); default r=8,
            alpha=16, all linear layers except the LM head.
        reference_dtype, reference_offload: the frozen copy's dtype and host offload between uses.
        gradient_checkpointing: recompute backbone activations in backward; gradient_checkpointing_kwargs go
            to torch.utils.checkpoint (default ``{"use_reentrant": False}``).
        fused_backbone: swap rlhf_fast's fused RMSNorm (+ residual), SwiGLU and rotary kernels into this model
            instance (``rlhf_fast.models.patching``; Llama / Qwen2 / Mistral, others unchanged).
        attn_implementation: None/"auto" (flash_attention_2 on CUDA with flash-attn, else sdpa) or a name.
        dtype: parameter dtype of the trainable policy (fp32 master weights by default).
        tokenizer: optional; given a tokenizer without pad token, its EOS becomes pad (with a warning).
        temperature: default sampling temperature the log-probs are computed at.
    """

    def __init__(
        self,
        model,
        *,
        reference: str = "frozen",
        critic: str = "shared",
        critic_model: nn.Module | None = None,
        vf_coef: float = 0.1,
        lora_config=None,
        reference_dtype: torch.dtype = torch.bfloat16,
        reference_offload: bool = False,
        gradient_checkpointing: bool = False,
        gradient_checkpointing_kwargs: dict | None = None,
        attn_implementation: str | None = None,
        dtype: torch.dtype | None = torch.float32,
        tokenizer=None,
        temperature: float = 1.0,
        disable_dropout: bool = True,
        model_adapter_name: str | None = None,
        ref_adapter_name: str | None = None,
        fused_backbone: bool = False,
        reference_model: nn.Module | None = None,
    ):
        super().__init__()
        if reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {reference!r}")
        if critic not in CRITIC_MODES:
            raise ValueError(f"critic must be one of {CRITIC_MODES}, got {critic!r}")
        if not (isinstance(vf_coef, (int, float)) and vf_coef >= 0):
            raise ValueError(f"vf_coef must be a number >= 0, got {vf_coef!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if critic_model is not None and critic != "separate":
            raise ValueError("critic_model is only used with critic='separate'; pass critic='separate' or drop it")
        if lora_config is not None and reference != "lora":
            raise ValueError(
                f"lora_config given with reference={reference!r}: LoRA training uses reference='lora' "
                f"(the reference is the base weights with adapters disabled)"
            )
        if reference == "lora":
            try:
                import peft  # noqa: F401
            except ImportError:
                raise ImportError(
                    "reference='lora' needs the peft package: pip install peft (or use reference='frozen')"
                ) from None

        self.tokenizer = ensure_pad_token(tokenizer) if tokenizer is not None else None
        peft_given = _is_peft_model(model)
        if peft_given and (reference != "lora" or lora_config is not None):
            raise ValueError("a peft model (adapters already attached) trains its adapters with reference='lora' "
                             "and no lora_config; pass the base model with lora_config to attach new ones")
        if ref_adapter_name is not None and not peft_given:
            raise ValueError(f"ref_adapter_name={ref_adapter_name!r} needs a peft model holding that adapter")
        if peft_given:
            for name in (model_adapter_name, ref_adapter_name):
                if name is not None and name not in model.peft_config:
                    raise ValueError(f"adapter {name!r} is not in the peft model (it has {sorted(model.peft_config)})")
            if model_adapter_name is not None:
                model.set_adapter(model_adapter_name)
        self.model_adapter_name, self.ref_adapter_name = model_adapter_name, ref_adapter_name
        self.padding_free = False  # enable_padding_free() switches the forwards to packed rows
        base = model if peft_given else load_causal_lm(model, dtype=dtype, attn_implementation=attn_implementation)
        if disable_dropout:
            _disable_dropout(base)
        # Fused RMSNorm / SwiGLU / rotary kernels, before the reference copy, the critic copy and LoRA
        # take the model, so they inherit them (per instance: other models in the process stay as they are).
        self.patch_report = patch_backbone(base) if fused_backbone else None
        self.reference_mode = reference
        self.critic_mode = critic
        self.vf_coef = float(vf_coef)
        self.temperature = float(temperature)

        # The frozen copy is taken before LoRA or checkpointing touch the model. A reference_model given
        # (TRL's ref_model) is used in place: the caller holds it anyway, so a copy would double its bytes.
        if reference_model is not None and reference != "frozen":
            raise ValueError(f"reference_model is only used with reference='frozen', got reference={reference!r}")
        if reference_model is not None:
            if fused_backbone:
                patch_backbone(reference_model)
            self.reference = FrozenReference(reference_model, reference_dtype, reference_offload, copy_model=False)
        elif reference == "frozen":
            self.reference = FrozenReference(base, reference_dtype, reference_offload)
        else:
            self.reference = None

        H = base.config.get_text_config().hidden_size
        device = get_lm_head(base).weight.device
        # fp32 value head; nn.Linear's default init (not zeros: a zero head passes no gradient to the trunk).
        # critic="none" builds none: no parameters, gradients or optimizer state for a critic.
        self.value_head = nn.Linear(H, 1, dtype=torch.float32, device=device) if critic != "none" else None
        self.critic_backbone = None
        if critic == "separate":  # built from the untouched model, before LoRA / checkpointing
            self.critic_backbone = self._build_critic(critic_model, base, H, dtype, gradient_checkpointing,
                                                      gradient_checkpointing_kwargs, disable_dropout)

        if gradient_checkpointing:
            _enable_checkpointing(base, gradient_checkpointing_kwargs)
        if reference == "lora" and not peft_given:
            base = self._wrap_lora(base, lora_config)
            if disable_dropout:
                _disable_dropout(base)  # also any lora_dropout the config asked for
        self.policy = base
        causal = base.get_base_model() if reference == "lora" else base
        # Views into self.policy, kept out of the module tree so state_dict has no duplicate keys.
        object.__setattr__(self, "backbone", get_backbone(causal))
        object.__setattr__(self, "lm_head", get_lm_head(causal))
        if hasattr(self.lm_head, "base_layer"):
            raise ValueError(
                "the LoRA config adapts the LM head, which the fused log-prob path reads as a plain weight: "
                "exclude it from target_modules (the default 'all-linear' already does)"
            )

    # ------------------------------------------------------------------ construction helpers
    @staticmethod
    def _wrap_lora(base: nn.Module, lora_config) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        if lora_config is None:
            lora_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
        elif isinstance(lora_config, dict):
            lora_config = LoraConfig(**{"task_type": "CAUSAL_LM", **lora_config})
        elif not isinstance(lora_config, LoraConfig):
            raise TypeError(f"lora_config must be a peft.LoraConfig or a dict, got {type(lora_config).__name__}")
        return get_peft_model(base, lora_config)

    def _build_critic(self, critic_model, causal, H, dtype, gradient_checkpointing, checkpointing_kwargs,
                      disable_dropout) -> nn.Module:
        import copy

        if critic_model is None:
            critic = copy.deepcopy(get_backbone(causal))
        else:
            head = score_head(critic_model)
            if head.out_features != 1 or head.in_features != H:
                raise ValueError(
                    f"critic_model's score head must be Linear({H}, 1) (num_labels=1, the policy's hidden size), "
                    f"got Linear({head.in_features}, {head.out_features})"
                )
            critic = classifier_backbone(critic_model)
            if self.patch_report is not None:
                patch_backbone(critic)
            if head.bias is None:  # the critic's own head (as TRL trains it): a bias-free Linear stays bias-free
                self.value_head = nn.Linear(H, 1, bias=False, dtype=torch.float32, device=self.value_head.weight.device)
            with torch.no_grad():
                self.value_head.weight.copy_(head.weight.float())
                if head.bias is not None:
                    self.value_head.bias.copy_(head.bias.float())
        if dtype is not None:
            critic = critic.to(dtype)
        critic = critic.to(self.value_head.weight.device)
        if disable_dropout:
            _disable_dropout(critic)
        for p in critic.parameters():
            p.requires_grad_(True)
        if gradient_checkpointing:
            _enable_checkpointing(critic, checkpointing_kwargs)
        return critic

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> PolicyValueModel:
        """Load the policy from a local directory (``save_pretrained`` output) and, when present, its value head."""
        pv = cls(os.fspath(path), **kwargs)
        vh = Path(path) / VALUE_HEAD_FILE
        if vh.is_file() and pv.value_head is not None:
            pv.value_head.load_state_dict(torch.load(vh, map_location=pv.value_head.weight.device, weights_only=True))
        return pv

    # ------------------------------------------------------------------ core
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def enable_padding_free(self) -> list[str]:
        """Run every backbone forward (policy, separate critic, frozen reference) on packed rows of the valid
        tokens (``rlhf_fast.models.packing``); outputs keep their [B, T] shapes. Returns one note per model that
        keeps padded forwards (its attention implementation cannot pack)."""
        notes = []
        models = {"policy": self.backbone, "critic": self.critic_backbone,
                  "reference": None if self.reference is None else self.reference.model}
        for name, m in models.items():
            if m is not None and (why := enable_packing(m)) is not None:
                notes.append(f"{name}: padded forwards ({why})")
        self.padding_free = True
        return notes

    def _hidden(self, backbone, input_ids, attention_mask) -> torch.Tensor:
        """last hidden states [B, T, H]: from a packed row of the valid tokens when padding-free (zeros at
        padding), else from the padded batch."""
        if self.padding_free and packing_unsupported_reason(backbone) is None:
            return packed_hidden(backbone, input_ids, attention_mask)
        return backbone_hidden(backbone, input_ids, attention_mask, position_ids_from_mask(attention_mask))

    def _token_logprobs(self, backbone, lm_head, input_ids, attention_mask, response_start, response_mask,
                        return_entropy, temperature):
        hidden = self._hidden(backbone, input_ids, attention_mask)
        h, labels, pad_front = _predictor_slices(hidden, input_ids, attention_mask, response_start, response_mask)
        if self.padding_free:  # the LM head on the scored tokens only, scattered back to [B, N]
            scored = labels != IGNORE_INDEX
            out = fused_linear_logprobs(h[scored], lm_head.weight, labels[scored], bias=lm_head.bias,
                                        temperature=temperature, ignore_index=IGNORE_INDEX,
                                        return_entropy=return_entropy)
            lp = h.new_zeros(labels.shape, dtype=out[0].dtype).masked_scatter(scored, out[0])
            ent = None if out[1] is None else h.new_zeros(labels.shape, dtype=out[1].dtype).masked_scatter(scored, out[1])
        else:
            lp, ent = fused_linear_logprobs(
                h, lm_head.weight, labels, bias=lm_head.bias, temperature=temperature,
                ignore_index=IGNORE_INDEX, return_entropy=return_entropy,
            )
        return hidden, h, _front_pad(lp, pad_front), _front_pad(ent, pad_front), pad_front

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int | None = None,
        response_mask: torch.Tensor | None = None,
        return_entropy: bool = False,
        return_values: bool = True,
        temperature: float | None = None,
    ) -> ModelOutput:
        """Log-probs (+ entropy) of the scored tokens and values, in one backbone pass (two with a separate critic).

        input_ids, attention_mask: [B, T]; give ``response_start`` (int P) or ``response_mask`` [B, T].
        Returns ModelOutput of fp32 [B, T - P] (or [B, T]) tensors; values is None with critic="none"
        (or return_values=False).
        """
        _check_batch(input_ids, attention_mask, response_start, response_mask)
        temperature = self.temperature if temperature is None else temperature
        hidden, h, logprobs, entropy, pad_front = self._token_logprobs(
            self.backbone, self.lm_head, input_ids, attention_mask, response_start, response_mask,
            return_entropy, temperature,
        )
        values = None
        if return_values and self.value_head is not None:
            if self.critic_backbone is None:
                values = self.value_head(_ScaleGrad.apply(h, self.vf_coef).float()).squeeze(-1)
            else:
                ch = self._hidden(self.critic_backbone, input_ids, attention_mask)
                ch, _, _ = _predictor_slices(ch, input_ids, attention_mask, response_start, response_mask)
                values = self.value_head(ch.float()).squeeze(-1)
            values = _front_pad(values, pad_front)
        return ModelOutput(logprobs, entropy, values)

    @torch.no_grad()
    def reference_logprobs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_start: int | None = None,
        response_mask: torch.Tensor | None = None,
        temperature: float | None = None,
    ) -> torch.Tensor:
        """Log-probs of the same tokens under the reference policy, fp32, no grad. Shapes as ``forward``."""
        if self.reference_mode == "none":
            raise ValueError("reference='none' has no reference policy (use it only with kl_coef=0)")
        _check_batch(input_ids, attention_mask, response_start, response_mask)
        temperature = self.temperature if temperature is None else temperature
        if self.reference_mode == "lora":
            with self._reference_adapter():
                out = self._token_logprobs(self.backbone, self.lm_head, input_ids, attention_mask,
                                           response_start, response_mask, False, temperature)
            return out[2]
        ref = self.reference
        ref.onload(self.device)
        try:
            was = ref.model.training
            out = self._token_logprobs(ref.backbone, ref.lm_head, input_ids, attention_mask,
                                       response_start, response_mask, False, temperature)
            ref.model.train(was)
        finally:
            if ref.auto_offload:
                ref.offload()
        return out[2]

    @contextlib.contextmanager
    def _reference_adapter(self):
        """The reference of a LoRA policy: adapters disabled, or (TRL's ref_adapter_name) that adapter active,
        then the trained one (model_adapter_name, else "default") again."""
        if self.ref_adapter_name is None:
            with self.policy.disable_adapter():
                yield
            return
        self.policy.set_adapter(self.ref_adapter_name)
        try:
            yield
        finally:
            self.policy.set_adapter(self.model_adapter_name or "default")

    # ------------------------------------------------------------------ bookkeeping
    def components(self) -> dict[str, object]:
        """name -> module for ``rlhf_fast.memory.layout_bytes``: policy, value_head, critic, reference."""
        comps: dict[str, object] = {"policy": self.policy}
        if self.value_head is not None:
            comps["value_head"] = self.value_head
        if self.critic_backbone is not None:
            comps["critic"] = self.critic_backbone
        if self.reference is not None:
            comps["reference"] = self.reference.model
        return comps

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def value_head_state_dict(self) -> dict[str, torch.Tensor]:
        if self.value_head is None:
            return {}
        return {k: v.detach().clone() for k, v in self.value_head.state_dict().items()}

    def save_pretrained(self, directory, **kwargs) -> None:
        """Write the policy (full weights, or LoRA adapters in "lora" mode), the value head
        (``value_head.pt``, not with critic="none"), the separate critic backbone (``critic/``) and the tokenizer if any."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.policy.save_pretrained(d, **kwargs)
        if self.value_head is not None:
            torch.save(self.value_head_state_dict(), d / VALUE_HEAD_FILE)
        if self.critic_backbone is not None and hasattr(self.critic_backbone, "save_pretrained"):
            self.critic_backbone.save_pretrained(d / "critic", **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(d)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.reference is not None:
            self.reference.model.eval()  # never in train mode
        return self

