"""Fused log-prob gathering: LM head -> per-token log-probs (+ entropy) without holding [tokens, vocab].

Given hidden states h [N, H], an LM head W [V, H] (optional bias b [V]) and labels y [N]:
    z = (h @ W.T + b) / temperature                      (fp32 accumulation)
    logp[i] = z[i, y_i] - logsumexp_j z[i, j]
    entropy[i] = logsumexp_j z[i, j] - sum_j p_ij z_ij   (p = softmax(z))
Rows whose label equals ``ignore_index`` give logp = 0 and entropy = 0, and no gradient.
Outputs are fp32 whatever the input dtype.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_fast._backend import dispatch, should_check_values
from rlhf_fast.ops._checks import check_floating, check_positive


class LogProbs(NamedTuple):
    """logprobs: fp32 [...]; entropy: fp32 [...] or None when not requested."""

    logprobs: torch.Tensor
    entropy: torch.Tensor | None


# --------------------------------------------------------------------------- torch reference
def logprobs_from_logits_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogProbs:
    """Pure-torch reference over full logits [..., V] (materialises a log-softmax copy). fp32 out."""
    z = logits.float() / temperature
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logsm = torch.log_softmax(z, dim=-1)
    zero = torch.zeros((), dtype=torch.float32, device=logits.device)
    logp = torch.where(valid, logsm.gather(-1, safe.unsqueeze(-1)).squeeze(-1), zero)
    ent = None
    if return_entropy:
        ent = torch.where(valid, -(logsm.exp() * logsm).sum(-1), zero)
    return LogProbs(logp, ent)


def fused_linear_logprobs_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogProbs:
    """Pure-torch reference: materialises logits [..., V] in the input dtype (as a plain torch
    LM head does), then log-softmax in fp32. Pass fp32 inputs for the fp32 reference."""
    logits = hidden @ weight.t()
    if bias is not None:
        logits = logits + bias
    return logprobs_from_logits_reference(logits, labels, temperature, ignore_index, return_entropy)


# --------------------------------------------------------------------------- validation
def _check_labels(labels: torch.Tensor, shape: torch.Size, device: torch.device, V: int, ignore_index: int) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != shape:
        raise ValueError(f"labels must have shape {tuple(shape)} (hidden without its last dim), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on {device}, got {labels.device}")
    if should_check_values(labels) and labels.numel() > 0:
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            raise ValueError(
                f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, found {labels[bad].flatten()[0].item()}"
            )


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float, got {type(temperature).__name__}")
    check_positive("temperature", temperature)


# --------------------------------------------------------------------------- public API
def logprobs_from_logits(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> LogProbs:
    """Log-probs of ``labels`` under ``logits / temperature`` for callers that already hold logits.

    logits: [..., V] fp32/bf16/fp16. labels: [...] integer, in [0, V) or ignore_index.
    Returns LogProbs(logprobs fp32 [...], entropy fp32 [...] or None). Differentiable in logits.
    """
    check_floating("logits", logits)
    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must be [..., V] with V >= 1, got shape {tuple(logits.shape)}")
    _check_temperature(temperature)
    _check_labels(labels, logits.shape[:-1], logits.device, logits.shape[-1], ignore_index)
    return logprobs_from_logits_reference(logits, labels, temperature, ignore_index, return_entropy)


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str | None = None,
) -> LogProbs:
    """Per-token log-probs (and entropy) of ``labels`` under the LM head, never holding [N, V].

    hidden: [..., H] fp32/bf16/fp16. weight: [V, H], same dtype and device. labels: [...] integer
    in [0, V) or ``ignore_index``. bias: optional [V]. Logits are divided by ``temperature`` (> 0).
    chunk_size: rows per chunk (None picks one). backend: None | "triton" | "cpp" | "torch".
    Returns LogProbs(logprobs fp32 [...], entropy fp32 [...] or None); ignore_index rows give 0
    in both and no gradient. Differentiable in hidden, weight and bias through both outputs.
    """
    check_floating("hidden", hidden)
    check_floating("weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"hidden must be [..., H], got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have V >= 1 rows, got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight must be on hidden's device {hidden.device}, got {weight.device}")
    V = weight.shape[0]
    if bias is not None:
        check_floating("bias", bias)
        if bias.shape != (V,):
            raise ValueError(f"bias must be [V={V}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise ValueError(f"bias must be {hidden.dtype} on {hidden.device}, got {bias.dtype} on {bias.device}")
    _check_temperature(temperature)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    _check_labels(labels, hidden.shape[:-1], hidden.device, V, ignore_index)
    dispatch(hidden, backend)
    # TODO(issue 3): chunked cpp / torch and Triton paths; the reference keeps the API importable meanwhile.
    return fused_linear_logprobs_reference(hidden, weight, labels, bias, temperature, ignore_index, return_entropy)
