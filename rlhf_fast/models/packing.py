"""Padding-free forwards: the valid tokens of a padded batch as one packed row, attention kept per sequence.

A packed row holds the attended tokens of every row of a [B, T] batch back to back ([1, N], N = number of
valid tokens), with position ids restarting at each sequence and ``cu_seqlens`` int32 [S + 1] marking the
sequence boundaries. The linear layers, norms and MLPs then run on N tokens instead of B x T, and
attention runs inside each sequence only:

- CUDA with flash-attn installed: transformers' own ``flash_attention_2`` path, which reads the packed
  position ids (varlen kernels);
- otherwise (CPU, or CUDA without flash-attn): ``rlhf_fast_packed_sdpa``, an attention implementation
  registered with transformers that runs ``scaled_dot_product_attention`` per sequence of the packed row
  (cost: the sum of the squared sequence lengths, not the square of N), and is plain SDPA (same kernel,
  same numbers) for every unpacked call, so a model switched to it still decodes and runs padded batches
  exactly as with "sdpa" (the lean decoder accepts it).

``packed_hidden`` returns the last hidden states scattered back to [B, T, H] (zeros at padding), so the
callers' response slicing, fused log-probs and value heads are unchanged. Architectures whose attention
is not SDPA or flash-attn keep the padded forward (``packing_unsupported_reason`` says why).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

__all__ = ["PACKED_SDPA", "PackedBatch", "pack_batch", "packed_hidden", "enable_packing",
           "packing_unsupported_reason", "packed_sdpa_attention"]

PACKED_SDPA = "rlhf_fast_packed_sdpa"
_FLASH = ("flash_attention_2", "flash_attention_3")


class PackedBatch(NamedTuple):
    """input_ids / position_ids int64 [1, N]; cu_seqlens int32 [S + 1]; max_len (longest sequence);
    index int64 [N]: the flat position (b * T + t) in the padded batch of each packed token."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_len: int
    index: torch.Tensor


def pack_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PackedBatch:
    """Pack the attended tokens of ``input_ids`` [B, T] (``attention_mask`` [B, T], 0/1 or bool) row by row.

    Each row's attended tokens, in order, form one sequence with positions 0, 1, 2, ...: exactly what the
    padded forward computes for them (masked tokens, padding or holes, are invisible to the others and
    positions count attended tokens only, as ``position_ids_from_mask`` does)."""
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, T], got {tuple(input_ids.shape)} and "
                         f"{tuple(attention_mask.shape)}")
    m = attention_mask.bool()
    lengths = m.sum(1)
    index = m.flatten().nonzero().flatten()
    position_ids = (m.long().cumsum(1) - 1).flatten()[index]
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=input_ids.device)
    cu[1:] = lengths.cumsum(0)
    return PackedBatch(input_ids.flatten()[index][None], position_ids[None], cu, int(lengths.max()) if lengths.numel()
                       else 0, index)


def packed_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs):
    """An attention implementation for transformers: per-sequence causal SDPA when the call carries
    ``cu_seq_lens_q`` (a packed row: query [1, Hq, N, D], key / value [1, Hkv, N, D]), plain SDPA otherwise.
    Returns (output [1, N, Hq, D], None) as transformers' implementations do."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    bounds = cu.tolist()
    parts = [torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, dropout_p=p, scale=scaling,
        enable_gqa=gqa) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    out = torch.cat(parts, dim=2) if parts else query.new_zeros(query.shape)
    return out.transpose(1, 2).contiguous(), None


def _packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """The mask for ``PACKED_SDPA``: none for a packed row (attention stays inside each sequence there) or an
    unpadded causal batch; SDPA's own mask for a padded one."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, _packed_sdpa_mask)
    _registered = True


def packing_unsupported_reason(model: nn.Module) -> str | None:
    """Why ``model`` cannot run packed forwards (None when it can): its attention must be SDPA (switched to
    ``PACKED_SDPA``), ``PACKED_SDPA`` already, or flash-attn."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl in ("sdpa", PACKED_SDPA, *_FLASH):
        return None
    return f"attention implementation {impl!r} (packing needs sdpa or flash-attn)"


def enable_packing(model: nn.Module) -> str | None:
    """Make ``model`` (a transformers model or backbone) able to run packed rows: SDPA models switch to
    ``PACKED_SDPA`` (identical for unpacked calls). Returns None, or why the model keeps padded forwards."""
    reason = packing_unsupported_reason(model)
    if reason is None and model.config._attn_implementation == "sdpa":
        _register()
        for m in model.modules():  # one config object is usually shared; sub-configs may not be
            cfg = getattr(m, "config", None)
            if cfg is not None and getattr(cfg, "_attn_implementation", None) == "sdpa":
                cfg._attn_implementation = PACKED_SDPA
    return reason


def packed_hidden(backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """last_hidden_state [B, T, H] of ``backbone`` computed on the packed valid tokens (zeros at padding).

    The backbone must have been through ``enable_packing``."""
    packed = pack_batch(input_ids, attention_mask)
    B, T = input_ids.shape
    # The sequence boundaries for the attention (flash-attn's varlen kernels take them as they are; they
    # would otherwise be derived from the restarting position ids).
    kwargs = {"cu_seq_lens_q": packed.cu_seqlens, "cu_seq_lens_k": packed.cu_seqlens,
              "max_length_q": packed.max_len, "max_length_k": packed.max_len}
    out = backbone(input_ids=packed.input_ids, attention_mask=None, position_ids=packed.position_ids,
                   use_cache=False, **kwargs)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    full = h.new_zeros(B * T, h.shape[-1])
    full = full.index_copy(0, packed.index, h[0])
    return full.view(B, T, -1)
