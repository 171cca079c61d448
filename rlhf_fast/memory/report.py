"""The ``rlhf-fast memory`` report: a JSON-able dict, a text table and a PNG of both layouts' predictions.

``report_dict(spec, shape, setup, gpu_mem)`` holds everything ``--json`` prints: the model, the setup,
each layout's components (``rlhf_fast.memory.predictor``) and the verdict with suggestions for
``setup.layout``; ``format_report`` renders it as a table; ``save_png`` as stacked bars;
``format_measured`` renders ``--measure``'s measured-beside-predicted table.
"""
from __future__ import annotations

import dataclasses

from rlhf_fast.memory.predictor import COMPONENTS, GENERATE, STATIC, TRAIN, predict, suggestions
from rlhf_fast.memory.spec import LAYOUTS, ModelShape, Setup


def _gib(n: int | float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def report_dict(spec: str, shape: ModelShape, setup: Setup, gpu_mem: int) -> dict:
    """Everything ``--json`` prints: model, setup, both layouts' components, verdict for ``setup.layout``."""
    layouts = {}
    for layout in LAYOUTS:
        p = predict(shape, setup, layout)
        layouts[layout] = {"components": dict(p.components), "static_bytes": p.static_bytes,
                           "train_bytes": p.train_bytes, "generate_bytes": p.generate_bytes,
                           "peak_bytes": p.peak_bytes, "fits": p.peak_bytes <= gpu_mem,
                           # the same layout with checkpointing toggled, for the table's "other" row
                           "activations_other_checkpointing": predict(
                               shape, dataclasses.replace(setup, grad_checkpointing=not setup.grad_checkpointing),
                               layout).components["activations"]}
    chosen = layouts[setup.layout]
    sugg = [] if chosen["fits"] else suggestions(shape, setup, gpu_mem)
    return {
        "model": {"spec": spec, **shape._asdict()},
        "setup": dataclasses.asdict(setup),
        "gpu_mem_bytes": gpu_mem,
        "layouts": layouts,
        "verdict": {"layout": setup.layout, "fits": chosen["fits"], "peak_bytes": chosen["peak_bytes"],
                    "suggestions": [{"text": s.text, "changes": s.changes, "peak_bytes": s.peak_bytes}
                                    for s in sugg]},
    }


def format_report(rep: dict) -> str:
    s, m = rep["setup"], rep["model"]
    lines = [
        f"model {m['spec']} ({m['model_type']}): {m['total_numel'] / 1e9:.3f} B parameters, hidden {m['hidden']}, "
        f"{m['layers']} layers, vocab {m['vocab']}{', tied embeddings' if m['tied'] else ''}",
        f"batch {s['batch']} x (prompt {s['prompt_len']} + response {s['response_len']}), {s['dtype']} "
        f"({s['precision']} precision, {s['optimizer']}), grad checkpointing {'on' if s['grad_checkpointing'] else 'off'}, "
        f"reference (shared layout) {s['reference']}{', fused backbone' if s.get('fused_backbone') else ''}, "
        f"{s['gpus']} GPU(s){' FSDP' if s['fsdp'] else ''}",
        "",
        f"{'per GPU, GiB':<20}" + "".join(f"{name:>14}" for name in LAYOUTS),
    ]
    for comp in COMPONENTS:
        lines.append(f"{comp:<20}" + "".join(f"{_gib(rep['layouts'][k]['components'][comp]):>14}" for k in LAYOUTS))
    other = "(act. ckpt " + ("off)" if s["grad_checkpointing"] else "on)")
    lines.append(f"{other:<20}" + "".join(f"{_gib(rep['layouts'][k]['activations_other_checkpointing']):>14}"
                                          for k in LAYOUTS))
    lines.append("-" * (20 + 14 * len(LAYOUTS)))
    lines.append(f"{'peak':<20}" + "".join(f"{_gib(rep['layouts'][k]['peak_bytes']):>14}" for k in LAYOUTS))
    lines.append(f"{'fits ' + _gib(rep['gpu_mem_bytes']) + ' GiB?':<20}"
                 + "".join(f"{'yes' if rep['layouts'][k]['fits'] else 'NO':>14}" for k in LAYOUTS))
    four, ours = rep["layouts"]["four-model"]["peak_bytes"], rep["layouts"]["shared"]["peak_bytes"]
    lines.append(f"shared / four-model peak = {ours / four:.2f}")
    lines.append("(peak = weights + grads + optimizer + max(activations + logprob buffers, kv cache); "
                 "CUDA context not included)")
    v = rep["verdict"]
    lines.append("")
    if v["fits"]:
        lines.append(f"verdict: {v['layout']} FITS: {_gib(v['peak_bytes'])} of {_gib(rep['gpu_mem_bytes'])} GiB per GPU")
    else:
        lines.append(f"verdict: {v['layout']} does NOT fit: {_gib(v['peak_bytes'])} GiB > "
                     f"{_gib(rep['gpu_mem_bytes'])} GiB per GPU")
        if v["suggestions"]:
            lines.append("what would make it fit (each re-evaluated):")
            for sg in v["suggestions"]:
                lines.append(f"  - {sg['text']}: peak {_gib(sg['peak_bytes'])} GiB")
        else:
            lines.append("nothing tried fits (checkpointing, shared layout, LoRA reference, FSDP up to 1024 GPUs, batch 1)")
    return "\n".join(lines)


def format_measured(measured: dict, dtype: str) -> str:
    """The ``--measure`` table: ``{"measured": measure_micro_step(...), "predicted": compare_measured(...)}``."""
    meas, pred = measured["measured"], measured["predicted"]
    lines = [f"measured on {meas['device']} (one micro-step of the shared layout, {dtype} weights and "
             "AdamW state, no reward model), MiB:",
             f"{'':<16}{'predicted':>12}{'measured':>12}{'ratio':>8}"]
    for k in ("params", "grads", "optimizer", "activations", "logprob_buffer", "step_peak"):
        r = meas[k] / pred[k] if pred[k] else float("nan")
        lines.append(f"{k:<16}{pred[k] / 2**20:>12.2f}{meas[k] / 2**20:>12.2f}{r:>8.2f}")
    if "cuda_peak_allocated" in meas:
        lines.append(f"torch.cuda.max_memory_allocated: {meas['cuda_peak_allocated'] / 2**20:.1f} MiB")
    if "trace" in meas:
        lines.append(f"memory snapshot written to {meas['trace']} (open it at https://pytorch.org/memory_viz)")
    return "\n".join(lines)


def save_png(rep: dict, path: str) -> None:
    """Stacked bars, one per layout: static components + the larger transient phase; the GPU memory as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    colours = plt.get_cmap("tab20").colors
    for i, layout in enumerate(LAYOUTS):
        L = rep["layouts"][layout]
        shown = STATIC + (TRAIN if L["train_bytes"] >= L["generate_bytes"] else GENERATE)
        bottom = 0.0
        for j, comp in enumerate(COMPONENTS):
            if comp not in shown:
                continue
            h = L["components"][comp] / 2**30
            ax.bar(i, h, bottom=bottom, color=colours[j % len(colours)], label=comp if i == 0 else None,
                   edgecolor="white", linewidth=0.5)
            bottom += h
    ax.axhline(rep["gpu_mem_bytes"] / 2**30, color="red", linestyle="--", label="GPU memory")
    ax.set_xticks(range(len(LAYOUTS)), LAYOUTS)
    ax.set_ylabel("GiB per GPU")
    s = rep["setup"]
    ax.set_title(f"{rep['model']['spec']}: B={s['batch']} P={s['prompt_len']} R={s['response_len']} {s['dtype']}")
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["report_dict", "format_report", "format_measured", "save_png"]
