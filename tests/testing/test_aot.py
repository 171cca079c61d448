"""The ahead-of-time compile harness: every kernel covered, compiled for sm_80/sm_90 within limits,
and the harness itself able to fail (a spilling kernel is caught)."""
import pytest

from rlhf_fast._backend import HAS_TRITON, TRITON_INTERPRET

pytestmark = [
    pytest.mark.aot,
    pytest.mark.skipif(not HAS_TRITON or TRITON_INTERPRET, reason="needs triton without TRITON_INTERPRET"),
]


def _specs():
    if not HAS_TRITON or TRITON_INTERPRET:
        return []
    from rlhf_fast.testing.aot import collect_specs

    return collect_specs()[0]


def test_every_jit_kernel_in_ops_has_an_aot_spec():
    from rlhf_fast.testing.aot import collect_specs, jit_functions, op_modules

    specs, missing = collect_specs()
    assert not missing, f"kernels without an aot_specs() entry: {missing}"
    kernels = [k for m in op_modules() for k in jit_functions(m)]
    assert kernels, "no @triton.jit kernel found under rlhf_fast.ops"
    assert {id(k) for k in kernels} <= {id(s.kernel) for s in specs}


@pytest.mark.parametrize("spec", _specs(), ids=lambda s: f"{s.name}[{s.label}]")
@pytest.mark.parametrize("arch", [80, 90])
def test_kernel_compiles_without_spills(spec, arch):
    from rlhf_fast.testing.aot import compile_spec

    res = compile_spec(spec, arch)
    assert res.registers > 0
    assert not res.violations(), f"{res.name} [{res.label}] sm_{arch}: {res.violations()}"


def test_harness_flags_a_spilling_kernel():
    from rlhf_fast.ops._triton import KernelSpec
    from rlhf_fast.testing.aot import compile_spec
    from tests.testing._spill_kernel import row_logsumexp_kernel

    sig = {"x_ptr": "*fp32", "out_ptr": "*fp32", "C": "i32", "BLOCK": "constexpr"}
    big = compile_spec(KernelSpec(row_logsumexp_kernel, sig, {"BLOCK": 65536}, num_warps=4, label="big"), 90)
    assert big.stack > 0 and any("spill" in v for v in big.violations())
    small = compile_spec(KernelSpec(row_logsumexp_kernel, sig, {"BLOCK": 1024}, num_warps=4, label="ok"), 90)
    assert small.stack == 0 and not small.violations()


def test_report_is_deterministic_and_lists_both_targets():
    from rlhf_fast.testing.aot import report_markdown, run_all

    specs = _specs()[:1]
    a, b = run_all(specs), run_all(specs)
    md = report_markdown(a)
    assert md == report_markdown(b)
    assert "sm_80" in md and "sm_90" in md and specs[0].name in md
