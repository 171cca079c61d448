"""``rlhf-fast selfcheck``: every fused op against its torch reference, on this machine, in one command.

CPU: the C++ backend at tiny shapes. CUDA: the Triton kernels at realistic shapes and dtypes (bf16, fp16,
fp32; log-probs at 16k tokens x 152k vocabulary without materialising the logits, GAE at 512 x 4096, ...),
timed against eager torch (and Liger-Kernel when installed), with bandwidth / FLOP/s as a fraction of a
measured peak. Then packed against padded forwards, one PPO step on a random 0.5B-width model (tokens/s,
memory against ``rlhf_fast.memory``'s prediction, more than 15% off is a mismatch; not in ``--quick``)
and the environment. Pass or fail never depends on a timing: a kernel passes when its error against an
fp32 reference is at most twice that of torch in the same dtype, plus a small floor. The CUDA branch is
a function of ``(device, backend, size)``: tests run it on CPU tensors with ``backend="triton"`` under
``TRITON_INTERPRET=1``. It imports only torch, triton, transformers and this package, so it runs from a
source checkout on a bare GPU image (a missing C++ extension is built in place, or the run goes on without).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from rlhf_fast import measure  # stdlib at import; torch inside its functions

__all__ = ["Check", "configure", "run", "run_op_checks", "run_selfcheck", "format_markdown", "SIZES"]

MEMORY_TOLERANCE = 0.15
WIDTH_0P5B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=12, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=32000)  # the PPO step's and the graphed decode's model
# (tokens, hidden, vocab) of the log-prob check; rows x cols of the [B, T] ops; (rows, hidden) of the
# backbone ops; (batch, seq, heads, head_dim) of rotary
SIZES = {
    "tiny": {"lp": (37, 16, 103), "bt": (3, 29), "rh": (7, 48), "rot": (2, 5, 3, 16)},
    "small": {"lp": (64, 32, 160), "bt": (4, 48), "rh": (8, 64), "rot": (2, 8, 2, 16)},
    "cuda-quick": {"lp": (4096, 896, 32000), "bt": (128, 1024), "rh": (4096, 896), "rot": (4, 512, 14, 64)},
    "cuda": {"lp": (16384, 896, 152064), "bt": (512, 4096), "rh": (16384, 4864), "rot": (8, 2048, 14, 64)},
}


@dataclasses.dataclass
class Check:
    """One line of the report: ``ok`` is False only for a real mismatch or an error."""

    section: str
    name: str
    ok: bool
    detail: dict = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- extension
def ensure_extension() -> str:
    """Make sure the C++ extension is importable; build it in place from a source checkout when missing.
    Returns a one-line status."""
    from rlhf_fast import _backend

    if _backend.HAS_EXT:
        return "built"
    root = Path(__file__).resolve().parent.parent
    if not (root / "setup.py").exists() or os.environ.get("RLHF_FAST_NO_EXT") == "1":
        return f"missing ({_backend.EXT_IMPORT_ERROR}); CPU checks use torch"
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=root,
                          capture_output=True, text=True, timeout=900)
    importlib.invalidate_caches()
    try:
        import rlhf_fast._C as C  # noqa: N812
    except Exception as exc:  # build failed: go on with torch on CPU
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return f"build failed ({exc!r}; {tail[0]}); CPU checks use torch"
    _backend._C, _backend.HAS_EXT, _backend.EXT_IMPORT_ERROR = C, True, None
    return "built in place"


# ----------------------------------------------------------------------------- op cases
def _max_err(a, b) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.detach().float() - b.detach().float()).abs().max())


def _flat(out) -> list:
    import torch

    if torch.is_tensor(out):
        return [out]
    return [t for t in out if torch.is_tensor(t)]


@dataclasses.dataclass
class OpCase:
    """``run(backend, *inputs)`` the fused op, ``ref(*inputs)`` its torch reference; ``diff`` marks which
    inputs get gradients; ``bytes`` / ``flops`` the minimum HBM traffic and work (forward)."""

    op: str
    shape: str
    inputs: list
    run: Callable
    ref: Callable
    diff: tuple = ()
    bytes: int = 0
    flops: int = 0
    liger: Callable | None = None
    forward_only: bool = False


def _cases(device: str, size: str, dtype) -> list[OpCase]:
    import torch

    from rlhf_fast import ops

    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dt)

    def mask(B, T):
        m = (torch.rand(B, T, generator=g) > 0.2).float()
        m[:, 0] = 1
        return m.to(device)

    s = SIZES[size]
    N, H, V = s["lp"]
    B, T = s["bt"]
    R, HD = s["rh"]
    f32 = torch.float32
    el = torch.tensor([], dtype=dtype).element_size()
    cases = []
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    labels[:: 7] = -100
    big = size == "cuda"
    cases.append(OpCase(
        "fused_linear_logprobs", f"{N}x{H} @ {V}", [rnd(N, H), rnd(V, H, scale=H ** -0.5)],
        lambda b, h, w: ops.fused_linear_logprobs(h, w, labels, return_entropy=True, backend=b),
        lambda h, w: ops.fused_linear_logprobs_reference(h, w, labels, return_entropy=True),
        diff=(0, 1), bytes=(N * H + V * H) * el + N * 8, flops=2 * N * H * V, forward_only=big))
    Bl, Tl = min(B, 8), min(T, 256)
    ll = torch.randint(0, V, (Bl, Tl), generator=g).to(device)
    cases.append(OpCase(
        "logprobs_from_logits", f"{Bl}x{Tl}x{V}", [rnd(Bl, Tl, V)],
        lambda b, z: ops.logprobs_from_logits(z, ll, backend=b),
        lambda z: ops.logprobs_from_logits_reference(z, ll), diff=(0,), bytes=Bl * Tl * V * el))
    m = mask(B, T)
    lp, ref_lp = rnd(B, T, dt=f32, scale=0.3), rnd(B, T, dt=f32, scale=0.3)
    cases.append(OpCase(
        "kl_penalty(k3)", f"{B}x{T}", [lp, ref_lp],
        lambda b, x, y: ops.kl_penalty(x, y, "k3", backend=b),
        lambda x, y: ops.kl_penalty_reference(x, y, "k3"), diff=(0,), bytes=3 * B * T * 4))
    scores = rnd(B, dt=f32)
    cases.append(OpCase(
        "token_rewards", f"{B}x{T}", [rnd(B, T, dt=f32)],
        lambda b, k: ops.token_rewards(scores, k, m, 0.05, backend=b),
        lambda k: ops.token_rewards_reference(scores, k, m, 0.05), bytes=3 * B * T * 4))
    cases.append(OpCase(
        "gae", f"{B}x{T}", [rnd(B, T, dt=f32), rnd(B, T, dt=f32)],
        lambda b, r, v: ops.gae(r, v, m, 1.0, 0.95, backend=b),
        lambda r, v: ops.gae_reference(r, v, m, 1.0, 0.95), bytes=5 * B * T * 4))
    cases.append(OpCase(
        "masked_whiten", f"{B}x{T}", [rnd(B, T, dt=f32)],
        lambda b, x: ops.masked_whiten(x, m, backend=b),
        lambda x: ops.masked_whiten_reference(x, m), bytes=3 * B * T * 4))
    cases.append(OpCase(
        "masked_mean", f"{B}x{T}", [rnd(B, T, dt=f32)],
        lambda b, x: ops.masked_mean(x, m, dim=1, backend=b),
        lambda x: ops.masked_mean_reference(x, m, dim=1), diff=(0,), bytes=2 * B * T * 4))
    old, adv = rnd(B, T, dt=f32, scale=0.3), rnd(B, T, dt=f32)
    cases.append(OpCase(
        "ppo_policy_loss", f"{B}x{T}", [lp],
        lambda b, x: ops.ppo_policy_loss(x, old, adv, m, backend=b)[0],
        lambda x: ops.ppo_policy_loss_reference(x, old, adv, m)[0], diff=(0,), bytes=4 * B * T * 4))
    vold, ret = rnd(B, T, dt=f32), rnd(B, T, dt=f32)
    cases.append(OpCase(
        "value_loss", f"{B}x{T}", [rnd(B, T, dt=f32)],
        lambda b, v: _first(ops.value_loss(v, vold, ret, m, backend=b)),
        lambda v: _first(ops.value_loss_reference(v, vold, ret, m)), diff=(0,), bytes=4 * B * T * 4))
    cases.append(OpCase(
        "policy_loss(gspo)", f"{B}x{T}", [lp],
        lambda b, x: _first(ops.policy_loss(x, old, adv, m, loss="clip", ratio_level="sequence", backend=b)),
        lambda x: _first(ops.policy_loss_reference(x, old, adv, m, loss="clip", ratio_level="sequence")),
        diff=(0,), bytes=4 * B * T * 4))
    w = (1 + 0.1 * torch.randn(HD, generator=g)).to(device=device, dtype=dtype)
    cases.append(OpCase(
        "rms_norm(+residual)", f"{R}x{HD}", [rnd(R, HD), rnd(R, HD)],
        lambda b, x, r: ops.rms_norm(x, w, residual=r, backend=b),
        lambda x, r: ops.rms_norm_reference(x, w, residual=r), diff=(0, 1), bytes=4 * R * HD * el,
        liger=_liger("rms_norm", w)))
    cases.append(OpCase(
        "swiglu", f"{R}x{HD}", [rnd(R, HD, scale=3.0), rnd(R, HD)],
        lambda b, x, u: ops.swiglu(x, u, backend=b), lambda x, u: ops.swiglu_reference(x, u),
        diff=(0, 1), bytes=3 * R * HD * el, liger=_liger("swiglu")))
    Bq, S, Hq, D = s["rot"]
    ang = torch.rand(Bq, S, D // 2, generator=g) * 6.0
    ang = torch.cat([ang, ang], -1)
    cos, sin = ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)
    Hk = max(1, Hq // 7)
    cases.append(OpCase(
        "rotary", f"{Bq}x{Hq}/{Hk}x{S}x{D}", [rnd(Bq, Hq, S, D), rnd(Bq, Hk, S, D)],
        lambda b, q, k: ops.rotary(q, k, cos, sin, backend=b),
        lambda q, k: ops.rotary_reference(q, k, cos, sin), diff=(0, 1),
        bytes=2 * Bq * (Hq + Hk) * S * D * el, liger=_liger("rotary", cos, sin)))
    return cases


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _liger(op: str, *fixed):
    """Liger-Kernel's version of an op when the package is installed, else None."""
    if importlib.util.find_spec("liger_kernel") is None:
        return None
    try:
        if op == "rms_norm":
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return lambda x, r: LigerRMSNormFunction.apply(x + r, fixed[0], 1e-6)
        if op == "swiglu":
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply
        if op == "rotary":
            from liger_kernel.ops.rope import LigerRopeFunction

            return lambda q, k: LigerRopeFunction.apply(q, k, fixed[0], fixed[1])
    except Exception:
        return None
    return None


