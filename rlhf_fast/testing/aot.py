"""Ahead-of-time compile harness: proves every Triton kernel in rlhf_fast.ops GPU-ready, no GPU needed.

For each op module under rlhf_fast.ops it collects every ``@triton.jit`` function and the module's
``aot_specs()`` (the configs its launcher picks at realistic shapes), compiles each spec with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for sm_80 and sm_90, and reads
registers, stack (spills), local memory and shared memory from the cubin with the ``cuobjdump``
the triton wheel ships. Limits: no spill (STACK and LOCAL 0), at most 255 registers, shared
memory within the target's per-block limit. Must run in a process without TRITON_INTERPRET.

    python -m rlhf_fast.testing.aot                    # print the table, exit 1 on a violation
    python -m rlhf_fast.testing.aot --write FILE.md    # also write the deterministic report
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

TARGETS = (80, 90)
# Max shared memory per block (opt-in) in bytes: A100 163 KB, H100 227 KB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGISTERS = 255


@dataclass
class KernelResources:
    name: str
    label: str
    arch: int
    num_warps: int
    constexprs: dict
    registers: int
    stack: int
    local: int
    shared: int

    def violations(self) -> list[str]:
        out = []
        if self.stack > 0 or self.local > 0:
            out.append(f"spills (STACK={self.stack}, LOCAL={self.local})")
        if self.registers > MAX_REGISTERS:
            out.append(f"{self.registers} registers > {MAX_REGISTERS}")
        if self.shared > SHARED_LIMIT[self.arch]:
            out.append(f"shared memory {self.shared} B > sm_{self.arch} limit {SHARED_LIMIT[self.arch]} B")
        return out


def cuobjdump_path() -> Path:
    import triton

    p = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not p.exists():
        raise FileNotFoundError(f"cuobjdump not found in the triton wheel at {p}")
    return p


def op_modules():
    """Every module of rlhf_fast.ops (imported), in name order."""
    import rlhf_fast.ops as ops_pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(ops_pkg.__path__), key=lambda i: i.name):
        mods.append(importlib.import_module(f"rlhf_fast.ops.{info.name}"))
    return mods


def jit_functions(module) -> list:
    """The @triton.jit functions defined in ``module`` (not imported into it)."""
    from triton.runtime.jit import JITFunction

    out = []
    for obj in vars(module).values():
        if isinstance(obj, JITFunction) and obj.fn.__module__ == module.__name__:
            out.append(obj)
    return sorted(out, key=lambda f: f.fn.__name__)


def collect_specs():
    """(specs, missing): all KernelSpecs, and names of kernels no spec covers."""
    specs, missing = [], []
    for mod in op_modules():
        kernels = jit_functions(mod)
        mod_specs = list(mod.aot_specs()) if hasattr(mod, "aot_specs") else []
        covered = {id(s.kernel) for s in mod_specs}
        missing += [f"{mod.__name__}.{k.fn.__name__}" for k in kernels if id(k) not in covered]
        specs += mod_specs
    return specs, missing


_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_spec(spec, arch: int) -> KernelResources:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("AOT compile needs a process without TRITON_INTERPRET")
    src = ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs)
    compiled = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
    )
    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run(
            [str(cuobjdump_path()), "--dump-resource-usage", str(cubin)],
            check=True, capture_output=True, text=True,
        ).stdout
    m = _RES_RE.search(text)
    if m is None:
        raise RuntimeError(f"could not parse cuobjdump output for {spec.name}:\n{text}")
    static_shared = int(m.group(4))
    dynamic_shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    return KernelResources(
        name=spec.name, label=spec.label, arch=arch, num_warps=spec.num_warps,
        constexprs=dict(spec.constexprs), registers=int(m.group(2)), stack=int(m.group(3)),
        local=int(m.group(5)), shared=max(static_shared, dynamic_shared),
    )


def run_all(specs=None, archs=TARGETS) -> list[KernelResources]:
    if specs is None:
        specs, missing = collect_specs()
        if missing:
            raise RuntimeError(f"kernels without aot_specs(): {missing}")
    return [compile_spec(s, a) for s in specs for a in archs]


def report_markdown(results: list[KernelResources]) -> str:
    lines = [
        "# Triton kernel resources (ahead-of-time compile, no GPU)",
        "",
        "Generated by `make kernel-report` (rlhf_fast/testing/aot.py): every `@triton.jit` in",
        "`rlhf_fast.ops` compiled with `triton.compile` for sm_80 and sm_90 at the configs its launcher",
        "picks, resources read with the triton wheel's `cuobjdump --dump-resource-usage`.",
        f"Limits: no spill (STACK = LOCAL = 0), at most {MAX_REGISTERS} registers, shared memory within the",
        "per-block limit (sm_80: 166912 B, sm_90: 232448 B).",
        "",
        "| kernel | shape | arch | warps | constexprs | REG | STACK | LOCAL | SHARED (B) | ok |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cx = ", ".join(f"{k}={v}" for k, v in sorted(r.constexprs.items()))
        ok = "yes" if not r.violations() else "NO: " + "; ".join(r.violations())
        lines.append(
            f"| `{r.name}` | {r.label} | sm_{r.arch} | {r.num_warps} | {cx} | {r.registers} | {r.stack} "
            f"| {r.local} | {r.shared} | {ok} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", metavar="FILE", help="write the markdown report to FILE")
    args = ap.parse_args(argv)
    results = run_all()
    md = report_markdown(results)
    print(md)
    if args.write:
        Path(args.write).parent.mkdir(parents=True, exist_ok=True)
        Path(args.write).write_text(md)
        print(f"wrote {args.write}")
    bad = [r for r in results if r.violations()]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
