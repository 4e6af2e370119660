import math

import pytest
import torch

from unipool.model.router import Router, norm_router_constant, pool_loss, random_topk, switch_loss


@pytest.mark.parametrize("m, k, c", [(96, 1, 4.016), (64, 1, 3.499), (48, 1, 3.190), (128, 1, 4.448), (192, 2, 3.848)])
def test_norm_router_constant_matches_the_reference_estimator(m, k, c):
    # Values of the official estimator (numpy RandomState(42), 1e5 samples).
    assert round(norm_router_constant(m, k), 3) == c


def test_norm_router_constant_small_pool_is_finite():
    # The literal estimator is inf for E=8 (all-negative samples); ours conditions on a positive score.
    c = norm_router_constant(8, 1)
    assert math.isfinite(c) and 2.0 < c < 4.0


def test_norm_router_scores_and_gates_by_hand():
    r = Router(d_model=2, n_experts=3, top_k=2, kind="norm", norm_c=2.0)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        r.scale.fill_(1.5)
    x = torch.tensor([[3.0, 4.0], [1.0, -2.0]])
    out = r(x)
    # token 0: z = (3, 4, -7), ||z|| = sqrt(74); token 1: z = (1, -2, 1), ||z|| = sqrt(6)
    n0, n1 = math.sqrt(74), math.sqrt(6)
    expected = torch.tensor([[3 / n0, 4 / n0, 0.0], [1 / n1, 0.0, 1 / n1]]) * 1.5 * 2.0
    assert torch.allclose(out.scores_TE, expected, atol=1e-6)
    assert out.expert_ids_TK[0].tolist() == [1, 0]
    assert sorted(out.expert_ids_TK[1].tolist()) == [0, 2]
    # gates are the scores themselves (no softmax, no renormalisation)
    assert torch.allclose(out.weights_TK, expected.gather(1, out.expert_ids_TK))
    assert out.counts_E.tolist() == [2.0, 1.0, 1.0]


def test_norm_router_is_scale_invariant():
    r = Router(8, 16, 2, kind="norm")
    x = torch.randn(32, 8)
    a, b = r(x), r(x * 37.0)
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.allclose(a.weights_TK, b.weights_TK, atol=1e-5)


def test_softmax_router_gates_are_probabilities():
    r = Router(4, 5, 2, kind="softmax")
    x = torch.randn(10, 4)
    out = r(x)
    probs = torch.softmax(r.gate(x), -1)
    assert torch.allclose(out.weights_TK, probs.topk(2, -1).values, atol=1e-6)
    r.renormalize = True
    assert torch.allclose(r(x).weights_TK.sum(-1), torch.ones(10), atol=1e-6)


def test_switch_loss_by_hand():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1], [0.5, 0.25, 0.25]])
    counts = torch.tensor([3.0, 1.0, 0.0])  # top-1 picks: 0, 1, 0, 0
    # f = (3/4, 1/4, 0); P = mean columns = (0.475, 0.3875, 0.1375); E * sum f P
    expected = 3 * (0.75 * 0.475 + 0.25 * 0.3875)
    assert switch_loss(scores, counts, top_k=1).item() == pytest.approx(expected)
    r = Router(2, 3, 1, kind="softmax", switch_coef=0.01)
    x = torch.randn(6, 2)
    out = r(x)
    assert out.aux_loss.item() == pytest.approx(0.01 * switch_loss(out.scores_TE, out.counts_E, 1).item())


def test_pool_loss_by_hand_and_gradient_only_through_scores():
    s1 = torch.tensor([[0.5, 0.5], [1.0, 0.0]], requires_grad=True)  # layer 1 scores, mean (0.75, 0.25)
    s2 = torch.tensor([[0.0, 2.0], [0.2, 0.2]], requires_grad=True)  # layer 2 scores, mean (0.1, 1.1)
    load = torch.tensor([0.25, 0.75], requires_grad=True)
    loss = pool_loss([s1, s2], load)
    # Pbar = (0.425, 0.675); M * sum fbar Pbar = 2 * (0.25*0.425 + 0.75*0.675)
    assert loss.item() == pytest.approx(2 * (0.25 * 0.425 + 0.75 * 0.675))
    loss.backward()
    assert load.grad is None  # f-bar is detached
    # d/ds_l[t, i] = M * fbar_i / (L * T)
    assert torch.allclose(s1.grad, torch.tensor([[0.25, 0.75]] * 2) * 2 / 4)


def test_random_topk_is_uniform_and_distinct():
    g = torch.Generator().manual_seed(0)
    n_tokens, n_experts, k = 40_000, 10, 3
    ids = random_topk(n_tokens, n_experts, k, torch.device("cpu"), g)
    assert (ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct experts per token
    counts = torch.bincount(ids.flatten(), minlength=n_experts).double()
    expected = n_tokens * k / n_experts
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 27.9  # chi-square, 9 dof, p = 0.001
    # The test has power: a mildly biased sampler (expert 0 favoured by 6%) is rejected.
    biased = counts.clone()
    biased[0] *= 1.06
    assert ((biased - expected) ** 2 / expected).sum().item() > 27.9


def test_random_routing_switch_and_candidates():
    from unipool.analysis.probe import ProbeTarget, RandomRouting

    r = Router(8, 16, 2, kind="softmax")
    target = ProbeTarget(r, "unipool", {0: r}, n_layers=1, n_experts=16, top_k=2)
    x = torch.randn(2000, 8)
    learned = r(x).expert_ids_TK
    with RandomRouting(target, [0], "model", torch.Generator().manual_seed(1)):
        out = r(x)
    assert not torch.equal(out.expert_ids_TK, learned)
    probs = torch.softmax(r.gate(x).float(), -1)
    assert torch.allclose(out.weights_TK, probs.gather(1, out.expert_ids_TK))
    with RandomRouting(target, [0], "uniform", torch.Generator().manual_seed(1), {0: torch.tensor([3, 5, 7])}):
        out = r(x)
    assert set(out.expert_ids_TK.unique().tolist()) == {3, 5, 7}
    assert torch.all(out.weights_TK == 0.5)
    assert torch.equal(r(x).expert_ids_TK, learned)


def test_random_router_kind_draws_from_the_global_stream():
    # router="random" (a model trained with random routing) needs no generator: torch.manual_seed fixes it
    x = torch.randn(3000, 8)
    for gates in ("uniform", "model"):
        r = Router(8, 16, 2, kind="random", random_gates=gates)
        torch.manual_seed(0)
        out = r(x)
        torch.manual_seed(0)
        assert torch.equal(out.expert_ids_TK, random_topk(3000, 16, 2, torch.device("cpu")))
        assert (out.expert_ids_TK.sort(-1).values.diff(dim=-1) > 0).all()
        expected = torch.full((3000, 2), 0.5) if gates == "uniform" else \
            torch.softmax(r.gate(x).float(), -1).gather(1, out.expert_ids_TK)
        assert torch.equal(out.weights_TK, expected)
        assert not torch.equal(r(x).expert_ids_TK, out.expert_ids_TK)  # a fresh draw every call


def test_sigmoid_bias_moves_selection_not_gates():
    r = Router(4, 4, 1, kind="sigmoid", bias_rate=0.5)
    x = torch.randn(64, 4)
    before = r(x)
    r.update_bias(before.counts_E)
    assert (r.expert_bias[before.counts_E > before.counts_E.mean()] < 0).all()
    after = r(x)
    # gates are always the raw sigmoid score of the picked expert, bias or not
    assert torch.allclose(after.weights_TK, torch.sigmoid(r.gate(x)).gather(1, after.expert_ids_TK))