def _grads(fn, inputs, diff, weights=None):
    """Outputs of ``fn(*inputs)`` and the gradients of a fixed random projection of them wrt ``diff``."""
    import torch

    xs = [x.detach().clone().requires_grad_(i in diff) for i, x in enumerate(inputs)]
    outs = _flat(fn(*xs))
    if not diff:
        return outs, []
    if weights is None:
        gen = torch.Generator(device="cpu").manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen).to(o.device) for o in outs]
    total = sum((o.float() * w).sum() for o, w in zip(outs, weights) if o.requires_grad)
    if not torch.is_tensor(total) or not total.requires_grad:
        return outs, []
    grads = torch.autograd.grad(total, [xs[i] for i in diff], allow_unused=True)
    return outs, [torch.zeros_like(xs[i]) if gr is None else gr for i, gr in zip(diff, grads)]


def _compare(case: OpCase, backend: str, dtype) -> dict:
    """Errors of the backend and of the same-dtype torch reference, both against the fp32 reference."""
    import torch

    diff = () if case.forward_only else case.diff
    up = [x.float() if x.is_floating_point() else x for x in case.inputs]
    exact_out, exact_g = _grads(case.ref, up, diff)
    fast_out, fast_g = _grads(lambda *xs: case.run(backend, *xs), case.inputs, diff)
    low_out, low_g = _grads(case.ref, case.inputs, diff)
    fast = [_max_err(a, b) for a, b in zip(fast_out + fast_g, exact_out + exact_g)]
    low = [_max_err(a, b) for a, b in zip(low_out + low_g, exact_out + exact_g)]
    scale = [max(float(t.detach().float().abs().max()), 1.0) if t.numel() else 1.0 for t in exact_out + exact_g]
    floor = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    ok = len(fast) == len(exact_out) + len(exact_g) and all(
        math.isfinite(f) and f <= 2 * lo + floor * sc for f, lo, sc in zip(fast, low, scale))
    return {"ok": ok, "max_err": max(fast, default=0.0), "torch_same_dtype_err": max(low, default=0.0),
            "grads_checked": bool(diff)}


