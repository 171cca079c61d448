"""A lean incremental decoder over the weights of a Llama / Qwen2 / Mistral causal LM.

Why: at rollout shapes (a few rows, a small model) the HF forward with a ``DynamicCache`` spends most
of each decode step in Python: building 4-D masks, cache bookkeeping, module calls and hooks. This
decoder runs the same math as a flat sequence of tensor ops:

- a static KV cache ``[B, kv_heads, P + max_new_tokens, head_dim]`` per layer, written in place;
- a boolean key-padding mask for left-padded prompts (positions count only attended tokens, as
  ``position_ids_from_mask`` does for the HF path);
- cos/sin from the model's own ``rotary_emb`` (every rope scaling variant is honoured): computed once
  per rollout for all positions when the rope type has fixed frequencies, per step otherwise;
- RoPE as ``x * cos + roll(x, D/2) * sin_signed`` (three ops instead of chunk/neg/cat/mul/mul/add);
- during single-token steps, grouped-query attention without repeating K/V: the ``group`` query
  heads sharing one KV head are laid out as that head's ``group`` query rows (a free view of the
  q projection), so plain SDPA applies with the ``[B, 1, 1, L]`` key mask broadcast over them;
- the LM head on the last position only.

Weights are read from the HF modules (references taken when a ``LeanDecoder`` is built, i.e. once
per rollout; no copies), in the dtype they have, and every op is autocast-visible, so under
``torch.autocast(bf16)`` the linears run in bf16 exactly as in the HF forward.

``supports_fast_decode(model, total_length)`` is conservative: anything it does not recognise
exactly (other architectures, peft/LoRA layers, FSDP2/DTensor parameters, module hooks, forwards replaced
on an instance other than by ``rlhf_fast.models.patching``, an active sliding window, dropout in training
mode, ...) returns False and the caller uses the HF path.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from rlhf_fast import _backend
from rlhf_fast.models.loading import position_ids_from_mask
from rlhf_fast.ops.few_rows import few_row_linear, takes_cpp

# Rope types whose frequencies depend on the positions seen (transformers' dynamic_rope_update):
# cos/sin must come from a per-step call with the actual positions, as in the HF forward.
_POSITION_DEPENDENT_ROPE = ("dynamic", "longrope")
# rlhf_fast_packed_sdpa (rlhf_fast.models.packing) is SDPA for every unpacked call, a decode step included.
_ATTN_IMPLEMENTATIONS = (None, "eager", "sdpa", "rlhf_fast_packed_sdpa", "flash_attention_2", "flash_attention_3",
                         "flex_attention")
# Set on the forwards rlhf_fast.models.patching installs on module instances: they compute the functions
# this decoder reproduces (with fused kernels), so a patched model keeps the fast path.
FUSED_FORWARD_ATTR = "rlhf_fast_fused_backbone"


@functools.lru_cache(maxsize=1)
def _families() -> tuple[dict, ...]:
    """Module classes (per family) whose forward this decoder reproduces."""
    from transformers.models.llama import modeling_llama as llama
    from transformers.models.mistral import modeling_mistral as mistral
    from transformers.models.qwen2 import modeling_qwen2 as qwen2

    out = []
    for mod, prefix in ((llama, "Llama"), (qwen2, "Qwen2"), (mistral, "Mistral")):
        out.append({part: getattr(mod, prefix + part) for part in
                    ("ForCausalLM", "Model", "DecoderLayer", "Attention", "MLP", "RMSNorm", "RotaryEmbedding")})
    return tuple(out)


def _value_neutral_hook(hook) -> bool:
    """transformers' enable_input_require_grads hook (installed by gradient/activation checkpointing):
    it only flags the embedding output as requiring grad, which never changes a value (and generation
    runs without autograd anyway)."""
    return (getattr(hook, "__module__", "").startswith("transformers.")
            and getattr(hook, "__qualname__", "").endswith("enable_input_require_grads.<locals>.make_inputs_require_grads"))


def _same_forward(module, cls) -> bool:
    """module is a cls (or a subclass that does not override forward)."""
    return isinstance(module, cls) and type(module).forward is cls.forward


def fast_decode_unsupported_reason(model, total_length: int | None = None) -> str | None:
    """Why ``model`` cannot use the lean decoder (None when it can).

    total_length: P + max_new_tokens of the rollout, needed to tell whether a configured sliding
    window is actually active (None: any configured window counts as active).
    """
    family = next((f for f in _families() if _same_forward(model, f["ForCausalLM"])), None)
    if family is None:
        return f"{type(model).__name__} is not a Llama/Qwen2/Mistral causal LM (or overrides its forward)"
    cfg = model.config
    backbone = getattr(model, "model", None)
    if not _same_forward(backbone, family["Model"]):
        return f"backbone {type(backbone).__name__} is not a {family['Model'].__name__}"
    if set(dict(backbone.named_children())) != {"embed_tokens", "layers", "norm", "rotary_emb"}:
        return f"backbone has unexpected submodules {sorted(dict(backbone.named_children()))}"
    if type(backbone.embed_tokens) is not nn.Embedding or backbone.embed_tokens.max_norm is not None:
        return "embed_tokens is not a plain nn.Embedding"
    if type(model.lm_head) is not nn.Linear:
        return f"lm_head is a {type(model.lm_head).__name__}, not nn.Linear"
    if not _same_forward(backbone.norm, family["RMSNorm"]):
        return "final norm is not the family's RMSNorm"
    rotary = backbone.rotary_emb
    if not _same_forward(rotary, family["RotaryEmbedding"]) or not isinstance(getattr(rotary, "rope_type", None), str):
        return "rotary_emb is not the family's single-type rotary embedding"
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in _ATTN_IMPLEMENTATIONS:
        return f"attention implementation {impl!r} is not one this decoder reproduces"
    if getattr(cfg, "hidden_act", None) not in ("silu", "swish"):
        return f"hidden_act {getattr(cfg, 'hidden_act', None)!r} is not silu"
    window = getattr(cfg, "sliding_window", None)
    if window is not None and (total_length is None or window <= total_length):
        return f"sliding window {window} is active for a total length of {total_length}"
    if model.training and float(getattr(cfg, "attention_dropout", 0.0) or 0.0) > 0:
        return "attention dropout is active (model in training mode)"
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if n_heads % n_kv:
        return f"num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv}"
    for i, layer in enumerate(backbone.layers):
        if not _same_forward(layer, family["DecoderLayer"]):
            return f"layer {i} is a {type(layer).__name__}"
        if set(dict(layer.named_children())) != {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}:
            return f"layer {i} has unexpected submodules"
        attn, mlp = layer.self_attn, layer.mlp
        if not _same_forward(attn, family["Attention"]) or not _same_forward(mlp, family["MLP"]):
            return f"layer {i} attention/MLP classes are not the family's"
        if set(dict(attn.named_children())) != {"q_proj", "k_proj", "v_proj", "o_proj"}:
            return f"layer {i} attention has unexpected submodules (e.g. q/k norms)"
        if set(dict(mlp.named_children())) != {"gate_proj", "up_proj", "down_proj", "act_fn"}:
            return f"layer {i} MLP has unexpected submodules"
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(lin) is not nn.Linear for lin in linears):
            return f"layer {i} has non-plain linear layers (peft/LoRA, quantized, ...)"
        if type(mlp.act_fn).__name__ not in ("SiLUActivation", "SiLU"):
            return f"layer {i} activation is {type(mlp.act_fn).__name__}"
        if not (_same_forward(layer.input_layernorm, family["RMSNorm"])
                and _same_forward(layer.post_attention_layernorm, family["RMSNorm"])):
            return f"layer {i} norms are not the family's RMSNorm"
        D = attn.head_dim
        if (attn.q_proj.out_features != n_heads * D or attn.k_proj.out_features != n_kv * D
                or attn.v_proj.out_features != n_kv * D or abs(attn.scaling - D ** -0.5) > 1e-12 * D ** -0.5):
            return f"layer {i} projection shapes or scaling do not match {n_heads}/{n_kv} heads of dim {D}"
        if getattr(attn, "sliding_window", None) is not None and (total_length is None
                                                                   or attn.sliding_window <= total_length):
            return f"layer {i} has an active sliding window"
    if backbone.layers and rotary.inv_freq.numel() * 2 != backbone.layers[0].self_attn.head_dim:
        return "partial rotary embeddings are not supported"
    for name, module in model.named_modules():
        # An instance-level forward replaces its class's: only the fused backbone's compute the same
        # functions. (The root's own forward is what this decoder stands in for, so it is not asked.)
        own = module.__dict__.get("forward") if name else None
        if own is not None and not getattr(own, FUSED_FORWARD_ATTR, False):
            return f"module {name} has its own forward (an instance patch this decoder does not know)"
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        if any(not _value_neutral_hook(h) for h in hooks) or getattr(module, "_hf_hook", None) is not None:
            return f"module {name or type(model).__name__} has forward hooks (FSDP, accelerate offload, ...)"
    devices = set()
    for name, p in model.named_parameters():
        if type(p.data) is not torch.Tensor or p.is_meta:  # DTensor (FSDP2/TP), meta, tensor subclasses
            return f"parameter {name} is a {type(p.data).__name__} on {p.device}"
        devices.add(p.device)
    if len(devices) > 1:
        return f"parameters are spread over {sorted(map(str, devices))}"
    return None


def supports_fast_decode(model, total_length: int | None = None) -> bool:
    """True when ``LeanDecoder`` computes exactly what ``model``'s own forward computes (see module doc)."""
    return fast_decode_unsupported_reason(model, total_length) is None


