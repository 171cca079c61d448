"""Memory: what a PPO step costs in bytes, predicted and measured, and the ``rlhf-fast memory`` command.

    rules.py       the byte-accounting rules: of real or meta-device modules (param_bytes, grad_bytes,
                   adamw_state_bytes, component_bytes, layout_bytes) and of an architecture and a run
                   (activation_bytes, logprob buffers, kv_cache_bytes, ...); the formulas are in its docstring
    spec.py        what is asked: ModelShape (read from a meta-device model of a preset or HF config), Setup,
                   parse_memory, setup_from_ppo_config
    predictor.py   predict(shape, setup, layout) -> Prediction per component, for TRL's four-model layout
                   and ours; suggestions that make a setup fit
    report.py      report_dict / format_report / format_measured / save_png
    tracker.py     AllocationTracker (a TorchDispatchMode recording every tensor created; tests use it to
                   prove memory claims), StorageTracker, which the measurement uses, and
                   SavedTensorCounter (the bytes autograd saves for backward)
    micro_step.py  measure_micro_step (one real PPO micro-step, bytes counted) and compare_measured
    command.py     ``rlhf-fast memory``: configure(parser), run(args)

Every public name is importable from here (``from rlhf_fast import memory; memory.predict(...)``);
modules load on first use, so importing the package pulls in neither transformers nor the predictor.
No module is named like a name it exports (``predictor.py`` holds ``predict``), so importing a
submodule never shadows a function here.
"""
from __future__ import annotations

import importlib

_MODULES = {
    "rules": ("ADAMW_MOMENTS", "ComponentBytes", "dtype_bytes", "torch_dtype", "tensor_bytes", "param_bytes",
              "grad_bytes", "adamw_state_bytes", "component_bytes", "layout_bytes", "format_layout",
              "trainable_element_bytes", "activation_bytes", "logits_bytes", "naive_logprob_buffer_bytes",
              "logprob_chunk_bytes", "fused_logprob_buffer_bytes", "tied_head_grad_bytes", "kv_cache_bytes"),
    "spec": ("LAYOUTS", "REFERENCE_MODES", "PRECISIONS", "OPTIMIZERS", "DTYPE_BYTES", "MEMORY_FORMS",
             "parse_memory", "load_model_config", "build_meta_model", "ModelShape", "model_shape", "Setup",
             "setup_from_ppo_config"),
    "predictor": ("STATIC", "TRAIN", "GENERATE", "COMPONENTS", "Prediction", "predict", "Suggestion", "suggestions"),
    "report": ("report_dict", "format_report", "format_measured", "save_png"),
    "tracker": ("Allocation", "AllocationTracker", "StorageTracker", "SavedTensorCounter"),
    "micro_step": ("measure_micro_step", "compare_measured"),
    "command": ("configure", "run"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        value = getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
