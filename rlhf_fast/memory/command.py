"""``rlhf-fast memory``: will PPO on this model fit on my node, and with which layout?

Builds the model on the ``meta`` device (no weights: 8B and 70B configs work on a laptop), reads its
architecture, and predicts per-GPU bytes by component for TRL's four-model layout and for ours
(``shared``): ``rlhf_fast.memory.predictor``, formulas in ``rlhf_fast.memory.rules``. ``--measure``
runs one real PPO micro-step of our layout (``rlhf_fast.memory.micro_step``) and prints measured
bytes beside the prediction.

``configure(parser)`` adds the arguments and ``run(args)`` does the work (``rlhf_fast.cli`` registers
them as strings). Only torch-free modules are imported here at module level, since ``rlhf-fast --help``
builds this parser.
"""
from __future__ import annotations

import argparse
import json
import sys

from rlhf_fast.memory.spec import (
    DTYPE_BYTES,
    LAYOUTS,
    MEMORY_FORMS,
    OPTIMIZERS,
    PRECISIONS,
    REFERENCE_MODES,
    Setup,
    build_meta_model,
    load_model_config,
    model_shape,
    parse_memory,
)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="preset name (qwen2.5-0.5b, qwen2.5-7b, llama-3-8b, llama-3-70b), a local HF directory "
                             "or a config.json path; built on the meta device, no weights")
    parser.add_argument("--batch", type=int, required=True, help="sequences per micro-batch per GPU")
    parser.add_argument("--prompt-len", type=int, required=True, help="prompt tokens (P)")
    parser.add_argument("--response-len", type=int, required=True, help="response tokens (R)")
    parser.add_argument("--layout", default="shared", choices=LAYOUTS,
                        help="layout the verdict is about (the table shows both)")
    parser.add_argument("--reference", default="frozen", choices=REFERENCE_MODES, help="reference mode (shared layout)")
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES))
    parser.add_argument("--precision", default="mixed", choices=PRECISIONS,
                        help="mixed: dtype params+grads, fp32 master+AdamW; pure: everything in dtype; "
                             "amp: fp32 params/grads/AdamW, dtype autocast")
    parser.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--fused-backbone", action=argparse.BooleanOptionalAction, default=True,
                        help="shared layout: the policy runs rlhf_fast's fused RMSNorm/SwiGLU/rotary ops (patch_backbone, "
                             "the trainers' default); --no-fused-backbone for the unpatched HF modules")
    parser.add_argument("--packed-tokens", type=int, default=None, metavar="N",
                        help="shared layout, padding-free: tokens one micro-batch's forward runs on (the real tokens, "
                             "or micro_batch_token_budget); default: batch x (prompt + response), padded")
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--fsdp", action="store_true", help="shard parameters, grads and optimizer over --gpus")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank for --reference lora")
    parser.add_argument("--replicate-frozen", action="store_true",
                        help="under --fsdp, keep a full copy of the frozen reference and reward on every GPU "
                             "(a loop that shards only the trainable model; rlhf_fast's trainer shards them)")
    parser.add_argument("--gen-batch", type=int, default=None, help="sequences per generation batch (KV cache); default --batch")
    parser.add_argument("--gpu-mem", default="80GB", help=f"memory per GPU: {MEMORY_FORMS}")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--png", metavar="FILE", help="write a stacked bar chart, one bar per layout")
    parser.add_argument("--measure", action="store_true",
                        help="also run one real PPO micro-step (shared layout, random weights) and print measured bytes")
    parser.add_argument("--device", default=None, help="device for --measure (default: cuda if available, else cpu)")
    parser.add_argument("--trace", metavar="FILE",
                        help="with --measure on CUDA: save a torch.cuda.memory snapshot (open in pytorch.org/memory_viz)")


def run(args: argparse.Namespace) -> int:
    import torch

    from rlhf_fast.measure import available_bytes
    from rlhf_fast.memory.micro_step import compare_measured, measure_micro_step
    from rlhf_fast.memory.report import format_measured, format_report, report_dict, save_png

    prog = "rlhf-fast memory"
    try:
        gpu_mem = parse_memory(args.gpu_mem)
        setup = Setup(batch=args.batch, prompt_len=args.prompt_len, response_len=args.response_len,
                      layout=args.layout, reference=args.reference, dtype=args.dtype, precision=args.precision,
                      optimizer=args.optimizer, grad_checkpointing=args.grad_checkpointing, gpus=args.gpus,
                      fsdp=args.fsdp, lora_r=args.lora_r, shard_frozen=not args.replicate_frozen, gen_batch=args.gen_batch,
                      fused_backbone=args.fused_backbone, packed_tokens=args.packed_tokens)
        if args.fsdp and args.gpus < 2:
            raise ValueError(f"--fsdp needs --gpus >= 2, got --gpus {args.gpus}")
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.trace and not args.measure:
            raise ValueError("--trace records the --measure micro-step: add --measure")
        if args.trace and not device.startswith("cuda"):
            raise ValueError(f"--trace needs CUDA (a torch.cuda.memory snapshot); the device here is {device}")
        config = load_model_config(args.model)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    shape = model_shape(build_meta_model(config))
    rep = report_dict(args.model, shape, setup, gpu_mem)
    if args.measure:
        need = compare_measured(shape, setup, {"device": device.split(":")[0]})
        need_bytes = need["params"] + need["grads"] + need["optimizer"] + need["activations"]
        avail = available_bytes(device)
        if avail is not None and need_bytes > 0.8 * avail:
            print(f"{prog}: error: --measure builds real weights: about {need_bytes / 2**30:.1f} GiB needed, "
                  f"{avail / 2**30:.1f} GiB available on {device}; measure a smaller model or batch", file=sys.stderr)
            return 2
        measured = measure_micro_step(config, setup, device=device, trace=args.trace)
        rep["measured"] = {"measured": measured, "predicted": compare_measured(shape, setup, measured)}
    if args.png:
        save_png(rep, args.png)
        rep["png"] = args.png
    if args.json:
        print(json.dumps(rep, indent=2, default=str))
        return 0
    print(format_report(rep))
    if args.measure:
        print("\n" + format_measured(rep["measured"], setup.dtype))
    if args.png:
        print(f"chart written to {args.png}")
    return 0


__all__ = ["configure", "run"]
