"""Router options beyond the paper (norm_router_c, balance scores, dead picks, sigma's parametrisation),
the sigmoid router's official cadence, fine-grained presets and the training loop's router telemetry."""

import json
import math

import pytest
import torch

from unipool import cli
from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import build_model
from unipool.model.router import (
    Router,
    balance_probs,
    mean_picked_gate_sum,
    mean_picked_softmax_sum,
    norm_router_c_value,
    pool_loss,
    routed_scaling_value,
    switch_loss,
)
from unipool.presets import get_preset
from unipool.train.telemetry import RouterScaleError, check_router_scales, router_telemetry
from unipool.weights import load_model

# ---- norm_router_c ---------------------------------------------------------------------------------------

def test_mean_picked_gate_sum_by_hand():
    # E = 2: u uniform on the circle. Top-1: quadrant I gives max(cos, sin) (mean 2 sqrt2 / pi), II and IV
    # one positive entry (mean 2 / pi), III zero: (2 sqrt2 + 4) / (4 pi). Top-2 sums both: 2 / pi.
    assert mean_picked_gate_sum(2, 1) == pytest.approx((2 * math.sqrt(2) + 4) / (4 * math.pi), abs=3e-3)
    assert mean_picked_gate_sum(2, 2) == pytest.approx(2 / math.pi, abs=3e-3)
    assert norm_router_c_value("match_gate:0.19", 2, 1) == pytest.approx(0.19 / mean_picked_gate_sum(2, 1))
    assert norm_router_c_value("one", 8, 1) == 1.0 and norm_router_c_value(2.5, 8, 1) == 2.5


@pytest.mark.parametrize("init_std", [0.02, 1.0])
def test_match_gate_sets_the_mean_picked_gate_at_init_whatever_the_std(init_std):
    # A freshly initialised NormRouter (sigma = 1): the mean picked gate over many routers and inputs is g.
    torch.manual_seed(0)
    gates = []
    for _ in range(200):
        r = Router(64, 8, 1, kind="norm", norm_c="match_gate:0.19")
        torch.nn.init.normal_(r.gate.weight, std=init_std)
        gates.append(r(torch.randn(100, 64) * 3.0).weights_TK.sum(-1).mean())
    assert torch.stack(gates).mean().item() == pytest.approx(0.19, rel=0.03)
    # the paper's estimator at E = 8 gives a much larger gate
    assert norm_router_c_value("monte_carlo", 8, 1) * mean_picked_gate_sum(8, 1) > 0.4


@pytest.mark.parametrize("init_std, d_model", [(0.02, 64), (0.01, 768)])
def test_softmax_match_gate_sets_the_mean_picked_gate_of_a_fresh_model(init_std, d_model):
    """routed_scaling_factor "match_gate:g": a freshly built per-layer softmax model's mean picked gate is g on
    any input (the router's input is an RMSNorm output, so its logits are N(0, init_std^2 d) whatever the
    tokens). Two widths and stds: the factor differs (6.6 at the study's cpu2 shape), the gate does not."""
    cfg = get_preset("debug-vanilla").replace(d_model=d_model, n_heads=4, n_kv_heads=2, ffn_hidden=64,
                                              num_experts=8, init_std=init_std, n_layers=2,
                                              routed_scaling_factor="match_gate:1.024")
    torch.manual_seed(0)
    gates = []
    for _ in range(8):
        model = build_model(cfg).eval()
        with torch.no_grad():
            out = model(torch.randint(0, cfg.vocab_size, (4, 64)))
        gates += [r.weights_TK.sum(-1).mean() for r in out.routing]
    assert torch.stack(gates).mean().item() == pytest.approx(1.024, rel=0.02)
    # by hand, E = 2 top-1: the larger of two probabilities, sigmoid(|x1 - x2|), x1 - x2 ~ N(0, 2 s^2)
    s = 1.0
    z = torch.randn(400_000, generator=torch.Generator().manual_seed(0)) * math.sqrt(2) * s
    assert mean_picked_softmax_sum(2, 1, s) == pytest.approx(torch.sigmoid(z.abs()).mean().item(), abs=2e-3)
    assert mean_picked_softmax_sum(8, 2, 0.3, renormalize=True) == 1.0
    assert routed_scaling_value("match_gate:1.024", 8, 1, 0.16) == pytest.approx(1.024 / 0.1557, rel=5e-3)
    assert routed_scaling_value(2.5, 8, 1, 0.16) == 2.5


