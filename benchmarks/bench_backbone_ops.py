"""Fused backbone ops against the HF code they replace: RMSNorm (+ residual add), SwiGLU, rotary; then the
PPO micro-step at the 0.5B width with and without ``patch_backbone``.

    python -m benchmarks.bench_backbone_ops            # quick: T=256 at the 0.5B width (smoke run)
    python -m benchmarks.bench_backbone_ops --full     # the issue's shapes: 0.5B and 8B widths, T=2048
    python -m benchmarks.bench_backbone_ops --compile  # add torch.compile providers (~20 s a graph on CPU)
    python -m benchmarks.bench_backbone_ops --full --micro-step-only   # the 12-layer PPO micro-step alone

Per op, forward + backward of one call (time: median and 20/80 percentiles of ``rlhf_fast.measure.time_fn``)
and the bytes autograd saves in the forward (``SavedTensorCounter``: distinct storages, inputs included,
checkpointing off). Providers:
- ``hf``: the HF code: ``residual + x`` then ``Qwen2RMSNorm``; ``act_fn(gate) * up`` with ACT2FN["silu"];
  ``apply_rotary_pos_emb`` on q, k laid out as HF's attention makes them; and for the MLP row, HF's
  ``Qwen2MLP`` module (gate/up/down projections) against the same module patched (the product rebuilt
  in backward instead of kept);
- ``F.rms_norm`` (RMSNorm rows only): torch's own fused op after the same add;
- ``compile``: ``torch.compile`` of the HF code (with ``--compile``, and always with ``--full``);
- ``rlhf_fast``: the fused op through its dispatcher (C++ on CPU, Triton on CUDA).
Shapes (Qwen2, fp32): 0.5B width H=896, I=4864, 14 heads / 2 KV heads of 64; 8B width H=4096, I=14336,
32 / 8 heads of 128; sequence length 2048 (quick: 256, 0.5B width only). Issue 18's targets, printed as
ratios against ``hf``: time <= 0.8x; saved bytes <= 0.6x (RMSNorm with the residual add), <= 0.7x (SwiGLU).

Micro-step (each side in its own process, ``run_isolated``): ``PolicyValueModel(critic="shared",
reference="frozen" bf16)`` on a random Qwen2 of the 0.5B width (12 layers, vocab 32000; quick: 2 layers,
vocab 4000), batch 8, prompts of 4-12 tokens, responses of 64 (the micro-step of
``bench_memory_layout``: a reference forward, then forward + backward + AdamW). Activation memory is the
saved bytes of that forward (parameters excluded); time is the median step. Targets: no slower with the
patch, at least 20% less activation memory.
"""
from __future__ import annotations

import argparse

from benchmarks.common import append_rows, make_row, print_table, ratio
from rlhf_fast.measure import run_isolated, time_fn

SHAPES = {  # name: (hidden, intermediate, heads, kv_heads, head_dim)
    "0.5B-width": (896, 4864, 14, 2, 64),
    "8B-width": (4096, 14336, 32, 8, 128),
}
EPS = 1e-6


# ----------------------------------------------------------------------------- one op, one provider
def _rms_case(H, T, residual, device):
    import torch
    import torch.nn.functional as F
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from rlhf_fast.ops import rms_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, T, H, generator=g).to(device).requires_grad_()
    res = torch.randn(1, T, H, generator=g).to(device).requires_grad_() if residual else None
    norm = Qwen2RMSNorm(H, eps=EPS).to(device)

    def hf(x, res):
        h = x if res is None else res + x
        return norm(h) if res is None else (norm(h), h)

    def torch_fused(x, res):
        h = x if res is None else res + x
        out = F.rms_norm(h, (H,), norm.weight, EPS)
        return out if res is None else (out, h)

    fns = {"hf": hf, "F.rms_norm": torch_fused, "rlhf_fast": lambda x, res: rms_norm(x, norm.weight, EPS, res)}
    return fns, (x, res)


