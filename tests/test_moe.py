"""Grouped-GEMM dispatch against the per-expert reference loop."""

import pytest
import torch

from unipool.model.moe import ExpertPool, moe_dispatch, moe_reference


def make_case(n_tokens, n_experts, top_k, d=16, f=24, skew=False, empty=()):
    x = torch.randn(n_tokens, d, requires_grad=True)
    if skew:  # uneven loads: most tokens on expert 0
        probs = torch.tensor([8.0] + [1.0] * (n_experts - 1))
    else:
        probs = torch.ones(n_experts)
    probs[list(empty)] = 0.0
    ids = torch.multinomial(probs.expand(n_tokens, -1), top_k, replacement=False)
    w = torch.rand(n_tokens, top_k, requires_grad=True)
    w13 = (torch.randn(n_experts, 2 * f, d) / d**0.5).requires_grad_()
    w2 = (torch.randn(n_experts, d, f) / f**0.5).requires_grad_()
    return x, ids, w, w13, w2


@pytest.mark.parametrize("impl", ["auto", "grouped_mm", "loop"])
@pytest.mark.parametrize("n_tokens, n_experts, top_k, skew, empty", [
    (64, 8, 1, False, ()),
    (50, 6, 2, True, (3, 5)),  # uneven loads and empty experts
    (7, 16, 4, False, (0, 15)),  # more experts than tokens
    (1, 4, 1, False, ()),
])
def test_dispatch_matches_reference_outputs_and_gradients(impl, n_tokens, n_experts, top_k, skew, empty):
    x, ids, w, w13, w2 = make_case(n_tokens, n_experts, top_k, skew=skew, empty=empty)
    assert not set(ids.flatten().tolist()) & set(empty)
    y = moe_dispatch(x, ids, w, w13, w2, impl)
    y_ref = moe_reference(x, ids, w, w13, w2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    cot = torch.randn_like(y)  # a real cotangent (grouped_mm rejects expanded gradients)
    grads = torch.autograd.grad((y * cot).sum(), [x, w, w13, w2])
    grads_ref = torch.autograd.grad((y_ref * cot).sum(), [x, w, w13, w2])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    for e in empty:  # empty experts get exactly zero gradient
        assert grads[2][e].abs().max() == 0 and grads[3][e].abs().max() == 0


def test_dispatch_bf16_autocast_close_to_fp32():
    x, ids, w, w13, w2 = make_case(128, 8, 2, d=32, f=64)
    ref = moe_reference(x, ids, w, w13, w2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe_dispatch(x, ids, w, w13, w2)
    assert y.dtype == torch.bfloat16
    assert (y.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_expert_pool_module_uses_its_tensors():
    pool = ExpertPool(4, 16, 8)
    torch.nn.init.normal_(pool.w13_EFD)
    torch.nn.init.normal_(pool.w2_EDF)
    x = torch.randn(10, 16)
    ids = torch.randint(0, 4, (10, 1))
    w = torch.ones(10, 1)
    torch.testing.assert_close(pool(x, ids, w), moe_reference(x, ids, w, pool.w13_EFD, pool.w2_EDF))
    assert [n for n, _ in pool.named_parameters()] == ["w13_EFD", "w2_EDF"]
