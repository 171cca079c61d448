"""gae: hand-worked values, every backend against the Python-loop reference, edge cases, bad input."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast.memory.tracker import AllocationTracker
from rlhf_fast.ops.gae import GAEOutput, gae, gae_reference
from tests.utils import assert_close

needs_ext = pytest.mark.skipif(not _backend.HAS_EXT, reason="extension not built (RLHF_FAST_NO_EXT run)")
CPU_BACKENDS = ("torch", *(["cpp"] if _backend.HAS_EXT else []))
GAMMA_LAM = [(0.0, 0.0), (0.95, 0.95), (1.0, 1.0), (0.95, 0.0), (1.0, 0.95), (0.0, 1.0)]


def _t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --------------------------------------------------------------------------- hand-worked values
R3 = _t([1.0, 0.0, 2.0])
V3 = _t([0.5, 1.0, 1.0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_full_row(backend):
    # γ = λ = 0.5 (γλ = 0.25), terminal after t=2:
    # t=2: δ = 2 + 0.5·0 - 1 = 1;           A = 1
    # t=1: δ = 0 + 0.5·1 - 1 = -0.5;        A = -0.5 + 0.25·1 = -0.25
    # t=0: δ = 1 + 0.5·1 - 0.5 = 1;         A = 1 + 0.25·(-0.25) = 0.9375
    # returns = A + V = [1.4375, 0.75, 2]
    out = gae(R3, V3, torch.ones(1, 3), 0.5, 0.5, backend=backend)
    assert isinstance(out, GAEOutput)
    torch.testing.assert_close(out.advantages, _t([0.9375, -0.25, 1.0]))
    torch.testing.assert_close(out.returns, _t([1.4375, 0.75, 2.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_bootstrap(backend):
    # Truncated row, V after the end = 4:
    # t=2: δ = 2 + 0.5·4 - 1 = 3;  A = 3
    # t=1: δ = -0.5;               A = -0.5 + 0.25·3 = 0.25
    # t=0: δ = 1;                  A = 1 + 0.25·0.25 = 1.0625;   returns = [1.5625, 1.25, 4]
    out = gae(R3, V3, torch.ones(1, 3), 0.5, 0.5, bootstrap_values=torch.tensor([4.0]), backend=backend)
    torch.testing.assert_close(out.advantages, _t([1.0625, 0.25, 3.0]))
    torch.testing.assert_close(out.returns, _t([1.5625, 1.25, 4.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_hole_is_skipped(backend):
    # mask [1, 0, 1]: the hole (garbage 99s) is invisible; t=0 sees t=2 as "next".
    # t=2: A = 2 - 1 = 1 (next value and advantage carried: 1, 1)
    # t=1: masked -> A = R = 0
    # t=0: δ = 1 + 0.5·1 - 0.5 = 1;  A = 1 + 0.25·1 = 1.25;  returns = [1.75, 0, 2]
    out = gae(_t([1.0, 99.0, 2.0]), _t([0.5, 99.0, 1.0]), torch.tensor([[1, 0, 1]]), 0.5, 0.5, backend=backend)
    torch.testing.assert_close(out.advantages, _t([1.25, 0.0, 1.0]))
    torch.testing.assert_close(out.returns, _t([1.75, 0.0, 2.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_left_padding_and_empty_row(backend):
    # Row 0, mask [0, 1, 1] (left padding): the same two steps as above -> A = [0, 1.25, 1].
    # Row 1, mask all 0: everything 0.
    r = _t([9.0, 1.0, 2.0], [1.0, 2.0, 3.0])
    v = _t([9.0, 0.5, 1.0], [1.0, 1.0, 1.0])
    out = gae(r, v, torch.tensor([[0, 1, 1], [0, 0, 0]]), 0.5, 0.5, backend=backend)
    torch.testing.assert_close(out.advantages, _t([0.0, 1.25, 1.0], [0.0, 0.0, 0.0]))
    torch.testing.assert_close(out.returns, _t([0.0, 1.75, 2.0], [0.0, 0.0, 0.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_worked_gamma_lam_extremes(backend):
    m = torch.ones(1, 3)
    # γ = λ = 1: A_t = Σ_{k≥t} r_k - V_t = [3 - 0.5, 2 - 1, 2 - 1]
    torch.testing.assert_close(gae(R3, V3, m, 1.0, 1.0, backend=backend).advantages, _t([2.5, 1.0, 1.0]))
    # γ = 0: A_t = r_t - V_t = [0.5, -1, 1]
    torch.testing.assert_close(gae(R3, V3, m, 0.0, 0.95, backend=backend).advantages, _t([0.5, -1.0, 1.0]))
    # λ = 0: A_t = δ_t = r_t + γ V_{t+1} - V_t with γ = 1: [1 + 1 - 0.5, 0 + 1 - 1, 2 - 1]
    torch.testing.assert_close(gae(R3, V3, m, 1.0, 0.0, backend=backend).advantages, _t([1.5, 0.0, 1.0]))


# --------------------------------------------------------------------------- backends against the reference
def _masks(B, T, g):
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    pos = torch.arange(T)
    right = pos[None, :] < lengths[:, None]
    left = pos[None, :] >= (T - lengths)[:, None]
    holes = right & (torch.rand(B, T, generator=g) < 0.7)
    empty = holes.clone()
    empty[::2] = False
    return {"right": right, "left": left, "holes": holes, "empty_rows": empty, "all": torch.ones(B, T, dtype=torch.bool)}


def _check(backend, B, T, dtype, gamma, lam, with_bootstrap):
    g = torch.Generator().manual_seed(3)
    r = torch.randn(B, T, generator=g).to(dtype)
    v = torch.randn(B, T, generator=g).to(dtype)
    boot = torch.randn(B, generator=g).to(dtype) if with_bootstrap else None
    for name, mask in _masks(B, T, g).items():
        ref = gae_reference(r, v, mask, gamma, lam, boot)
        got = gae(r, v, mask, gamma, lam, bootstrap_values=boot, backend=backend)
        assert got.advantages.dtype == torch.float32 and got.returns.dtype == torch.float32
        # Same rounded inputs, fp32 arithmetic in both; the scan reorders nothing, but FMA
        # contraction may differ: fp32 tolerance scaled by the horizon for γ = λ = 1 sums.
        atol = 1e-5 * max(1.0, (T ** 0.5) if gamma * lam > 0.9 else 1.0)
        torch.testing.assert_close(got.advantages, ref.advantages, atol=atol, rtol=1e-5, msg=name)
        torch.testing.assert_close(got.returns, ref.returns, atol=atol, rtol=1e-5, msg=name)
        assert (got.advantages[~mask] == 0).all() and (got.returns[~mask] == 0).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
@pytest.mark.parametrize("B,T", [(1, 1), (1, 13), (9, 1), (6, 37), (0, 5), (3, 0)])
@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_cpp_matches_reference(B, T, dtype, gamma, lam, with_bootstrap):
    _check("cpp", B, T, dtype, gamma, lam, with_bootstrap)


@needs_ext
def test_cpp_matches_reference_large():
    _check("cpp", 1040, 1024, torch.float32, 0.99, 0.95, True)  # OpenMP path (B·T >= 2^20)


# The C++ scan runs 8 rows in lockstep on AVX2 CPUs (tiles of 8 rows x blocks of 8 steps, leftover
# rows and the T % 8 latest steps scalar). These shapes put rows and steps on every side of those
# boundaries; on a CPU without AVX2 they exercise the scalar path instead.
@needs_ext
@pytest.mark.parametrize("gamma,lam", [(0.0, 0.0), (0.95, 0.95), (1.0, 1.0), (1.0, 0.95), (0.0, 1.0)])
@pytest.mark.parametrize("B,T", [(8, 8), (8, 16), (16, 9), (17, 33), (7, 64), (24, 7), (1, 4096), (9, 100)])
@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_cpp_row_tiles_match_reference(B, T, gamma, lam, with_bootstrap):
    _check("cpp", B, T, torch.float32, gamma, lam, with_bootstrap)


@needs_ext
def test_cpp_matches_reference_beyond_last_level_cache():
    # 17 B per token above the last-level cache (32 MiB here): outputs are written with streaming
    # stores in 16-step pairs of blocks (T % 16 == 0); 523 rows leave 3 scalar rows after the tiles.
    _check("cpp", 523, 4096, torch.float32, 0.99, 0.95, True)


@needs_ext
@pytest.mark.parametrize("env", [{"RLHF_FAST_GAE_STREAM_MIN_BYTES": "0"},
                                 {"RLHF_FAST_GAE_STREAM_MIN_BYTES": "1000000000000"},
                                 {"RLHF_FAST_GAE_SIMD": "0", "RLHF_FAST_GAE_STREAM_MIN_BYTES": "1"}])
def test_cpp_forced_paths_match_reference(env):
    # Read once per process, so each runs in a subprocess: RLHF_FAST_GAE_STREAM_MIN_BYTES forces the
    # streaming-store path on for small shapes (0) or off for large ones, whatever this CPU's cache
    # size; RLHF_FAST_GAE_SIMD=0 runs the portable scalar rows on every row of an AVX2 CPU.
    code = (
        "import os\n"
        "import torch\n"
        "from tests.ops.test_gae import _check, _tile_boundary_masks\n"
        "from rlhf_fast.ops.gae import gae, gae_reference\n"
        "for B, T in [(16, 64), (17, 48), (9, 32), (8, 40), (24, 16)]:\n"
        "    _check('cpp', B, T, torch.float32, 0.95, 0.95, True)\n"
        "    _check('cpp', B, T, torch.float32, 1.0, 1.0, False)\n"
        "r, v = torch.randn(16, 48), torch.randn(16, 48)\n"
        "for name, m in _tile_boundary_masks(16, 48).items():\n"
        "    got, ref = gae(r, v, m, 0.9, 0.8, backend='cpp'), gae_reference(r, v, m, 0.9, 0.8)\n"
        "    torch.testing.assert_close(got.advantages, ref.advantages, atol=1e-5, rtol=1e-5, msg=name)\n"
        "    torch.testing.assert_close(got.returns, ref.returns, atol=1e-5, rtol=1e-5, msg=name)\n"
        "big = 520 if int(os.environ['RLHF_FAST_GAE_STREAM_MIN_BYTES']) > 0 else 16  # off: beyond the LLC\n"
        "_check('cpp', big, 4096, torch.float32, 0.99, 0.95, False)\n"
        "print('OK')\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def _tile_boundary_masks(B, T):
    """Masks whose holes and response edges fall on the row-tile (8) and step-block (8) edges."""
    pos = torch.arange(T)
    rows = torch.arange(B)[:, None]
    straddle = torch.ones(B, T, dtype=torch.bool)
    for t in (7, 8, 15, 16, T - T % 8 - 1, T - T % 8):  # last step of a block, first of the next
        if 0 <= t < T:
            straddle[:, t] = False
    straddle[7::8, :] &= pos[None, :] % 3 != 0  # row 7 of each tile (and row 8 starts the next)
    # a hole run crossing a block edge, whose length differs per row
    run = (pos[None, :] >= 5) & (pos[None, :] < 5 + (rows % 8) + 4)
    return {
        "straddle": straddle,
        "hole_runs": ~run,
        # responses ending / starting exactly on a block edge, or one step either side of it
        "right_on_edges": pos[None, :] < (8 * (rows % 4) + (rows % 3) - 1).clamp(min=0),
        "left_on_edges": pos[None, :] >= (T - 8 * (rows % 4) - (rows % 3) + 1).clamp(max=T),
        "only_tail": (pos[None, :] >= T - T % 8).expand(B, T).clone(),  # valid steps only in the scalar tail
        "only_first": (pos[None, :] == 0).expand(B, T).clone(),
    }


@needs_ext
@pytest.mark.parametrize("B,T", [(16, 37), (9, 24), (8, 8)])
@pytest.mark.parametrize("with_bootstrap", [False, True])
def test_cpp_holes_across_tile_and_block_edges(B, T, with_bootstrap):
    g = torch.Generator().manual_seed(11)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    boot = torch.randn(B, generator=g) if with_bootstrap else None
    for gamma, lam in ((0.95, 0.95), (1.0, 1.0), (0.5, 0.0)):
        for name, mask in _tile_boundary_masks(B, T).items():
            ref = gae_reference(r, v, mask, gamma, lam, boot)
            got = gae(r, v, mask, gamma, lam, bootstrap_values=boot, backend="cpp")
            msg = f"{name} gamma={gamma} lam={lam}"
            torch.testing.assert_close(got.advantages, ref.advantages, atol=1e-5, rtol=1e-5, msg=msg)
            torch.testing.assert_close(got.returns, ref.returns, atol=1e-5, rtol=1e-5, msg=msg)
            assert (got.advantages[~mask] == 0).all() and (got.returns[~mask] == 0).all(), msg


@needs_ext
def test_cpp_masked_garbage_never_leaks_in_row_tiles():
    g = torch.Generator().manual_seed(5)
    r, v = torch.randn(19, 45, generator=g), torch.randn(19, 45, generator=g)
    mask = torch.rand(19, 45, generator=g) < 0.6
    clean = gae(r, v, mask, 0.9, 0.9, backend="cpp")
    r[~mask] = float("nan")
    v[~mask] = float("-inf")
    r[mask & (torch.rand(19, 45, generator=g) < 0.1)] *= 1e3  # finite, merely large
    dirty = gae(r, v, mask, 0.9, 0.9, backend="cpp")
    ref = gae_reference(torch.where(mask, r, 0.0), torch.where(mask, v, 0.0), mask, 0.9, 0.9)
    assert torch.isfinite(dirty.advantages).all() and torch.isfinite(dirty.returns).all()
    torch.testing.assert_close(dirty.advantages, ref.advantages, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(dirty.returns, ref.returns, atol=1e-3, rtol=1e-5)
    assert not torch.equal(clean.advantages, dirty.advantages)  # the large rewards did reach the scan


@needs_ext
def test_cpp_counts_nonfinite_inputs_exactly_in_row_tiles():
    # Non-finite inputs at valid positions inside the vectorised part of a tile (rows 0-7 and 8-15,
    # steps 0-31), in the scalar tail (step 33) and in a leftover row (16): every one is counted once
    # (a position whose reward and value are both bad counts once); masked ones are not counted.
    r, v = torch.randn(17, 34), torch.randn(17, 34)
    mask = torch.ones(17, 34, dtype=torch.bool)
    mask[2, 5] = False
    r[2, 5] = float("nan")  # masked: ignored
    r[0, 0] = float("nan")
    v[3, 17] = float("inf")
    r[9, 31], v[9, 31] = float("inf"), float("-inf")  # one position
    v[12, 33] = float("nan")  # scalar tail of a tile
    r[16, 4] = float("-inf")  # leftover row
    with pytest.raises(ValueError, match=r"\(5 values\)"):
        gae(r, v, mask, 0.99, 0.95, backend="cpp")
    r[0, 0] = 1.0
    with pytest.raises(ValueError, match=r"\(4 values\)"):
        gae(r, v, mask, 0.99, 0.95, backend="cpp")


@needs_ext
def test_cpp_overflow_of_finite_inputs_is_not_reported():
    # Finite inputs whose returns overflow to inf are not non-finite inputs: no error, like the
    # reference (which returns the same inf).
    r = torch.full((8, 16), 3e38)
    v = torch.full((8, 16), -3e38)
    mask = torch.ones(8, 16, dtype=torch.bool)
    got = gae(r, v, mask, 1.0, 1.0, backend="cpp")
    ref = gae_reference(r, v, mask, 1.0, 1.0)
    assert torch.isinf(got.advantages).all()
    torch.testing.assert_close(got.advantages, ref.advantages)


@pytest.mark.interpret
@pytest.mark.parametrize("gamma,lam", GAMMA_LAM)
def test_triton_matches_reference(gamma, lam):
    for B, T, dtype, boot in [(1, 1, torch.float32, False), (6, 37, torch.float32, True),
                              (40, 9, torch.bfloat16, False), (3, 20, torch.bfloat16, True)]:
        _check("triton", B, T, dtype, gamma, lam, boot)


@pytest.mark.interpret
def test_triton_hand_worked():
    out = gae(_t([1.0, 99.0, 2.0]), _t([0.5, 99.0, 1.0]), torch.tensor([[1, 0, 1]]), 0.5, 0.5, backend="triton")
    torch.testing.assert_close(out.advantages, _t([1.25, 0.0, 1.0]))
    out = gae(R3, V3, torch.ones(1, 3), 0.5, 0.5, bootstrap_values=torch.tensor([4.0]), backend="triton")
    torch.testing.assert_close(out.returns, _t([1.5625, 1.25, 4.0]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_masked_garbage_never_leaks(backend):
    r, v = torch.randn(2, 5), torch.randn(2, 5)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 0, 0, 0, 0]])
    clean = gae(r, v, mask, 0.9, 0.9, backend=backend)
    r[mask == 0] = float("nan")
    v[mask == 0] = float("inf")
    dirty = gae(r, v, mask, 0.9, 0.9, backend=backend)
    assert torch.equal(clean.advantages, dirty.advantages) and torch.equal(clean.returns, dirty.returns)


@needs_ext
def test_cpp_allocates_only_the_outputs():
    r, v = torch.randn(64, 1024), torch.randn(64, 1024)
    mask = torch.rand(64, 1024) < 0.8
    with AllocationTracker() as t:
        gae(r, v, mask, 0.99, 0.95, backend="cpp")
    assert t.peak_live_bytes <= 2 * 64 * 1024 * 4 + 4096, t.largest()


# --------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    r, v, m = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="gamma must be in \\[0, 1\\], got 1.5"):
        gae(r, v, m, 1.5, 0.9)
    with pytest.raises(ValueError, match="lam must be in \\[0, 1\\], got -0.1"):
        gae(r, v, m, 0.9, -0.1)
    with pytest.raises(ValueError, match=r"values must have the shape of rewards \(2, 3\), got \(2, 4\)"):
        gae(r, torch.randn(2, 4), m, 0.9, 0.9)
    with pytest.raises(ValueError, match="mask must have the shape of rewards"):
        gae(r, v, torch.ones(3, 3), 0.9, 0.9)
    with pytest.raises(ValueError, match=r"bootstrap_values must have shape \[B\] = \(2,\), got \(3,\)"):
        gae(r, v, m, 0.9, 0.9, bootstrap_values=torch.randn(3))
    with pytest.raises(ValueError, match="rewards must be \\[B, T\\]"):
        gae(torch.randn(6), torch.randn(6), torch.ones(6), 0.9, 0.9)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        gae(r, v, torch.full((2, 3), 0.5), 0.9, 0.9)
    for backend in CPU_BACKENDS:
        bad = r.clone()
        bad[1, 2] = float("nan")
        with pytest.raises(ValueError, match="NaN or inf"):
            gae(bad, v, m, 0.9, 0.9, backend=backend)
        with pytest.raises(ValueError, match="NaN or inf"):
            gae(r, v, m, 0.9, 0.9, bootstrap_values=torch.tensor([0.0, float("inf")]), backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_buffers_are_written_in_place(backend):
    r, v = torch.randn(3, 7), torch.randn(3, 7)
    mask = torch.rand(3, 7) < 0.7
    adv_buf, ret_buf = torch.full((3, 7), 123.0), torch.full((3, 7), 123.0)
    got = gae(r, v, mask, 0.9, 0.8, backend=backend, out=(adv_buf, ret_buf))
    ref = gae_reference(r, v, mask, 0.9, 0.8)
    assert got.advantages is adv_buf and got.returns is ret_buf
    assert_close(adv_buf, ref.advantages)
    assert_close(ret_buf, ref.returns)


def test_bad_out_buffers():
    r, v, m = torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"out\[0\] \(advantages\) must be float32 of shape \(2, 3\)"):
        gae(r, v, m, 0.9, 0.9, out=(torch.empty(2, 4), torch.empty(2, 3)))
    with pytest.raises(ValueError, match=r"out\[1\] \(returns\) must be float32"):
        gae(r, v, m, 0.9, 0.9, out=(torch.empty(2, 3), torch.empty(2, 3, dtype=torch.bfloat16)))
    with pytest.raises(ValueError, match="must be contiguous"):
        gae(r, v, m, 0.9, 0.9, out=(torch.empty(3, 2).t(), torch.empty(2, 3)))
    buf = torch.empty(2, 3)
    with pytest.raises(ValueError, match="different buffers"):
        gae(r, v, m, 0.9, 0.9, out=(buf, buf))
    with pytest.raises(TypeError, match="out must be a pair"):
        gae(r, v, m, 0.9, 0.9, out=buf)
