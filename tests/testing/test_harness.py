"""The other test utility: the interpreter subprocess runner (the allocation tracker's tests are in
tests/memory/test_tracker.py)."""
from tests.utils import run_in_interpreter


def test_interpreter_runner_runs_interpret_tests_in_their_own_process():
    node = "tests/ops/test_masked_mean.py::test_triton_interpreter_matches_reference"
    proc = run_in_interpreter(node, "-k", "shape1 and dtype0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert " passed" in proc.stdout and "failed" not in proc.stdout
