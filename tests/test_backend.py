import pytest
import torch

from rlhf_fast import _backend
from rlhf_fast._backend import dispatch


def test_cpu_tensor_defaults_to_cpp_when_built_else_torch():
    expected = "cpp" if _backend.HAS_EXT else "torch"
    assert dispatch(torch.zeros(3)) == expected


def test_cpu_tensor_never_goes_to_triton_by_default():
    assert dispatch(torch.zeros(3)) != "triton"


def test_forced_backends():
    x = torch.zeros(3)
    assert dispatch(x, "torch") == "torch"
    if _backend.HAS_EXT:
        assert dispatch(x, "cpp") == "cpp"


def test_unknown_backend_names_valid_ones():
    with pytest.raises(ValueError, match="triton.*cpp.*torch"):
        dispatch(torch.zeros(1), "cuda")


@pytest.mark.skipif(_backend.TRITON_INTERPRET, reason="checks the non-interpreter process")
def test_forced_triton_on_cpu_needs_interpreter():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        dispatch(torch.zeros(1), "triton")


def test_cpp_backend_rejects_non_cpu(monkeypatch):
    if not _backend.HAS_EXT:
        pytest.skip("extension not built (RLHF_FAST_NO_EXT run)")
    meta = torch.empty(2, device="meta")
    with pytest.raises(ValueError, match="CPU"):
        dispatch(meta, "cpp")


def test_detection_is_computed_once():
    import importlib

    before = (_backend.HAS_EXT, _backend.HAS_TRITON)
    assert importlib.import_module("rlhf_fast._backend") is _backend
    assert (_backend.HAS_EXT, _backend.HAS_TRITON) == before
