"""Routing statistics on hand-made assignments with known answers, then `unipool routing` end to end."""

import json
import math

import numpy as np
import pytest
import torch
from helpers import TEXTS, make_run

from unipool.analysis.routing import RoutingTrace, collect_routing, routing_stats, score_entropy_T
from unipool.cli import main
from unipool.model.model import build_model
from unipool.presets import PRESETS


def trace(ids_LT, n_experts, pool_of_layer, mode="pool"):
    ids = np.asarray(ids_LT)
    if ids.ndim == 2:
        ids = ids[:, :, None]
    return RoutingTrace(ids, np.zeros(ids.shape[0]), n_experts, pool_of_layer, mode)


def test_shared_pool_two_layers_known_answers():
    # Layer 0 routes only to experts {0, 1}, layer 1 only to {1, 2}; expert 3 of the pool is never used.
    s = routing_stats(trace([[0, 1, 0, 1], [1, 2, 2, 1]], 4, [0, 0]))
    assert s["usage_LE"] == [[0.5, 0.5, 0.0, 0.0], [0.0, 0.5, 0.5, 0.0]]
    assert s["aggregate_usage"] == [1.0, 2.0, 1.0, 0.0]  # share of the pool's 8 slots x 4 experts
    assert s["dead_experts"] == [3] and s["nearly_dead_experts"] == [3]
    assert s["layers_per_expert"] == [1, 2, 1, 0]
    assert s["layers_of_expert"] == {0: [0], 1: [0, 1], 2: [1], 3: []}
    assert s["reuse_histogram"] == [1, 2, 1]  # one expert in 0 layers, two in 1 layer, one in 2 layers
    assert s["per_layer"]["experts_used"] == [2, 2]
    assert s["per_layer"]["load_entropy"] == pytest.approx([math.log(2)] * 2)
    assert s["per_layer"]["load_entropy_norm"] == pytest.approx([0.5, 0.5])  # log 2 / log 4
    # tokens pick (0,1), (1,2), (0,2), (1,1): 2, 2, 2, 1 distinct experts
    u = s["unique_experts_per_token"]
    assert u["mean"] == 1.75 and u["fraction_of_layers"] == 0.875 and (u["min"], u["max"]) == (1, 2)
    assert u["histogram"] == [0, 1, 3]
    np.testing.assert_allclose(s["layer_overlap_jaccard"], [[1, 1 / 3], [1 / 3, 1]])  # {1} / {0, 1, 2}


def test_layerwise_experts_are_never_shared():
    # Same picks, but each layer has its own 4 experts: global ids 0-3 (layer 0) and 4-7 (layer 1).
    s = routing_stats(trace([[0, 1, 0, 1], [1, 2, 2, 1]], 4, [0, 1], "layerwise"))
    assert s["n_pools"] == 2
    assert s["unique_experts_per_token"]["mean"] == 2  # vanilla: always L * k
    assert s["dead_experts"] == [2, 3, 4, 7]
    assert s["aggregate_usage"] == [2.0, 2.0, 0.0, 0.0, 0.0, 2.0, 2.0, 0.0]
    assert s["layer_overlap_jaccard"] == [[1.0, 0.0], [0.0, 1.0]]
    assert s["reuse_histogram"] == [4, 4, 0]


def test_zero_gate_picks_are_not_uses():
    # -1 marks a pick whose gate was 0 (NormRouter row all zero): counted nowhere, not even in U(x).
    s = routing_stats(trace([[0, -1, 0, -1], [1, 1, -1, -1]], 4, [0, 0]))
    assert s["usage_LE"] == [[0.5, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0]]  # rows sum to 1 - zero share
    assert s["dead_experts"] == [2, 3]
    assert s["layers_per_expert"] == [1, 1, 0, 0]
    # tokens: {0, 1}, {1}, {0}, {} -> 2, 1, 1, 0 distinct experts
    u = s["unique_experts_per_token"]
    assert u["mean"] == 1.0 and (u["min"], u["max"]) == (0, 2) and u["histogram"] == [1, 2, 1]
    # top-2 with one zero-gate slot: the other slot still counts
    ids = np.array([[[3, -1], [-1, -1]], [[3, 2], [0, -1]]])
    s = routing_stats(trace(ids, 4, [0, 0]))
    assert s["usage_LE"] == [[0.0, 0.0, 0.0, 0.25], [0.25, 0.0, 0.25, 0.25]]
    assert s["unique_experts_per_token"]["histogram"] == [0, 1, 1, 0, 0]  # {3, 2} -> 2, {0} -> 1