def _swiglu_case(inter, T, device):
    import torch
    from transformers.activations import ACT2FN

    from rlhf_fast.ops import swiglu

    g = torch.Generator().manual_seed(0)
    gate = torch.randn(1, T, inter, generator=g).to(device).requires_grad_()
    up = torch.randn(1, T, inter, generator=g).to(device).requires_grad_()
    act = ACT2FN["silu"]
    return {"hf": lambda a, b: act(a) * b, "rlhf_fast": swiglu}, (gate, up)


def _mlp_case(H, inter, T, device):
    import copy

    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP

    from rlhf_fast.models import patch_backbone

    torch.manual_seed(0)
    hf = Qwen2MLP(Qwen2Config(hidden_size=H, intermediate_size=inter)).to(device)
    fused = copy.deepcopy(hf)
    patch_backbone(fused)
    x = torch.randn(1, T, H).to(device).requires_grad_()
    return {"hf": hf, "rlhf_fast": fused}, (x,)


def _rotary_case(heads, kv_heads, D, T, device):
    import torch
    from transformers import Qwen2Config
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, apply_rotary_pos_emb

    from rlhf_fast.ops import rotary

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, T, heads * D, generator=g).to(device).view(1, T, heads, D).transpose(1, 2)
    k = torch.randn(1, T, kv_heads * D, generator=g).to(device).view(1, T, kv_heads, D).transpose(1, 2)
    cfg = Qwen2Config(hidden_size=heads * D, num_attention_heads=heads, num_key_value_heads=kv_heads)
    cos, sin = Qwen2RotaryEmbedding(cfg).to(device)(q, torch.arange(T, device=device)[None])
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()  # HF's transposed layout, as leaves
    return {"hf": apply_rotary_pos_emb, "rlhf_fast": rotary}, (q, k, cos, sin)


