"""Launch plans: one frozen plan per call, readable, with overrides passed in (no kernel runs here)."""

import dataclasses

import pytest
import torch

from s2attn.kernels.plan import LaunchPlan, Tiles, make_plan, plan_overrides


def _backward(dtype=torch.bfloat16, dim=128, block=64, keys=65536, table=False, **kw) -> LaunchPlan:
    q = torch.zeros(1, 128, 2, dim, dtype=dtype)
    return make_plan("backward", q, q, q, do=q, lse=torch.zeros(1, 2, 128), block=block, max_q=keys, max_k=keys,
                     varlen=False, table=table, **kw)


def test_plan_says_which_kernels_run_and_why():
    with plan_overrides(hopper=True):
        plan = _backward()
    assert [x.kernel for x in plan.launches] == ["_attn_bwd_dq_ws", "_attn_bwd_dkdv_long_ws", "_attn_bwd_dkdv"]
    text = repr(plan)
    assert text.splitlines()[0].startswith("LaunchPlan(backward, rule, block 64, bfloat16, head dim 128")
    assert "_attn_bwd_dq_ws: 128x64 tiles, 4 warps, 2 stages, TMA  (warp-specialised)" in text
    with plan_overrides(hopper=False):
        plan = _backward(dtype=torch.float32, table=True)
    assert [x.kernel for x in plan.launches] == ["_attn_bwd_dq", "_attn_bwd_dkdv"]
    assert plan.dkdv.atomic and "atomic adds" in repr(plan) and "fp32" in repr(plan.dq)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.chunk = 1


def test_overrides_nest_and_end():
    seen = []
    with plan_overrides(hopper=True, observe=seen.append):
        with plan_overrides(tiles={"dkdv": Tiles(64, 64, 4, 1)}, warp_specialised={"dq": False}, dkdv_splits=2):
            inner = _backward()
        outer = _backward()
    after = _backward()
    assert seen == [inner, outer]
    assert inner.dkdv.tiles == Tiles(64, 64, 4, 1) and inner.dq.kernel == "_attn_bwd_dq"
    assert outer.dq.kernel == "_attn_bwd_dq_ws" and outer.dkdv.tiles != inner.dkdv.tiles
    assert after.dkdv_long.kernel == "_attn_bwd_dkdv_long"  # CPU tensors: not an sm_90 GPU again


def _forward(dtype=torch.bfloat16, dim=128, block=64, table=False, **kw) -> LaunchPlan:
    q = torch.zeros(1, 128, 2, dim, dtype=dtype)
    return make_plan("forward", q, q, q, block=block, max_q=128, max_k=128, varlen=False, table=table, **kw)


def test_gluon_forward_only_when_asked_for():
    """The Gluon forward runs only under plan_overrides(warp_specialised={"fwd": True}), on an sm_90 GPU, where the
    Gluon kernels apply; the plan says why the Triton forward runs otherwise."""
    with plan_overrides(hopper=True):
        assert "off unless plan_overrides(warp_specialised={'fwd': True})" in repr(_forward().fwd)
        with plan_overrides(warp_specialised={"fwd": True}):
            for block in (16, 32, 64, 128, 256):
                assert _forward(block=block).fwd.kernel == "_attn_fwd_ws"
            assert repr(_forward(dim=64).fwd) == ("_attn_fwd_ws: 128x128 tiles, 4 warps, 2 stages, TMA, ping-pong  "
                                                  "(warp-specialised)")
            with plan_overrides(ws_fwd_tiles=Tiles(128, 64, 4, 3), ws_fwd_pingpong=False):
                assert repr(_forward().fwd) == "_attn_fwd_ws: 128x64 tiles, 4 warps, 3 stages, TMA  (warp-specialised)"
            for case, why in ((dict(dtype=torch.float32), "not 16-bit"), (dict(dim=96), "head dim 96"),
                              (dict(table=True), "mask tables"), (dict(remap=True), "remap")):
                plan = _forward(**case).fwd
                assert plan.kernel == "_attn_fwd" and f"Triton: {why}" in plan.why, case
    with plan_overrides(warp_specialised={"fwd": True}):
        assert "Triton: not an sm_90 GPU" in repr(_forward().fwd)