def _timings(case: OpCase, backend: str, device: str, peaks: dict) -> dict:
    import torch

    from rlhf_fast.measure import time_fn

    out = {}
    reps = 5 if case.bytes * 4 > 2 ** 30 else 20
    with torch.no_grad():
        out["ours_ms"] = time_fn(lambda: case.run(backend, *case.inputs), warmup=2, repeats=reps, device=device)["time_ms"]
        if not case.forward_only:  # the eager reference of a 16k x 152k log-prob would take ~30 GB
            out["torch_ms"] = time_fn(lambda: case.ref(*case.inputs), warmup=2, repeats=reps, device=device)["time_ms"]
            out["speedup_vs_torch"] = out["torch_ms"] / out["ours_ms"]
        if case.liger is not None:
            try:
                out["liger_ms"] = time_fn(lambda: case.liger(*case.inputs), warmup=2, repeats=reps,
                                          device=device)["time_ms"]
            except Exception as exc:
                out["liger_error"] = repr(exc)[:200]
    sec = out["ours_ms"] / 1e3
    if case.bytes:
        out["GB/s"] = case.bytes / sec / 1e9
        if peaks.get("GB/s"):
            out["bandwidth_fraction"] = out["GB/s"] / peaks["GB/s"]
    if case.flops:
        out["TFLOP/s"] = case.flops / sec / 1e12
        if peaks.get("TFLOP/s"):
            out["flops_fraction"] = out["TFLOP/s"] / peaks["TFLOP/s"]
    return out