def test_norm_router_c_validation():
    cfg = get_preset("debug")
    assert cfg.replace(norm_router_c="match_gate:0.19").norm_router_c == "match_gate:0.19"
    for bad in ("match_gate:", "match_gate:-1", "match_gate:x", "two", 0, -1.0):
        with pytest.raises(ConfigError, match="norm_router_c"):
            cfg.replace(norm_router_c=bad)


# ---- balance scores and dead picks ----------------------------------------------------------------------

def test_normalized_balance_probs_by_hand():
    scores = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 0.0, 2.0]])
    assert balance_probs(scores).tolist() == pytest.approx([1.0, 1.0, 2 / 3])
    # rows (0.25, 0.75, 0) and (0.5, 0, 0.5); the all-zero row is left out of the mean
    assert balance_probs(scores, normalized=True).tolist() == pytest.approx([0.375, 0.375, 0.25])
    counts = torch.tensor([1.0, 1.0, 1.0])  # one pick each, T k = 3
    assert switch_loss(scores, counts, 1, normalized=True).item() == pytest.approx(3 * (0.375 + 0.375 + 0.25) / 3)
    assert pool_loss([scores, scores * 2], counts / 3, normalized=True).item() == pytest.approx(1.0)


def test_normalized_scores_give_no_gradient_towards_an_all_zero_row():
    # The raw loss falls when every score of a row shrinks (its degenerate minimum); the normalised one
    # is unchanged by a row's scale.
    scores = torch.tensor([[0.3, 0.5, 0.2], [0.6, 0.1, 0.3]])
    load = torch.tensor([0.5, 0.3, 0.2])
    for normalized, moves in ((False, True), (True, False)):
        scale = torch.ones(2, 1, requires_grad=True)
        pool_loss([scores * scale], load, normalized).backward()
        assert (scale.grad.abs().max() > 1e-3) == moves
        if moves:
            assert (scale.grad > 0).all()  # shrinking the rows lowers the raw loss


def test_dead_picks_left_out_of_the_load_by_hand():
    r = Router(2, 3, 1, kind="norm", norm_c=1.0, count_dead_picks=False, switch_coef=1.0)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[3.0, 1.0], [-1.0, -1.0], [1.0, 2.0], [-2.0, -5.0]])  # rows 1 and 3 all <= 0: dead
    out = r(x)
    assert out.weights_TK[[1, 3]].abs().sum() == 0 and out.dead_rows.item() == 2.0
    assert out.counts_E.tolist() == [1.0, 1.0, 0.0]  # the two tie picks are not load
    # f over live picks (1/2, 1/2, 0); P raw = column means of the scores
    p_E = out.scores_TE.mean(0)
    assert out.aux_loss.item() == pytest.approx(3 * (0.5 * p_E[0] + 0.5 * p_E[1]).item(), rel=1e-6)
    paper = Router(2, 3, 1, kind="norm", norm_c=1.0)
    paper.load_state_dict(r.state_dict())
    assert paper(x).counts_E.sum().item() == 4.0  # the paper counts every pick


def test_model_pool_loss_with_the_options():
    cfg = get_preset("debug").replace(norm_router_c="one", balance_scores="normalized", count_dead_picks=False,
                                      pool_loss_stats="current")
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model(torch.randint(0, cfg.vocab_size, (2, 16)))
    f_E = sum(r.counts_E / r.counts_E.sum() for r in out.routing) / cfg.n_layers
    expected = pool_loss([r.scores_TE for r in out.routing], f_E, normalized=True)
    torch.testing.assert_close(out.aux_loss, cfg.pool_loss_coef * expected)