def side_op(op: str, provider: str, width: str, T: int, device: str = "cpu", repeats: int = 10) -> dict:
    """Forward + backward of ``op`` by ``provider`` at ``width``/``T``: time_fn stats + saved bytes."""
    import torch

    from rlhf_fast.memory.tracker import SavedTensorCounter

    H, inter, heads, kv_heads, D = SHAPES[width]
    if op in ("rms_norm", "rms_norm+residual"):
        fns, args = _rms_case(H, T, op.endswith("residual"), device)
    elif op == "swiglu":
        fns, args = _swiglu_case(inter, T, device)
    elif op == "mlp":
        fns, args = _mlp_case(H, inter, T, device)
    else:
        fns, args = _rotary_case(heads, kv_heads, D, T, device)
    fn = torch.compile(fns["hf"]) if provider == "compile" else fns[provider]
    inputs = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]

    def step():
        outs = fn(*args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for a in inputs:
            a.grad = None

    step()  # compiles, warms caches
    with SavedTensorCounter() as saved:
        outs = fn(*args)
    del outs
    stats = time_fn(step, warmup=1, repeats=repeats, device=device)
    return {**stats, "saved_bytes": saved.bytes}


# ----------------------------------------------------------------------------- the PPO micro-step
def side_micro_step(fused: bool, layers: int = 12, vocab: int = 32000, B: int = 8, R: int = 64,
                    repeats: int = 5, device: str = "cpu") -> dict:
    """One PPO micro-step of bench_memory_layout's shared layout at the 0.5B width; fused: patch_backbone."""
    from transformers import Qwen2Config

    from benchmarks.bench_memory_layout import _build_ours
    from rlhf_fast.measure import mark_baseline
    from rlhf_fast.memory.tracker import SavedTensorCounter

    H, inter, heads, kv_heads, _ = SHAPES["0.5B-width"]
    cfg = Qwen2Config(hidden_size=H, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, vocab_size=vocab, tie_word_embeddings=False,
                      max_position_embeddings=512, pad_token_id=0)
    step, _, pv = _build_ours(cfg, B, R, device, steps=1, fused_backbone=fused)
    step()  # AdamW state allocated, kernels warm
    mark_baseline(device)
    with SavedTensorCounter(exclude=pv.parameters()) as saved:  # one forward saves; backward frees it
        step()
    stats = time_fn(step, warmup=0, repeats=repeats, device=device)
    return {**stats, "activation_bytes": saved.bytes}


# ----------------------------------------------------------------------------- driver
def _providers(op: str, compile_: bool) -> list[str]:
    out = ["hf"] + (["F.rms_norm"] if op.startswith("rms_norm") else [])
    if compile_ and op != "mlp":
        out.append("compile")
    return out + ["rlhf_fast"]


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="0.5B and 8B widths at T=2048, 12-layer micro-step")
    ap.add_argument("--quick", action="store_true", help="the default: T=256, 0.5B width, 2-layer micro-step")
    ap.add_argument("--compile", action="store_true", help="add torch.compile providers (always on with --full)")
    ap.add_argument("--micro-step-only", action="store_true", help="skip the op rows (with --full: the 12-layer step)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    full = args.full and not args.quick
    T = 2048 if full else 256
    widths = list(SHAPES) if full else ["0.5B-width"]
    ops = ["rms_norm", "rms_norm+residual", "swiglu", "mlp", "rotary"]
    rows, lines = [], []
    for width in [] if args.micro_step_only else widths:
        for op in ops:
            res = {p: side_op(op, p, width, T, args.device, repeats=10 if full else 5)
                   for p in _providers(op, args.compile or full)}
            shape = f"{width} T={T}"
            for p, r in res.items():
                rows.append(make_row("backbone_ops", op, shape, "float32", p, {**r, "mem_bytes": r["saved_bytes"]},
                                     args.device, note="mem = bytes autograd saves (inputs included)"))
            ours, hf = res["rlhf_fast"], res["hf"]
            target = " (information: matmul-bound)" if op == "mlp" else " (target <= 0.8)"
            lines.append(f"[{op} {shape}] rlhf_fast/hf: time {ratio(ours['time_ms'], hf['time_ms'])}{target}, "
                         f"saved bytes {ratio(ours['saved_bytes'], hf['saved_bytes'])}"
                         + {"rms_norm+residual": " (target <= 0.6)", "swiglu": " (target <= 0.7)"}.get(op, "")
                         + "".join(f"; vs {p}: time {ratio(ours['time_ms'], r['time_ms'])}"
                                   for p, r in res.items() if p not in ("hf", "rlhf_fast")))
    micro = {"layers": 12, "vocab": 32000} if full else {"layers": 2, "vocab": 4000}
    sides = {name: run_isolated("benchmarks.bench_backbone_ops:side_micro_step", fused=fused, device=args.device,
                                repeats=5 if full else 3, **micro)
             for name, fused in (("hf", False), ("rlhf_fast", True))}
    shape = f"0.5B-width L={micro['layers']} V={micro['vocab']} B=8 P=4-12 R=64"
    for p, r in sides.items():
        note = r.get("error") or f"activation (saved) bytes {r['activation_bytes']}; mem = peak RSS above the built model"
        rows.append(make_row("backbone_ops", "ppo_micro_step", shape, "float32", p, r, args.device, note=note))
    o, h = sides["rlhf_fast"], sides["hf"]
    if "error" in o or "error" in h:
        lines.append(f"[micro-step] error: hf={h.get('error')} rlhf_fast={o.get('error')}")
    else:
        lines.append(f"[micro-step {shape}] patched/unpatched: time {ratio(o['time_ms'], h['time_ms'])} (target <= 1.0), "
                     f"activation bytes {ratio(o['activation_bytes'], h['activation_bytes'])} (target <= 0.8), "
                     f"peak RSS {ratio(o.get('mem_bytes'), h.get('mem_bytes'))}")
    print_table(rows, cols=("op", "shape", "provider", "time_ms", "time_p20_ms", "time_p80_ms", "mem_bytes"))
    print()
    print("\n".join(lines))
    append_rows(rows)
    return rows


if __name__ == "__main__":
    main()
