"""The measured side of ``rlhf-fast memory --measure``: one real PPO micro-step, and its predicted twin.

``measure_micro_step(config, setup, device)`` builds random-init weights and runs one micro-step of the
shared layout under ``rlhf_fast.memory.tracker.StorageTracker``; ``compare_measured(shape, setup,
measured)`` gives the predictor's numbers for the same tensors, so the two can be printed side by side
(and tests hold them within 15% of each other).
"""
from __future__ import annotations

import dataclasses

from rlhf_fast.memory.predictor import predict
from rlhf_fast.memory.rules import activation_bytes, dtype_bytes, logprob_chunk_bytes, torch_dtype
from rlhf_fast.memory.spec import ModelShape, Setup
from rlhf_fast.memory.tracker import SavedTensorCounter, StorageTracker


def measure_micro_step(config, setup: Setup, device: str = "cpu", trace: str | None = None, seed: int = 0) -> dict:
    """One real PPO micro-step of the shared layout on ``device``, tensor bytes counted by StorageTracker.

    The micro-step of ``benchmarks/bench_memory_layout.py`` (``side_ours``): random-init weights in
    ``setup.dtype`` (the fused backbone patched in when ``setup.fused_backbone``),
    PolicyValueModel(critic="shared", reference=setup.reference), reference log-probs
    (no grad), forward with entropy, clipped PPO + value loss, backward, AdamW step. No reward model.
    Returns bytes, each the tracker's record of the allocations behind the tensors named:
    ``params`` (every parameter of the policy, value head and reference, as created while building),
    ``grads`` (the ``.grad`` of the trainable parameters, created in backward), ``optimizer`` (the
    optimizer's state tensors, created in ``opt.step()``), ``activations`` (distinct non-parameter
    storages autograd saved for backward in the policy forward, via ``saved_tensors_hooks``; with
    checkpointing, only the layer inputs, since recomputation happens in backward), ``logprob_buffer`` (largest fp32 [rows, V]
    tensor created in the step) and, for information, ``step_peak`` (peak of tracked live bytes during
    the step above its start; the tracker under-counts tensors without a long-lived Python object) and
    on CUDA ``cuda_peak_allocated``.
    """
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from rlhf_fast.models import PolicyValueModel, patch_backbone

    dev = torch.device(device)
    dtype = torch_dtype(setup.dtype)
    torch.manual_seed(seed)
    if trace:
        if dev.type != "cuda":
            raise ValueError("--trace needs CUDA (torch.cuda.memory snapshots); this run is on "
                             f"{dev.type}. Drop --trace or run with --device cuda on a GPU machine.")
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with StorageTracker() as build:
        model = AutoModelForCausalLM.from_config(config).to(device=dev, dtype=dtype)
        if setup.fused_backbone:
            patch_backbone(model)
        pv = PolicyValueModel(model, reference=setup.reference, critic="shared", dtype=dtype,
                              **({"reference_dtype": dtype} if setup.reference == "frozen" else {}))
    if setup.grad_checkpointing:
        model.gradient_checkpointing_enable()
    all_params = [p for comp in pv.components().values() for p in comp.parameters()]
    params = build.bytes_of(all_params)
    opt_params = pv.trainable_parameters()
    opt = (torch.optim.AdamW(opt_params, lr=1e-5) if setup.optimizer == "adamw"
           else torch.optim.SGD(opt_params, lr=1e-5))
    V = model.config.vocab_size
    B, P, R = setup.batch, setup.prompt_len, setup.response_len
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, P + R), generator=g).to(dev)
    mask = torch.ones(B, P + R, dtype=torch.long, device=dev)
    adv = torch.randn(B, R, generator=g).to(dev)
    returns = torch.randn(B, R, generator=g).to(dev)
    pv.train()
    gc.collect()
    with StorageTracker() as step:
        ref_logp = pv.reference_logprobs(ids, mask, response_start=P) if setup.reference != "none" else None
        # every tensor autograd keeps for backward: the activations, counted once per storage
        with SavedTensorCounter(exclude=pv.parameters()) as saved:
            out = pv(ids, mask, response_start=P, return_entropy=True)
        ratio = torch.exp((out.logprobs - out.logprobs.detach()).clamp(-20, 20))
        pg = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.8, 1.2)).mean()
        vf = 0.5 * ((out.values - returns) ** 2).mean()
        (pg + vf).backward()
        del out, ratio, pg, vf
        gc.collect()
        opt.step()
        del ref_logp
    grads = step.bytes_of([p.grad for p in opt_params])
    state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
    buffers = [a.nbytes for a in step.allocations
               if len(a.shape) == 2 and a.shape[1] == V and a.dtype == torch.float32]
    result = {"params": params, "grads": grads, "optimizer": step.bytes_of(state), "activations": saved.bytes,
              "logprob_buffer": max(buffers, default=0), "step_peak": step.peak_live_bytes, "device": dev.type}
    if dev.type == "cuda":
        result["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        if trace:
            torch.cuda.memory._dump_snapshot(trace)
            torch.cuda.memory._record_memory_history(enabled=None)
            result["trace"] = trace
    return result


def compare_measured(shape: ModelShape, setup: Setup, measured: dict) -> dict:
    """Predicted counterparts of ``measure_micro_step``'s numbers (same tensors, no reward model, no FSDP).

    The real step stores parameters and AdamW state in ``setup.dtype`` (``precision="pure"``) and its
    log-prob chunk follows the measuring device.
    """
    like = dataclasses.replace(setup, precision="pure", gpus=1, fsdp=False, device=measured["device"])
    c = predict(shape, like, "shared").components
    return {
        "params": c["policy params"] + c["value params"] + c["reference"],
        "grads": c["policy grads"] + c["value grads"],
        "optimizer": c["policy optimizer"] + c["value optimizer"],
        "logprob_buffer": logprob_chunk_bytes(like.batch * like.response_len, shape.vocab, like.device),
        # saved by the forward pass (with checkpointing the recomputed layer lives only inside backward)
        "activations": activation_bytes(shape, like.batch * like.seq_len, dtype_bytes(like.dtype),
                                        like.grad_checkpointing, forward_only=True, fused_backbone=like.fused_backbone),
        "step_peak": c["policy grads"] + c["value grads"] + max(c["activations"] + c["logprob buffers"],
                                                                c["policy optimizer"] + c["value optimizer"]),
    }


__all__ = ["measure_micro_step", "compare_measured"]