def test_load_entropy_is_over_live_picks():
    # E=4, top-1: 4 live picks, one per expert (a perfectly even load), and 4 zero-gate picks. The load
    # entropy is that of the live picks' distribution, log 4; usage_LE keeps its share of all slots.
    s = routing_stats(trace([[0, 1, 2, 3, -1, -1, -1, -1], [-1] * 8], 4, [0, 0]))
    assert s["usage_LE"] == [[0.125] * 4, [0.0] * 4]
    assert s["per_layer"]["load_entropy"] == pytest.approx([math.log(4), 0.0])
    assert s["per_layer"]["load_entropy_norm"] == pytest.approx([1.0, 0.0])  # a layer with no live pick: 0


def test_grouped_top2_unique_counts():
    # 4 layers, 2 group pools of 3 experts (layers 0-1 -> pool 0, layers 2-3 -> pool 1), top-2, 2 tokens.
    ids = np.array([
        [[0, 1], [0, 2]],  # layer 0
        [[1, 0], [2, 1]],  # layer 1
        [[0, 1], [0, 1]],  # layer 2 (pool 1: global 3, 4)
        [[2, 1], [0, 1]],  # layer 3 (pool 1: global 5, 4 / 3, 4)
    ])
    s = routing_stats(trace(ids, 3, [0, 0, 1, 1], "grouped"))
    # token 0: {0,1} u {0,1} u {3,4} u {5,4} = {0,1,3,4,5}; token 1: {0,2,1} u {3,4} = {0,1,2,3,4}
    u = s["unique_experts_per_token"]
    assert u["mean"] == 5 and u["fraction_of_picks"] == 5 / 8 and u["fraction_of_layers"] == 5 / 4
    assert s["layers_per_expert"] == [2, 2, 2, 2, 2, 1]
    assert s["layer_overlap_jaccard"][0][1] == 1.0 and s["layer_overlap_jaccard"][0][2] == 0.0
    assert s["layer_overlap_jaccard"][2][3] == pytest.approx(2 / 3)  # {3,4} vs {3,4,5}


def test_thresholds():
    # Layer 0: 90 tokens to expert 0, 10 to expert 1 (0.4 x the uniform share of 1/4); layer 1: uniform.
    ids = [[0] * 90 + [1] * 10, [0, 1, 2, 3] * 25]
    s = routing_stats(trace(ids, 4, [0, 0]), use_threshold=0.5, dead_threshold=0.5)
    assert s["layers_of_expert"] == {0: [0, 1], 1: [1], 2: [1], 3: [1]}  # 10% < 0.5 x 25%
    assert s["aggregate_usage"] == pytest.approx([2.3, 0.7, 0.5, 0.5])
    assert s["nearly_dead_experts"] == [] and s["dead_experts"] == []
    s = routing_stats(trace(ids, 4, [0, 0]), use_threshold=0.0, dead_threshold=0.6)
    assert s["layers_of_expert"][1] == [0, 1]  # any token counts
    assert s["nearly_dead_experts"] == [2, 3]
    assert s["per_layer"]["balance_cv"] == pytest.approx([np.std([90, 10, 0, 0]) / 25, 0.0])


def test_score_entropy():
    scores = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.7, 0.1, 0.1, 0.1]])
    expected = [math.log(2), math.log(4), -(0.7 * math.log(0.7) + 3 * 0.1 * math.log(0.1))]
    assert score_entropy_T(scores).tolist() == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    text = root / "held_out.txt"
    text.write_text("\f".join(t.strip() for t in TEXTS[-6:]))
    return make_run(root / "pool", "debug"), make_run(root / "vanilla", "debug-vanilla"), text


