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


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_zero_gate_rows_run_no_expert_and_change_no_output_or_gradient(impl, top_k):
    torch.manual_seed(0)
    x, ids, w, w13, w2 = make_case(64, 8, top_k)
    w = w.detach().clone()
    w[:36] = 0.0  # dead tokens: every picked gate is zero
    if top_k > 1:
        w[36:44, 1] = 0.0  # live tokens with one zero-gate pick
    w.requires_grad_()
    dead = (w == 0).all(-1)
    # A dead token's input is never read by an expert: NaN there would poison any GEMM that touched it.
    x_nan = x.detach().clone()
    x_nan[dead] = float("nan")
    x_nan.requires_grad_()
    y = moe_dispatch(x_nan, ids, w, w13, w2, impl)
    y_ref = moe_reference(x, ids, w, w13, w2)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    assert y[dead].abs().max() == 0
    cot = torch.randn_like(y)
    gx, gw, g13, g2 = torch.autograd.grad((y * cot).sum(), [x_nan, w, w13, w2])
    rx, rw, r13, r2 = torch.autograd.grad((y_ref * cot).sum(), [x, w, w13, w2])
    for g, r in ((gx, rx), (g13, r13), (g2, r2)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # the zero gates' own gradient is 0 (not <output, cotangent>); every other gate's is unchanged
    live = w != 0
    torch.testing.assert_close(gw[live], rw[live], rtol=1e-5, atol=1e-6)
    assert gw[~live].abs().max() == 0 and rw[~live].abs().max() > 0
    # without the skip the dead rows are computed (the NaN leaks through 0 x NaN)
    assert torch.isnan(moe_dispatch(x_nan, ids, w, w13, w2, impl, skip_dead_rows=False)).any()


@pytest.mark.parametrize("fused, checkpointing, top_k", [(False, False, 1), (True, False, 1), (True, True, 2),
                                                         (False, True, 2)])
def test_model_with_dead_rows_same_loss_and_gradients_with_and_without_the_skip(fused, checkpointing, top_k):
    from unipool.model.model import build_model
    from unipool.presets import get_preset

    cfg = get_preset("debug").replace(n_layers=3, top_k=top_k, norm_router_c="one", z_loss_coef=1e-3)

    def grads(skip: bool):
        torch.manual_seed(0)
        model = build_model(cfg)
        with torch.no_grad():  # router rows close to one shared direction: about half the tokens are dead
            for block in model.layers:
                w = block.router.gate.weight
                w.copy_(torch.randn(1, w.shape[1]) + 0.05 * torch.randn_like(w))
        model.set_execution(fused_pool_wgrad=fused, activation_checkpointing=checkpointing)
        for pool in model.experts:
            pool.skip_dead_rows = skip
        gen = torch.Generator().manual_seed(1)
        dead = []
        for _ in range(2):  # two micro-batches: the pool loss of the second uses the first's f-bar
            ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=gen)
            out = model(ids, torch.randint(0, cfg.vocab_size, (2, 24), generator=gen))
            (out.total_loss / 2).backward()
            model.update_routing_state(out)
            dead.append(torch.stack([r.dead_rows for r in out.routing]) / 48)
        return out.total_loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, dead

    loss, skipped, dead = grads(True)
    loss_ref, computed, _ = grads(False)
    assert 0.2 < torch.stack(dead).mean() < 0.8
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=1e-7)
    assert skipped.keys() == computed.keys()
    for name in computed:
        torch.testing.assert_close(skipped[name], computed[name], rtol=1e-5, atol=1e-7, msg=name)