def _logits_never_materialised(case: OpCase, backend: str, device: str) -> dict:
    """Peak extra CUDA memory of the fused log-prob forward, against the [tokens, vocab] fp32 logits."""
    import torch

    N, V = case.inputs[0].shape[0], case.inputs[1].shape[0]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        case.run(backend, *case.inputs)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    return {"ok": extra < N * V * 4 // 4, "peak_extra_bytes": extra, "logits_bytes": N * V * 4}


def run_op_checks(device: str, backend: str, size: str, dtypes=None, timings: bool = False,
                  peaks: dict | None = None) -> list[Check]:
    """Every fused op at ``SIZES[size]`` with ``backend`` on ``device``, in each of ``dtypes`` for the ops
    that take low precision (the [B, T] RL ops run in fp32, as the trainer calls them)."""
    import torch

    dtypes = dtypes or [torch.float32]
    checks = []
    for dtype in dtypes:
        for case in _cases(device, size, dtype):
            fp32_only = case.inputs[0].dtype == torch.float32 and dtype != torch.float32
            if fp32_only:
                continue
            name = f"{case.op} {case.shape} {str(dtype).removeprefix('torch.')} [{backend}]"
            try:
                detail = _compare(case, backend, dtype)
                if case.forward_only and device.startswith("cuda"):
                    detail["no_logits"] = _logits_never_materialised(case, backend, device)
                    detail["ok"] = detail["ok"] and detail["no_logits"]["ok"]
                if timings:
                    detail.update(_timings(case, backend, device, peaks or {}))
            except Exception as exc:
                detail = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            checks.append(Check("ops", name, detail.pop("ok"), detail))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return checks


# ----------------------------------------------------------------------------- peaks, packing, PPO step
def _tiny_config(**over):
    from transformers import Qwen2Config

    kw = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=211, max_position_embeddings=512, tie_word_embeddings=False)
    kw.update(over)
    return Qwen2Config(**kw)