def _rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """The HF Llama/Qwen2/Mistral RMSNorm: normalise in fp32, cast back, times weight (fp32 fused path)."""
    w = norm.weight
    if x.dtype == torch.float32 and w.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, norm.variance_epsilon)
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return w * x32.to(dtype)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, so rotate_half(x) * sin == roll(x, D/2) * signed_sin."""
    out = sin.clone()
    out[..., : out.shape[-1] // 2].neg_()
    return out


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, out: torch.Tensor | None = None):
    """x * cos + rotate_half(x) * sin. x: [..., D]; cos, sin_signed broadcast to x."""
    rolled = x.roll(x.shape[-1] // 2, -1)
    if out is None:
        return torch.addcmul(x * cos, rolled, sin_signed)
    return torch.addcmul(x * cos, rolled, sin_signed, out=out)


class LeanDecoder:
    """Prefill + one-token steps over a model accepted by ``supports_fast_decode``.

    Built once per rollout: ``prefill(input_ids, attention_mask)`` for left-padded prompts [B, P],
    then ``step(tokens)`` once per new token ([B] int64), each returning the next-token logits
    [B, V] (the LM head's dtype, or bf16 under a bf16 autocast). At most ``max_new_tokens`` steps'
    keys fit in the cache (the prefill's logits predict the first new token, so a rollout of R
    tokens needs R - 1 steps).
    """

    def __init__(self, model, max_new_tokens: int, *, validate: bool = True, static_cache: bool = False):
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be > 0, got {max_new_tokens}")
        # static_cache: for step_static under torch.compile / CUDA graphs. The cache width is rounded up to
        # a multiple of STATIC_CACHE_QUANTUM (so prompts of different widths share one graph: step_static
        # masks the columns after t) and the tensors step_static mutates get static addresses.
        self.static_cache = bool(static_cache)
        # validate=False: the caller has just checked supports_fast_decode(model, P + max_new_tokens).
        # (Checked in prefill, where P is known: whether a sliding window is active depends on it.)
        self.validate = validate
        self.model = model
        self.max_new_tokens = int(max_new_tokens)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.length = 0  # cache columns written so far

    def _bind(self):
        """Take references to the model's modules (weights are read from them, never copied)."""
        model = self.model
        cfg = model.config
        bb = model.model
        self.n_heads, self.n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.group = self.n_heads // self.n_kv
        self.head_dim = bb.layers[0].self_attn.head_dim if len(bb.layers) else 0
        self.scale = self.head_dim ** -0.5 if self.head_dim else 1.0
        self.embed_weight = bb.embed_tokens.weight
        self.final_norm = bb.norm
        self.lm_head = model.lm_head
        self.rotary = bb.rotary_emb
        self.layers = [
            (layer.input_layernorm, layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
             layer.self_attn.o_proj, layer.post_attention_layernorm, layer.mlp.gate_proj, layer.mlp.up_proj,
             layer.mlp.down_proj)
            for layer in bb.layers
        ]

    # ------------------------------------------------------------------ rope
    def _cos_sin(self, positions: torch.Tensor):
        """cos, signed sin for int64 positions [B, T] -> [B, T, D] each."""
        if self.rope_table is not None:
            cos_t, sin_t = self.rope_table
            return cos_t[positions], sin_t[positions]
        cos, sin = self.rotary(self._rope_probe, positions)
        return cos, _signed_sin(sin)

    # ------------------------------------------------------------------ prefill
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run the whole prompt, fill the caches; return the last position's logits [B, V].

        input_ids: int64 [B, P] (pad positions may hold any valid id); attention_mask: [B, P] 0/1, left-padded.
        """
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(f"input_ids and attention_mask must both be [B, P], got {tuple(input_ids.shape)} "
                             f"and {tuple(attention_mask.shape)}")
        B, P = input_ids.shape
        device = input_ids.device
        L = self.capacity = P + self.max_new_tokens
        if self.static_cache:
            L = -(-L // STATIC_CACHE_QUANTUM) * STATIC_CACHE_QUANTUM
        if self.validate:
            reason = fast_decode_unsupported_reason(self.model, self.capacity)
            if reason is not None:
                raise ValueError(f"LeanDecoder cannot run this model: {reason}")
        self._bind()
        positions = position_ids_from_mask(attention_mask)
        self.next_pos = positions[:, -1] + 1  # [B]
        # Key-padding mask for the whole rollout: prompt pads False, every generated column True.
        self.key_mask = torch.ones(B, L, dtype=torch.bool, device=device)
        self.key_mask[:, :P] = attention_mask.bool()

        h = F.embedding(input_ids, self.embed_weight)  # [B, P, H]
        self._rope_probe = h[:1, :1]  # carries the dtype/device HF passes to rotary_emb
        if self.rotary.rope_type in _POSITION_DEPENDENT_ROPE:
            self.rope_table = None
        else:
            # Positions never exceed the column index, so L rows cover the whole rollout.
            cos, sin = self.rotary(self._rope_probe, torch.arange(L, device=device).unsqueeze(0))
            self.rope_table = (cos[0], _signed_sin(sin[0]))
        cos, sin_s = self._cos_sin(positions)  # [B, P, D]
        cos, sin_s = cos.unsqueeze(1), sin_s.unsqueeze(1)  # broadcast over heads

        # Causal & key padding; every query also sees itself, so a left-pad query row is never fully
        # masked (SDPA would give NaN there, and NaN keys/values would leak through masked weights).
        causal = torch.ones(P, P, dtype=torch.bool, device=device).tril_()
        mask = (causal & self.key_mask[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)
        mask = mask.unsqueeze(1)  # [B, 1, P, P]

        D, nh, nkv = self.head_dim, self.n_heads, self.n_kv
        # Under autocast SDPA casts q/k/v to the autocast dtype on every call (the HF path too: there the
        # roped keys are fp32 and the values bf16). Storing the cache in that dtype rounds each key once
        # instead of once per step: the same numbers, without a per-step cast of the whole cache.
        cache_dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        self.k_cache, self.v_cache = [], []
        for ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down in self.layers:
            x = _rms_norm(h, ln1)
            q = F.linear(x, q_proj.weight, q_proj.bias).view(B, P, nh, D).transpose(1, 2)
            k = F.linear(x, k_proj.weight, k_proj.bias).view(B, P, nkv, D).transpose(1, 2)
            v = F.linear(x, v_proj.weight, v_proj.bias).view(B, P, nkv, D).transpose(1, 2)
            q = _rope(q, cos, sin_s)
            k = _rope(k, cos, sin_s)
            # step_static reads every column (the unwritten ones masked); a masked weight times a NaN left in
            # uninitialised memory is still NaN, so its cache starts at zeros. step reads written columns only.
            alloc = torch.zeros if self.static_cache else torch.empty
            k_cache = alloc(B, nkv, L, D, dtype=cache_dtype or k.dtype, device=device)
            v_cache = alloc(B, nkv, L, D, dtype=cache_dtype or v.dtype, device=device)
            k_cache[:, :, :P] = k
            v_cache[:, :, :P] = v
            self.k_cache.append(k_cache)
            self.v_cache.append(v_cache)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, enable_gqa=self.group > 1)
            h = h + F.linear(a.transpose(1, 2).reshape(B, P, nh * D), o_proj.weight, o_proj.bias)
            h = h + self._mlp(_rms_norm(h, ln2), gate, up, down)
        self.length = P
        if self.static_cache:
            for buf in (*self.k_cache, *self.v_cache, self.next_pos):
                torch._dynamo.mark_static_address(buf)
        return self._logits(h[:, -1])

    # ------------------------------------------------------------------ one token
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row ([B] int64) and return the next-token logits [B, V]."""
        t = self.length
        if not self.k_cache:
            raise ValueError("LeanDecoder.step before prefill")
        if t >= self.capacity:
            raise ValueError(f"LeanDecoder cache is full ({t} columns): built for max_new_tokens={self.max_new_tokens}")
        B = tokens.shape[0]
        D, nh, nkv, group = self.head_dim, self.n_heads, self.n_kv, self.group
        lin = few_row_linear  # B <= 8 rows: the C++ few-row kernel on CPU (F.linear otherwise)
        cos, sin_s = self._cos_sin(self.next_pos.unsqueeze(1))  # [B, 1, D]: broadcasts over heads
        self.next_pos += 1
        key_mask = self.key_mask[:, None, None, : t + 1]  # [B, 1, 1, t+1]

        h = F.embedding(tokens, self.embed_weight)  # [B, H]
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down) in enumerate(self.layers):
            x = _rms_norm(h, ln1)
            q = lin(x, q_proj.weight, q_proj.bias).view(B, nh, D)
            k = lin(x, k_proj.weight, k_proj.bias).view(B, nkv, D)
            v = lin(x, v_proj.weight, v_proj.bias).view(B, nkv, D)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            _rope(k, cos, sin_s, out=k_cache[:, :, t])
            v_cache[:, :, t] = v
            # The `group` query heads of one KV head become that head's query rows: [B, nkv, group, D].
            q = _rope(q, cos, sin_s).view(B, nkv, group, D)
            keys, values = k_cache[:, :, : t + 1], v_cache[:, :, : t + 1]
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask, scale=self.scale)
            h = h + lin(a.view(B, nh * D), o_proj.weight, o_proj.bias)
            h = h + self._mlp(_rms_norm(h, ln2), gate, up, down, lin)
        self.length = t + 1
        return self._logits(h)

    def step_static(self, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``step`` with static shapes, for ``torch.compile(fullgraph=True)`` and CUDA graphs: the cache
        column ``t`` is a 0-dim int64 tensor (the caller advances it: ``t += 1``), attention runs over the
        whole static cache with columns after ``t`` masked, and nothing branches on data. Needs a decoder built
        with ``static_cache=True`` (zero-initialised cache, static addresses). Needs a rope type
        with fixed frequencies (``self.rope_table``); gives the logits ``step`` gives."""
        if not self.static_cache:
            raise ValueError("step_static needs a decoder built with LeanDecoder(..., static_cache=True)")
        B, L = tokens.shape[0], self.key_mask.shape[1]
        D, nh, nkv, group = self.head_dim, self.n_heads, self.n_kv, self.group
        lin = few_row_linear
        cos_t, sin_t = self.rope_table  # None for position-dependent rope: see compiled_decode_step
        cos, sin_s = cos_t[self.next_pos].unsqueeze(1), sin_t[self.next_pos].unsqueeze(1)  # [B, 1, D]
        self.next_pos.add_(1)
        cols = torch.arange(L, device=tokens.device)
        key_mask = (self.key_mask & (cols <= t))[:, None, None, :]  # [B, 1, 1, L]
        col = t.reshape(1)
        h = F.embedding(tokens, self.embed_weight)
        for i, (ln1, q_proj, k_proj, v_proj, o_proj, ln2, gate, up, down) in enumerate(self.layers):
            x = _rms_norm(h, ln1)
            q = lin(x, q_proj.weight, q_proj.bias).view(B, nh, D)
            k = lin(x, k_proj.weight, k_proj.bias).view(B, nkv, D)
            v = lin(x, v_proj.weight, v_proj.bias).view(B, nkv, D)
            k_cache, v_cache = self.k_cache[i], self.v_cache[i]
            k_cache.index_copy_(2, col, _rope(k, cos, sin_s).unsqueeze(2).to(k_cache.dtype))
            v_cache.index_copy_(2, col, v.unsqueeze(2).to(v_cache.dtype))
            q = _rope(q, cos, sin_s).view(B, nkv, group, D)
            a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=key_mask, scale=self.scale)
            h = h + lin(a.view(B, nh * D), o_proj.weight, o_proj.bias)
            h = h + self._mlp(_rms_norm(h, ln2), gate, up, down, lin)
        return self._logits(h)

    @staticmethod
    def _mlp(x, gate, up, down, lin=F.linear):
        g = F.silu(lin(x, gate.weight, gate.bias))
        return lin(g * lin(x, up.weight, up.bias), down.weight, down.bias)

    def _logits(self, h_last: torch.Tensor) -> torch.Tensor:
        x = _rms_norm(h_last, self.final_norm)
        w, bias = self.lm_head.weight, self.lm_head.bias
        if _backend.HAS_EXT and takes_cpp(x, w, bias):
            return few_row_linear(x, w, bias)
        if _head_as_weight_times_x(x, w):
            logits = torch.mm(w, x.t()).t().contiguous()
            return logits + bias if bias is not None else logits
        return F.linear(x, w, bias)


STATIC_CACHE_QUANTUM = 64
DECODE_COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "aot_eager")
_COMPILED_STEPS: dict[str, object] = {}


def _static_step(decoder: LeanDecoder, tokens: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return decoder.step_static(tokens, t)


def compiled_decode_step(mode: str):
    """``LeanDecoder.step_static`` under ``torch.compile(fullgraph=True, dynamic=False)``: ``fn(decoder, tokens,
    t) -> logits [B, V]``, one compiled function per mode and process, so later rollouts reuse its graphs
    (a new graph per batch size and cache width, the width rounded to STATIC_CACHE_QUANTUM columns).

    mode: torch.compile's "default", "reduce-overhead" (CUDA graphs on CUDA: the per-token launch overhead
    goes; the caller marks each step with ``torch.compiler.cudagraph_mark_step_begin()``), "max-autotune";
    or "aot_eager" (traces the graph and runs it without code generation: proves the step compiles, no
    speed-up). Needs a decoder built with ``static_cache=True`` over a fixed-frequency rope."""
    if mode not in DECODE_COMPILE_MODES:
        raise ValueError(f"decode_compile must be one of {DECODE_COMPILE_MODES} or None, got {mode!r}")
    fn = _COMPILED_STEPS.get(mode)
    if fn is None:
        kw = {"backend": "aot_eager"} if mode == "aot_eager" else {"mode": mode}
        fn = _COMPILED_STEPS[mode] = torch.compile(_static_step, fullgraph=True, dynamic=False, **kw)
    return fn


# Few rows against a large fp32 head on CPU: MKL streams the [V, H] weight about twice as slowly for
# x @ W^T as for W @ x^T (measured here: B=8, H=128, V=32000 2.3 vs 1.5 ms; V=128256 11.0 vs 6.0 ms;
# H=1024 24 vs 16 ms), while a head that fits in cache (V=8192, H=128) or B >= 12 favours F.linear.
_HEAD_T_MAX_ROWS = 8
_HEAD_T_MIN_BYTES = 8 << 20


def _head_as_weight_times_x(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 2 and x.shape[0] <= _HEAD_T_MAX_ROWS
            and x.dtype == w.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and w.numel() * 4 >= _HEAD_T_MIN_BYTES)
