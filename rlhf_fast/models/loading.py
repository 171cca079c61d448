"""Loading Hugging Face causal LMs and taking them apart: backbone, LM head, attention choice, pad token.

The engine never calls a causal LM's own ``forward`` in the hot path (that would apply the LM head to
every position): it runs the backbone (``model.get_decoder()``, for GPT-2 ``model.transformer``) and
hands the hidden states to ``fused_linear_logprobs`` with the LM head's weight [V, H] (and bias).
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from pathlib import Path

import torch
from torch import nn

# Families the tests run on; others that follow the same HF layout (get_decoder + get_output_embeddings)
# work too, but are not checked by our test suite.
TESTED_MODEL_TYPES = ("llama", "qwen2", "mistral", "gpt2")


def resolve_attn_implementation(requested: str | None = None, device: torch.device | str | None = None) -> str:
    """The attention kernel to ask transformers for.

    ``None``/"auto": "flash_attention_2" when flash-attn is importable and the model runs on CUDA,
    else "sdpa". An explicit name ("eager", "sdpa", "flash_attention_2", ...) passes through, except that
    "flash_attention_2" without flash-attn installed raises with the fix.
    """
    on_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if requested in (None, "auto"):
        return "flash_attention_2" if (has_flash and on_cuda) else "sdpa"
    if not isinstance(requested, str):
        raise TypeError(f"attn_implementation must be a string or None, got {type(requested).__name__}")
    if requested == "flash_attention_2" and not has_flash:
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package on a CUDA machine "
            "(pip install 'rlhf_fast[flash]'); use 'sdpa' otherwise"
        )
    return requested


def _is_local_dir(x) -> bool:
    return isinstance(x, (str, os.PathLike)) and Path(x).is_dir()


def load_causal_lm(
    model_or_path,
    dtype: torch.dtype | None = torch.float32,
    attn_implementation: str | None = None,
    **from_pretrained_kwargs,
) -> nn.Module:
    """A causal LM from a local directory (``save_pretrained`` output), a hub name, or an in-memory model.

    In-memory models are used as given (not copied); ``dtype`` casts them only when it differs, and
    ``attn_implementation`` is applied with ``set_attn_implementation``. Raises for objects that are not
    causal LMs, naming the class to load instead.
    """
    attn = resolve_attn_implementation(attn_implementation)
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        check_causal_lm(model)
        if dtype is not None and next(model.parameters()).dtype != dtype:
            model = model.to(dtype)
        if attn_implementation is not None and hasattr(model, "set_attn_implementation"):
            model.set_attn_implementation(attn)
        return model
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise TypeError(
            f"model must be a transformers causal LM, a local directory or a model name, got {type(model_or_path).__name__}"
        )
    if isinstance(model_or_path, os.PathLike) and not _is_local_dir(model_or_path):
        raise ValueError(f"model directory {os.fspath(model_or_path)!r} does not exist")
    from transformers import AutoModelForCausalLM

    model = from_pretrained_or_explain(AutoModelForCausalLM.from_pretrained, os.fspath(model_or_path), "model",
                                       dtype=dtype, attn_implementation=attn, **from_pretrained_kwargs)
    check_causal_lm(model)
    return model


def looks_like_path(name: str) -> bool:
    """A name meant as a filesystem path (absolute, ./, ../, ~), not a hub id like "Qwen/Qwen2.5-0.5B"."""
    return os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name


def from_pretrained_or_explain(load, name: str, what: str, **kwargs):
    """``load(name, **kwargs)`` (a ``from_pretrained``), with one clear FileNotFoundError naming ``name`` when it is
    a missing local path, or neither a local directory nor something the hub can serve (offline, or no such
    repo), instead of the hub client's traceback."""
    if looks_like_path(name) and not Path(name).expanduser().exists():
        raise FileNotFoundError(f"{what} path {name!r} does not exist (no such directory)")
    try:
        return load(name, **kwargs)
    except OSError as e:
        if Path(name).expanduser().is_dir():
            raise
        raise FileNotFoundError(f"{what} {name!r} is not a local directory and could not be loaded from the "
                                f"Hugging Face hub ({str(e).splitlines()[0]})") from e


def check_causal_lm(model: nn.Module) -> None:
    """Raise when ``model`` is not a decoder-only transformers LM with an LM head."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (e.g. AutoModelForCausalLM.from_pretrained(...)), "
            f"got {type(model).__name__}"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; rlhf_fast supports decoder-only causal LMs "
            f"({', '.join(TESTED_MODEL_TYPES)} families, ...)"
        )
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no LM head (get_output_embeddings() is None): load the policy with "
            f"AutoModelForCausalLM, not AutoModel / AutoModelForSequenceClassification"
        )
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    name = type(model).__name__
    if name not in causal_names and not name.endswith(("ForCausalLM", "LMHeadModel")):
        raise ValueError(
            f"{name} is not a causal LM (model_type {getattr(config, 'model_type', '?')!r}): load it with "
            f"AutoModelForCausalLM so the LM head predicts the next token"
        )
    get_backbone(model)  # raises with the fix when the layout is unknown


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack returning ``last_hidden_state`` [B, T, H] (before the LM head).

    ``model.get_decoder()`` (Llama, Qwen2, Mistral, GPT-2 in transformers >= 5), else ``model.transformer``
    (older GPT-2 style), else ``model.model``.
    """
    getter = getattr(model, "get_decoder", None)
    if callable(getter):
        try:
            dec = getter()
        except (AttributeError, NotImplementedError):
            dec = None
        if isinstance(dec, nn.Module) and dec is not model:
            return dec
    for attr in ("transformer", "model"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    raise ValueError(
        f"cannot find the decoder stack of {type(model).__name__}: expected get_decoder(), .transformer or .model. "
        f"Supported families: {', '.join(TESTED_MODEL_TYPES)} (and others with the same HF layout)"
    )


def get_lm_head(model: nn.Module) -> nn.Module:
    """The LM head module (weight [V, H], maybe tied to the input embeddings, maybe with a bias)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no LM head: load the policy with AutoModelForCausalLM")
    return head


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens: left pads get 0, the first real token 0, then 1, 2, ...

    attention_mask: [B, T] 0/1 (or bool). Returns int64 [B, T]. This is what makes a left-padded row
    compute exactly what the same row without padding computes.
    """
    m = attention_mask.long()
    return (m.cumsum(-1) - 1).clamp_min(0)


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token the EOS token as pad (with a warning); returns the tokenizer.

    Raises when there is neither a pad nor an EOS token, naming the fix.
    """
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer
    eos = getattr(tokenizer, "eos_token", None)
    if eos is None:
        raise ValueError(
            "tokenizer has neither a pad token nor an EOS token: set one, e.g. "
            "tokenizer.add_special_tokens({'pad_token': '<pad>'}) and resize the model's embeddings"
        )
    warnings.warn(
        f"tokenizer has no pad token; using the EOS token {eos!r} as pad. Padding is tracked by attention "
        f"masks, so this is safe, but set tokenizer.pad_token explicitly to silence this warning",
        UserWarning,
        stacklevel=2,
    )
    tokenizer.pad_token = eos
    return tokenizer


def backbone_hidden(
    backbone: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """last_hidden_state [B, T, H] of ``backbone`` on a (left- and/or right-) padded batch, no KV cache."""
    if position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    out = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