# ---- sigma -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("param", ["softplus", "exp"])
def test_positive_sigma_starts_at_one_and_stays_positive(param):
    cfg = get_preset("debug").replace(norm_router_scale=param, norm_router_c="one")
    model = build_model(cfg)
    linear = build_model(cfg.replace(norm_router_scale="linear"))
    linear.load_state_dict({k: v for k, v in model.state_dict().items() if "scale_raw" not in k}, strict=False)
    router = model.layers[0].router
    assert not hasattr(router, "scale")  # the raw parameter has another name
    assert router.sigma().item() == pytest.approx(1.0)
    x = torch.randn(5, cfg.d_model)
    torch.testing.assert_close(router(x).scores_TE, linear.layers[0].router(x).scores_TE)
    opt = torch.optim.SGD([router.scale_raw], lr=10.0)
    for _ in range(5):  # a loss that pushes sigma down hard, as the balance loss does
        opt.zero_grad()
        router(x).scores_TE.sum().backward()
        opt.step()
    assert 0 < router.sigma().item() < 0.5
    with pytest.raises(ConfigError, match="norm_router_scale"):
        cfg.replace(norm_router_scale="abs")


def test_training_refuses_negative_sigma_with_one_line():
    model = build_model(get_preset("debug").replace(norm_router_c="one"))
    with torch.no_grad():
        model.layers[1].router.scale.fill_(-0.25)
    record = {"step": 40, **router_telemetry(model, torch.tensor([3.0, 0.0]), 12)}
    assert record["router_scale"] == [1.0, -0.25]
    assert record["dead_rows"] == [0.25, 0.0]
    with pytest.raises(RouterScaleError) as err:
        check_router_scales(record)
    assert str(err.value).startswith("step 40: NormRouter sigma crossed zero in layer 1 (sigma -0.25)")
    assert "\n" not in str(err.value)
    check_router_scales({"step": 1, "router_scale": [1.0, 0.5]})
    check_router_scales({"step": 1})  # softmax: nothing to check


# ---- sigmoid router ---------------------------------------------------------------------------------------

def test_sigmoid_gates_renormalised_for_k_above_one():
    r = Router(3, 4, 2, kind="sigmoid")
    x = torch.randn(6, 3)
    out = r(x)
    picked = torch.sigmoid(r.gate(x)).gather(1, out.expert_ids_TK)
    torch.testing.assert_close(out.weights_TK, picked / (picked.sum(-1, keepdim=True) + 1e-20))
    r1 = Router(3, 4, 1, kind="sigmoid")
    assert torch.equal(r1(x).weights_TK, torch.sigmoid(r1.gate(x)).gather(1, r1(x).expert_ids_TK))