def check_packing(device: str) -> Check:
    """Packed forward (per-sequence attention) against the padded one on a random Qwen2, left-padded rows."""
    import torch
    from transformers import AutoModel

    from rlhf_fast.models.packing import enable_packing, packed_hidden

    torch.manual_seed(0)
    cfg = _tiny_config(**({"hidden_size": 256, "intermediate_size": 512} if device.startswith("cuda") else {}))
    cfg._attn_implementation = "sdpa"
    model = AutoModel.from_config(cfg).to(device).float().eval()
    B, T = 4, 24
    ids = torch.randint(1, cfg.vocab_size, (B, T), device=device)
    am = torch.ones(B, T, dtype=torch.long, device=device)
    for i, pad in enumerate((0, 3, 7, 11)):
        am[i, :pad] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=am, position_ids=pos).last_hidden_state
        reason = enable_packing(model)
        packed = packed_hidden(model, ids, am)
    err = _max_err(packed * am[..., None], padded * am[..., None])
    fa = importlib.util.find_spec("flash_attn") is not None
    return Check("packing", "packed == padded (Qwen2, left padding)", reason is None and err < 1e-4,
                 {"max_err": err, "attention": "flash-attn" if fa and device.startswith("cuda") else "packed SDPA",
                  "unsupported": reason})