def test_collect_routing_records_the_models_picks(runs):
    (_, model), _, _ = runs
    x = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():
        routing = model(x).routing
    tr = collect_routing(model, [(x[:2], None), (x[2:], None)], max_tokens=50)
    assert tr.expert_ids_LTK.shape == (2, 50, 1)
    for layer, r in enumerate(routing):
        picks_TK = r.expert_ids_TK[:50].masked_fill(r.weights_TK[:50] == 0, -1)  # gate 0: not a use
        assert tr.expert_ids_LTK[layer].tolist() == picks_TK.tolist()
        assert tr.gate_sum_L[layer] == pytest.approx(r.weights_TK[:50].sum(-1).mean().item(), rel=1e-5)
        assert tr.score_entropy_L[layer] == pytest.approx(score_entropy_T(r.scores_TE[:50]).mean().item(), rel=1e-5)


def test_cli_routing_end_to_end(runs, tmp_path, capsys):
    (pool_run, pool_model), (vanilla_run, _), text = runs
    for root, out in ((pool_run, tmp_path / "pool"), (vanilla_run, tmp_path / "vanilla")):
        assert main(["routing", str(root), "--data", str(text), "--max-tokens", "500", "--out", str(out)]) == 0
        assert "U(x)" in capsys.readouterr().out
        for name in ("utilisation_heatmap", "aggregate_usage", "reuse_histogram", "unique_experts", "layer_overlap"):
            assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert json.loads((out / "layer_overlap.json").read_text())["jaccard"][0][0] == 1.0
    pool = json.loads((tmp_path / "pool" / "routing.json").read_text())
    vanilla = json.loads((tmp_path / "vanilla" / "routing.json").read_text())
    assert pool["tokens"] == vanilla["tokens"] == 500 and pool["step"] == 10
    cfg = pool_model.config
    assert np.asarray(pool["usage_LE"]).shape == (cfg.n_layers, cfg.n_routed_experts)
    # each layer's slots: the used share plus the zero-gate share (top-1: a zero-gate token is a zero-gate slot)
    used_L = np.asarray(pool["usage_LE"]).sum(1) + np.asarray(pool["per_layer"]["zero_gate_fraction"])
    assert used_L == pytest.approx(np.ones(cfg.n_layers))
    assert 0 < pool["unique_experts_per_token"]["mean"] <= cfg.n_layers
    assert vanilla["unique_experts_per_token"]["mean"] == vanilla["n_layers"] * vanilla["top_k"]
    assert vanilla["layer_overlap_jaccard"][0][1] == 0.0
    assert len(vanilla["aggregate_usage"]) == vanilla["n_pools"] * vanilla["experts_per_pool"]
    assert all(0 <= h <= math.log(cfg.n_routed_experts) + 1e-9 for h in pool["per_layer"]["score_entropy"])

    # default output directory: beside the checkpoint
    assert main(["routing", str(pool_run), "--data", str(text), "--max-tokens", "64"]) == 0
    assert (pool_run / "checkpoints" / "step_000010" / "routing" / "routing.json").is_file()
    capsys.readouterr()
    assert main(["routing", str(pool_run), "--data", str(text), "--dead-threshold", "-1"]) == 2
    assert "dead-threshold" in capsys.readouterr().err


def test_zero_gate_fraction_counts_tokens_with_every_normrouter_score_zero():
    # All router rows equal: every logit of a token has the same sign, so the NormRouter row is all
    # zero exactly for the tokens whose (shared) logit is negative; count those from the router's input.
    cfg = PRESETS["debug"].model
    model = build_model(cfg)
    torch.manual_seed(0)
    negative_L, hooks = [], []
    for block in model.layers:
        with torch.no_grad():
            block.router.gate.weight.copy_(torch.randn(1, cfg.d_model).expand_as(block.router.gate.weight))
        hooks.append(block.router.gate.register_forward_hook(
            lambda mod, inp, out: negative_L.append((out[:, 0] < 0).double().mean().item())))
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    trace = collect_routing(model, [(x, None)])
    for h in hooks:
        h.remove()
    assert trace.zero_gate_L.tolist() == pytest.approx(negative_L)
    assert all(0 < z < 1 for z in negative_L)  # the check has both kinds of tokens
    # top-1: a token with no nonzero gate is exactly a token whose pick is recorded as -1
    assert (trace.expert_ids_LTK == -1).mean(axis=(1, 2)).tolist() == pytest.approx(negative_L)
    stats = routing_stats(trace)
    assert stats["per_layer"]["zero_gate_fraction"] == pytest.approx(negative_L)
