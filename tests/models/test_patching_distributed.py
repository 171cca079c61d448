"""patch_backbone under DDP and FSDP2 (torchrun, 2 CPU ranks under gloo, one thread each): the patched
model's logits and averaged gradients equal its unpatched copy's under the same wrapper."""
from __future__ import annotations

import pytest
import torch

from tests.utils import run_torchrun

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_torchrun("tests.models._patch_dist_worker", tmp_path_factory.mktemp("patch_dist"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_patched_model_equals_unpatched_under_the_wrapper(ranks, mode):
    for r in ranks:
        assert "fused 5 RMSNorm" in r["report"] and "before fully_shard" in r["late"]
        cls, patched_layer = r[mode]["layer"]
        assert patched_layer and cls == ("FSDPQwen2DecoderLayer" if mode == "fsdp2" else "Qwen2DecoderLayer")
        patched, plain = r[mode]["patched"], r[mode]["plain"]
        assert patched.keys() == plain.keys()
        for name in patched:
            torch.testing.assert_close(patched[name], plain[name], atol=2e-5, rtol=1e-5, msg=f"{mode} {name}")
    assert not torch.equal(ranks[0][mode]["plain"]["logits"], ranks[1][mode]["plain"]["logits"])  # own rows
    for name, g in ranks[0][mode]["patched"].items():  # gradients averaged over the ranks
        if name != "logits":
            torch.testing.assert_close(g, ranks[1][mode]["patched"][name], atol=1e-6, rtol=1e-6)