def test_routed_scaling_factor_scales_the_gates_not_the_losses():
    """softmax/sigmoid gates times the factor, after renormalisation; the picks, scores and balance loss are
    those of the unscaled router (DeepSeek-V3's routed_scaling_factor)."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    for kind, renorm in (("softmax", False), ("softmax", True), ("sigmoid", False)):
        plain = Router(8, 6, 2, kind=kind, renormalize=renorm, switch_coef=0.01)
        scaled = Router(8, 6, 2, kind=kind, renormalize=renorm, switch_coef=0.01, scaling=8.0)
        scaled.load_state_dict(plain.state_dict())
        a, b = plain(x), scaled(x)
        assert torch.equal(a.expert_ids_TK, b.expert_ids_TK) and torch.equal(a.scores_TE, b.scores_TE)
        torch.testing.assert_close(b.weights_TK, 8.0 * a.weights_TK, rtol=0, atol=0)
        assert torch.equal(a.aux_loss, b.aux_loss)
        if renorm:  # renormalised first, then scaled: the gates sum to the factor
            torch.testing.assert_close(b.weights_TK.sum(-1), torch.full((16,), 8.0))
    cfg = get_preset("debug-vanilla").replace(router="softmax", routed_scaling_factor=4.0)
    assert build_model(cfg).layers[0].router.scaling == 4.0
    for bad, msg in ((dict(routed_scaling_factor=0.0), "positive"),
                     (dict(routed_scaling_factor="match_gate:-1"), "positive"),
                     (dict(routed_scaling_factor="big"), "positive"),
                     (dict(router="norm", routed_scaling_factor=2.0), "norm_router_c"),
                     (dict(router="sigmoid", routed_scaling_factor="match_gate:1.0"), "a number")):
        with pytest.raises(ConfigError, match="routed_scaling_factor") as e:
            get_preset("debug-vanilla").replace(**bad)
        assert msg in str(e.value)


def run_train(tmp_path, name, *extra):
    from helpers import TEXTS

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\f".join(t.strip() for t in TEXTS[:30]))
    args = ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:300",
            "--data.data-dir", str(tmp_path / "data"), "--train.out-dir", str(tmp_path), "--train.run-name", name,
            "--train.progress", "false", "--train.log-interval", "1", "--train.eval-tokens", "256",
            "--train.sample-tokens", "0", "--set", "train.batch_size=4", "--set", "train.seq_len=32", *extra]
    assert cli.main(args) == 0
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_sigmoid_bias_moves_once_per_step_from_all_micro_batches(tmp_path):
    rate = 0.25
    records = run_train(tmp_path, "sigmoid", "--train.steps", "1", "--train.grad-accum", "3",
                        "--train.routing-interval", "1", "--set", "model.router=sigmoid",
                        "--set", f"model.aux_free_bias_rate={rate}", "--set", "model.pool_loss_coef=0")
    load_LE = torch.tensor(records[0]["routing"]["load_LE"])  # the step's 3 micro-batches together
    model, _ = load_model(tmp_path / "sigmoid")
    n_experts = load_LE.shape[1]
    for layer, load_E in enumerate(load_LE):
        # one update: +-rate by the sign of (mean - count); per micro-batch it would reach 3 x rate
        expected = rate * torch.sign(1 / n_experts - load_E)
        torch.testing.assert_close(model.layers[layer].router.expert_bias, expected, atol=1e-7, rtol=0)
    assert "router_scale" not in records[0] and records[0]["dead_rows"] == [0.0, 0.0]


def test_metrics_record_dead_rows_and_sigma_at_every_log(tmp_path):
    records = [r for r in run_train(tmp_path, "norm", "--train.steps", "3", "--train.grad-accum", "2")
               if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert len(r["dead_rows"]) == 2 and all(0.0 <= v <= 1.0 for v in r["dead_rows"])
        assert len(r["router_scale"]) == 2
    assert records[0]["router_scale"] != [1.0, 1.0]  # sigma trains
    model, _ = load_model(tmp_path / "norm")
    assert records[-1]["router_scale"] == pytest.approx([m.router.scale.item() for m in model.layers], abs=1e-6)


# ---- presets and config ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, experts, top_k, active", [
    ("vanilla-182m-e16k2", 16, 2, 267.4e6), ("unipool-182m-e16k2", 192, 2, 267.4e6),
    ("vanilla-182m-e32k4", 32, 4, 437.3e6), ("unipool-182m-e32k4", 384, 4, 437.3e6),
])
def test_fine_grained_presets_use_full_width_experts(name, experts, top_k, active):
    cfg = get_preset(name)
    assert (cfg.num_experts, cfg.top_k, cfg.granularity, cfg.ffn_hidden) == (experts, top_k, 1, 3072)
    # the paper's v2 README: about 268M and 438M active parameters
    assert build_model(cfg, "meta").param_counts()["dense_equivalent"] == pytest.approx(active, rel=1e-3)


def test_old_configs_load_with_the_paper_defaults():
    d = get_preset("debug").to_dict()
    for key in ("balance_scores", "count_dead_picks", "norm_router_scale"):
        d.pop(key)
    cfg = ModelConfig.from_dict(d)
    assert (cfg.balance_scores, cfg.count_dead_picks, cfg.norm_router_scale) == ("raw", True, "linear")
    with pytest.raises(ConfigError, match="balance_scores"):
        cfg.replace(balance_scores="softmax")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_sigmoid_bias_same_on_two_gloo_ranks_as_one_process(tmp_path):
    # Counts all-reduced over ranks: the 2-rank DDP run (no balance loss, so its steps equal one process on
    # the same global batch) ends with exactly the single process's biases.
    import os
    import subprocess
    import sys

    extra = ["--train.steps", "3", "--train.grad-accum", "2", "--train.precision", "fp32",
             "--set", "model.router=sigmoid", "--set", "model.aux_free_bias_rate=0.01", "--set", "model.pool_loss_coef=0"]
    run_train(tmp_path, "single", *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "unipool.train",
           "--preset", "debug", "--data.sources", str(tmp_path / "corpus.txt"), "--data.tokenizer", "bpe:300",
           "--data.data-dir", str(tmp_path / "data"), "--train.out-dir", str(tmp_path), "--train.run-name", "ddp",
           "--train.progress", "false", "--train.log-interval", "1", "--train.eval-tokens", "256",
           "--train.sample-tokens", "0", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
           "--train.distributed", "ddp", *extra]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single, _ = load_model(tmp_path / "single")
    ddp, _ = load_model(tmp_path / "ddp")
    for a, b in zip(single.layers, ddp.layers):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)
        assert a.router.expert_bias.abs().max() <= 0.03 + 1e-7  # three steps, one move each
    assert any(a.router.expert_bias.abs().max() > 0.015 for a in single.layers)


def test_masked_routers_balance_and_penalise_only_their_candidates():
    """Aux-loss-free balancing moves the biases of the experts a router may pick, around their own mean
    load (a masked expert, never picked, would otherwise gain bias every step and take every token once
    the window opens); the z-loss sums over the candidates only (a masked NormRouter logit is 0, not -inf)."""
    r = Router(4, 8, 1, kind="sigmoid", masked=True, bias_rate=0.1)
    r.candidate_mask_E.copy_(torch.tensor([True] * 4 + [False] * 4))
    r.update_bias(torch.tensor([5.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]))  # candidates' mean 2
    assert r.expert_bias.tolist() == pytest.approx([-0.1, 0.1, 0.1, 0.1, 0.0, 0.0, 0.0, 0.0])

    norm = Router(4, 8, 1, kind="norm", norm_c=1.0, masked=True, z_coef=1.0)
    norm.candidate_mask_E.copy_(torch.tensor([True] * 4 + [False] * 4))
    x = torch.randn(5, 4)
    logits = norm.gate(x)[:, :4]
    want = torch.logsumexp(logits, dim=-1).square().mean()
    assert float(norm(x).aux_loss.detach()) == pytest.approx(float(want.detach()), rel=1e-6)


def test_a_fresh_model_with_stored_masks_opens_every_expert_and_meta_builds_compute_nothing():
    cfg = get_preset("debug").replace(stored_router_masks=True)
    for _ in range(3):  # to_empty leaves whatever memory held: every build must say "all open"
        model = build_model(cfg)
        assert all(bool(block.router.candidate_mask_E.all()) for block in model.layers)
    from unipool.model.model import rope_tables

    cos, sin = rope_tables(64, 2**24, 10000.0, device="meta")  # instant: 2^24 positions, no table computed
    assert cos.device.type == "meta" and tuple(sin.shape) == (2**24, 64)


@pytest.mark.parametrize("changes, field", [(dict(max_seq_len=2**24 + 1), "max_seq_len"),
                                            (dict(num_experts=2**16, granularity=2), "num_experts")])
def test_sizes_beyond_any_model_are_refused_in_one_line(changes, field):
    with pytest.raises(ConfigError, match=f"model.{field}: must"):
        get_preset("debug").replace(**changes)


def test_params_refuses_a_config_that_is_no_object(tmp_path, capsys):
    for name, raw in (("a.json", b"[]"), ("b.json", b"\xff\xfe{")):
        (tmp_path / name).write_bytes(raw)
        assert cli.main(["params", "--config", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err


def test_a_single_sigmoid_gate_is_its_score_even_with_renormalize():
    r = Router(4, 8, 1, kind="sigmoid", renormalize=True)
    x = torch.randn(6, 4)
    out = r(x)
    scores = torch.sigmoid(r.gate(x).float())
    assert torch.allclose(out.weights_TK, scores.gather(1, out.expert_ids_TK)) and bool((out.weights_TK < 1).all())