def ppo_step_0p5b(device: str, steps: int = 3, config=None, lengths: tuple[int, int] | None = None) -> list[Check]:
    """One PPO micro-step (shared layout, fused backbone, AdamW) on a random 0.5B-width Qwen2 (or ``config``):
    tokens/s, and its measured memory components against the predictor's."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_fast.measure import time_fn
    from rlhf_fast.memory.micro_step import compare_measured, measure_micro_step
    from rlhf_fast.memory.spec import Setup, model_shape
    from rlhf_fast.models import PolicyValueModel, patch_backbone

    cuda = device.startswith("cuda")
    dtype_name = "bf16" if cuda else "fp32"
    cfg = config or _tiny_config(**WIDTH_0P5B)
    P, R = lengths or ((64, 448) if cuda else (8, 56))
    setup = Setup(batch=8, prompt_len=P, response_len=R, dtype=dtype_name,
                  fused_backbone=True, device="cuda" if cuda else "cpu")
    measured = measure_micro_step(cfg, setup, device=device)
    with torch.device("meta"):
        shape = model_shape(AutoModelForCausalLM.from_config(cfg))
    predicted = compare_measured(shape, setup, measured)
    checks = []
    for key in ("params", "grads", "optimizer", "activations"):
        m, p = measured[key], predicted[key]
        off = abs(m - p) / max(p, 1)
        checks.append(Check("ppo_step", f"memory: {key}", off <= MEMORY_TOLERANCE,
                            {"measured_bytes": m, "predicted_bytes": p, "off": off}))
    if cuda:
        m, p = measured["cuda_peak_allocated"], predicted["params"] + predicted["step_peak"]
        off = abs(m - p) / max(p, 1)
        checks.append(Check("ppo_step", "memory: CUDA peak allocated", off <= MEMORY_TOLERANCE,
                            {"measured_bytes": m, "predicted_bytes": p, "off": off}))
        torch.cuda.empty_cache()
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype)
    patch_backbone(model)
    pv = PolicyValueModel(model, reference="frozen", critic="shared", dtype=dtype, reference_dtype=dtype)
    opt = torch.optim.AdamW(pv.trainable_parameters(), lr=1e-6)
    B, P, R = setup.batch, setup.prompt_len, setup.response_len
    ids = torch.randint(1, cfg.vocab_size, (B, P + R), device=device)
    am = torch.ones_like(ids)
    adv, ret = torch.randn(B, R, device=device), torch.randn(B, R, device=device)

    def step():
        ref = pv.reference_logprobs(ids, am, response_start=P)
        out = pv(ids, am, response_start=P, return_entropy=True)
        ratio = torch.exp((out.logprobs - out.logprobs.detach()).clamp(-20, 20))
        loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        loss = loss + 0.5 * ((out.values - ret) ** 2).mean() + 0.0 * (out.logprobs - ref).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = time_fn(step, warmup=1, repeats=steps, device=device)
    width = "0.5B-width" if config is None else f"hidden {cfg.hidden_size}"
    checks.append(Check("ppo_step", f"PPO step {width} {dtype_name} B={B} T={P + R}", True,
                        {"step_ms": t["time_ms"], "tokens_per_s": B * (P + R) / (t["time_ms"] / 1e3)}))
    return checks


def check_graphed_decode(device: str, mode: str = "reduce-overhead", config=None, batch: int = 8,
                         prompt_len: int = 64, steps: int = 64) -> Check:
    """The lean decoder's per-token step, eager against compiled (``mode``: CUDA graphs by default) on a random
    0.5B-width Qwen2 (or ``config``), bf16 on CUDA: the logits of every step agree to the dtype's tolerance
    (the verdict), and the time per token each way (reported, never judged)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models.decode import LeanDecoder, compiled_decode_step

    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = config or _tiny_config(**WIDTH_0P5B)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).to(device=device, dtype=dtype).eval()
    ids = torch.randint(1, cfg.vocab_size, (batch, prompt_len), device=device)
    tokens = torch.randint(1, cfg.vocab_size, (steps, batch), device=device)
    compiled_step = compiled_decode_step(mode)

    def run(compiled: bool, record: bool):
        out = []
        dec = LeanDecoder(model, steps + 1, static_cache=compiled)
        dec.prefill(ids, torch.ones_like(ids))
        column = torch.tensor(prompt_len, device=device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            if compiled:
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                logits = compiled_step(dec, tokens[i], column)
                column += 1
            else:
                logits = dec.step(tokens[i])
            if record:
                out.append(logits.float().clone())
        if cuda:
            torch.cuda.synchronize()
        return out, (time.perf_counter() - t0) * 1e3 / steps

    with torch.inference_mode():
        graphed, _ = run(True, True)  # compiles (and records the CUDA graphs)
        eager, _ = run(False, True)
        _, eager_ms = run(False, False)
        _, graphed_ms = run(True, False)
    scale = max(float(e.abs().max()) for e in eager)
    err = max(_max_err(g, e) for g, e in zip(graphed, eager))
    tol = (5e-2 if dtype == torch.bfloat16 else 1e-4) * max(scale, 1.0)
    return Check("decode", f"lean decoder step: eager vs {mode} (B={batch}, {steps} tokens)", err <= tol,
                 {"max_err": err, "tolerance": tol, "eager_ms_per_token": eager_ms,
                  "compiled_ms_per_token": graphed_ms, "speedup": eager_ms / max(graphed_ms, 1e-9)})


# ----------------------------------------------------------------------------- the run
def gpu_op_checks(device: str, size: str, peaks: dict, backend: str = "triton",
                  peak_sizes: tuple[int, int] = (2 ** 28, 8192)) -> list[Check]:
    """The CUDA branch: measured peaks, then every Triton kernel in bf16, fp16 and fp32 with timings.
    Runs on CPU tensors too (``device="cpu"``, small sizes) in a ``TRITON_INTERPRET=1`` process."""
    import torch

    from rlhf_fast import _backend

    if backend == "triton" and not _backend.HAS_TRITON:
        return [Check("ops", "triton", False, {"error": _backend.TRITON_IMPORT_ERROR})]
    try:
        peaks.update(measure.measure_peaks(device, *peak_sizes))
        checks = [Check("peaks", "copy bandwidth and bf16 matmul", True, dict(peaks))]
    except Exception as exc:
        checks = [Check("peaks", "copy bandwidth and bf16 matmul", False, {"error": repr(exc)[:300]})]
    dtypes = [torch.bfloat16, torch.float16, torch.float32]
    return checks + run_op_checks(device, backend, size, dtypes, timings=True, peaks=peaks)


def run_selfcheck(quick: bool = False, device: str | None = None, log=print) -> dict:
    """Everything this machine can check; returns the report dict (``report["ok"]`` is the verdict)."""
    t0 = time.perf_counter()
    ext_status = ensure_extension()
    import torch

    from rlhf_fast import _backend

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    checks: list[Check] = []
    peaks: dict = {}

    def add(new):
        for c in new if isinstance(new, list) else [new]:
            checks.append(c)
            log(f"  {'ok  ' if c.ok else 'FAIL'} [{c.section}] {c.name}"
                + (f"  ({c.detail['error']})" if "error" in c.detail else ""))

    def guarded(section, name, fn):
        try:
            add(fn())
        except Exception as exc:
            add(Check(section, name, False, {"error": f"{type(exc).__name__}: {exc}"[:300]}))

    log(f"rlhf-fast selfcheck on {device} ({'quick' if quick else 'full'}); C++ extension: {ext_status}")
    for b in (["cpp"] if _backend.HAS_EXT else []) + ["torch"]:
        add(run_op_checks("cpu", b, "tiny", [torch.float32, torch.bfloat16]))
    if cuda:
        add(gpu_op_checks(device, "cuda-quick" if quick else "cuda", peaks))
    guarded("packing", "packed == padded", lambda: check_packing(device))
    if cuda:
        guarded("decode", "lean decoder: eager vs CUDA graphs", lambda: check_graphed_decode(device))
    if not quick:
        guarded("ppo_step", "PPO step 0.5B-width", lambda: ppo_step_0p5b(device))
    report = {"ok": all(c.ok for c in checks), "quick": quick, "device": device, "extension": ext_status,
              "environment": measure.environment(device), "peaks": peaks, "seconds": time.perf_counter() - t0,
              "checks": [c.as_dict() for c in checks]}
    return report


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def format_markdown(report: dict) -> str:
    failed = [c for c in report["checks"] if not c["ok"]]
    lines = [f"# rlhf-fast selfcheck: {'PASS' if report['ok'] else 'FAIL'}", "",
             f"{len(report['checks']) - len(failed)}/{len(report['checks'])} checks passed on "
             f"{report['environment'].get('device')} in {report['seconds']:.0f} s "
             f"({'quick' if report['quick'] else 'full'}); C++ extension: {report['extension']}.", "",
             "## Environment", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in report["environment"].items()]
    if report["peaks"]:
        lines += ["", f"Measured peaks: copy {report['peaks']['GB/s']:.0f} GB/s, "
                      f"bf16 matmul {report['peaks']['TFLOP/s']:.0f} TFLOP/s."]
    by_section: dict[str, list] = {}
    for c in report["checks"]:
        by_section.setdefault(c["section"], []).append(c)
    for section, cs in by_section.items():
        keys = sorted({k for c in cs for k in c["detail"] if not isinstance(c["detail"][k], dict)}, key=_key_order)
        lines += ["", f"## {section}", "", "| check | result | " + " | ".join(keys) + " |",
                  "|---|---|" + "---|" * len(keys)]
        for c in cs:
            cells = [_fmt(c["detail"].get(k, "")) for k in keys]
            lines.append(f"| {c['name']} | {'ok' if c['ok'] else '**FAIL**'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_ORDER = ["max_err", "torch_same_dtype_err", "ours_ms", "torch_ms", "speedup_vs_torch", "liger_ms", "GB/s",
          "bandwidth_fraction", "TFLOP/s", "flops_fraction"]


def _key_order(k: str):
    return (_ORDER.index(k), k) if k in _ORDER else (len(_ORDER), k)


# ----------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="smaller CUDA shapes, no 0.5B PPO step (within 2 minutes)")
    parser.add_argument("--json", metavar="FILE", default=None, help="write the full report as JSON")
    parser.add_argument("--markdown", metavar="FILE", default=None, help="write the report as Markdown")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")


def run(args: argparse.Namespace) -> int:
    report = run_selfcheck(quick=args.quick, device=args.device)
    text = format_markdown(report)
    for path, body in ((args.json, json.dumps(report, indent=1, default=str)), (args.markdown, text)):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(body + ("\n" if not body.endswith("\n") else ""))
    failed = [c for c in report["checks"] if not c["ok"]]
    print(f"selfcheck: {'PASS' if report['ok'] else 'FAIL'} ({len(report['checks']) - len(failed)}/"
          f"{len(report['checks'])} checks, {report['seconds']:.0f} s)")
    for c in failed:
        print(f"  mismatch: [{c['section']}] {c['name']}: {json.dumps(c['detail'], default=str)[:300]}")
    return 0 if report["ok"] else 1
