"""rlhf_fast.trainer.optim: the one AdamW builder, the LR schedules and the autocast helper."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from rlhf_fast.trainer.optim import (
    autocast_ctx,
    build_adamw,
    build_hf_scheduler,
    build_lr_scheduler,
    lr_multiplier,
)


def test_lr_schedule_values():
    assert lr_multiplier(0, 4, 20, "cosine") == pytest.approx(1 / 5)
    assert lr_multiplier(3, 4, 20, "cosine") == pytest.approx(4 / 5)
    assert lr_multiplier(4, 4, 20, "cosine") == pytest.approx(1.0)
    assert lr_multiplier(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(20, 4, 20, "cosine", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(12, 4, 20, "linear", min_lr_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert lr_multiplier(19, 4, 20, "constant") == 1.0


def _model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)  # frozen: not in any group
    return model


def test_adamw_groups_decay_only_matrices_and_skip_frozen():
    model = _model()
    opt = build_adamw(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    decay, no_decay = opt.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 8])] and decay["weight_decay"] == 0.1
    assert {tuple(p.shape) for p in no_decay["params"]} == {(8,), (3,)} and len(no_decay["params"]) == 4
    assert no_decay["weight_decay"] == 0.0
    assert decay["betas"] == (0.8, 0.9) and decay["eps"] == 1e-6 and decay["lr"] == 1e-3
    assert decay["fused"] is True  # CPU fp32: one kernel
    unfused = build_adamw(model.parameters(), lr=1e-3, fused_allowed=False).param_groups[0]
    assert not unfused["fused"] and unfused["foreach"] is True
    double = build_adamw(_model().double().parameters(), lr=1e-3).param_groups[0]
    assert not double["fused"]  # fp64 has no fused kernel


def test_unfused_adamw_matches_the_single_tensor_update_exactly():
    """The stages' CPU update (fused_allowed=False) is the plain for-loop AdamW, bit for bit."""
    def run(make_opt):
        model = _model()
        opt = make_opt(model)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            model(torch.randn(4, 6, generator=g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    def plain(model):
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                 lr=1e-2, foreach=False)

    ours = run(lambda m: build_adamw(m.parameters(), lr=1e-2, weight_decay=0.1, fused_allowed=False))
    assert torch.equal(ours, run(plain))


def test_schedulers():
    opt = build_adamw(_model().parameters(), lr=1.0)
    sched = build_lr_scheduler(opt, schedule="cosine", total_steps=20, warmup_ratio=0.2)
    lrs = []
    for _ in range(5):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([lr_multiplier(s, 4, 20, "cosine") for s in range(5)])
    # warmup_steps > 0 wins over warmup_ratio
    sched = build_lr_scheduler(build_adamw(_model().parameters(), lr=1.0), schedule="linear", total_steps=20,
                               warmup_steps=1, warmup_ratio=0.5)
    assert sched.get_last_lr()[0] == pytest.approx(0.5)
    # TRL's warmup: < 1 is a share of the steps (rounded up), else warmup_ratio; HF's warmup starts at 0
    for kw, warmup in ((dict(warmup_steps=0.25), 3), (dict(warmup_steps=2), 2), (dict(warmup_ratio=0.1), 1)):
        opt = build_adamw(_model().parameters(), lr=1.0)
        hf = build_hf_scheduler(opt, "linear", total_steps=10, **kw)
        seen = []
        for _ in range(warmup + 1):
            seen.append(hf.get_last_lr()[0])
            opt.step()
            hf.step()
        assert seen == pytest.approx([s / warmup for s in range(warmup)] + [1.0]), kw


def test_autocast_ctx():
    x = torch.randn(4, 4)
    with autocast_ctx(torch.device("cpu"), bf16=True):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_ctx(torch.device("cpu"), bf16=False, fp16=True):
        assert (x @ x).dtype == torch.float16
    with autocast_ctx(torch.device("cpu"), bf16=False):
        assert (x @ x).dtype == torch.float32
