"""The sharing family's options (docs/design.md, "The sharing family"): each design's defining property
against a hand-written reference, and each through training (resume, DDP and FSDP2 on gloo), the fused
pool gradient, export and import, and the study's budget claims."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from unipool import cli
from unipool.data.dataset import WindowSampler
from unipool.interop.hf import export_hf, import_hf
from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import build_model, window_ranks
from unipool.model.moe import moe_reference
from unipool.model.params import param_report
from unipool.model.router import mean_picked_gate_sum, norm_router_constant, switch_loss
from unipool.presets import get_preset
from unipool.weights import load_model

REPO = Path(__file__).resolve().parents[1]


def family_config(**kw) -> ModelConfig:
    norm = {"norm_router_c": "one"} if kw.get("router", "norm") == "norm" else {}  # a NormRouter's field only
    return get_preset("debug").replace(n_layers=4, **norm, **kw)


def block_inputs(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x = torch.randn(2, 8, cfg.d_model)
    return model, x, model.rope_cos[:8], model.rope_sin[:8]


def swiglu(x, w13, w2):
    gate, up = (x @ w13.T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w2.T


def reference_block(block, pool, x, cos, sin, experts_shift=None):
    """The block as the formulas say: attention, then routed experts (slow loop) on h (+ the depth
    embedding), plus the private expert on h."""
    x = x + block.attention(block.attention_norm(x), cos, sin)
    h = block.ffn_norm(x).reshape(-1, x.shape[-1])
    routed = block.router(h)
    experts_in = h if experts_shift is None else h + experts_shift
    y = moe_reference(experts_in, routed.expert_ids_TK, routed.weights_TK, pool.w13_EFD, pool.w2_EDF)
    if block.private_expert is not None:
        y = y + swiglu(h, block.private_expert.w13.weight, block.private_expert.w2.weight)
    return x + y.view_as(x), routed


# ---- defining properties ------------------------------------------------------------------------

def test_private_expert_is_added_with_weight_one_and_always_on():
    cfg = family_config(router="softmax", private_hidden=32, pool_loss_coef=0.0, switch_loss_coef=0.01)
    model, x, cos, sin = block_inputs(cfg)
    block, pool = model.layers[1], model.experts[0]
    with torch.no_grad():
        got, _ = block(x, pool, cos, sin)
        want, _ = reference_block(block, pool, x, cos, sin)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        # Always on: with a NormRouter whose every score is 0, the routed experts add nothing and the
        # private expert is the whole FFN output.
    cfg = family_config(private_hidden=32)
    model, x, cos, sin = block_inputs(cfg)
    block, pool = model.layers[0], model.experts[0]
    with torch.no_grad():
        block.router.gate.weight.zero_()
        got, routed = block(x, pool, cos, sin)
        after_attn = x + block.attention(block.attention_norm(x), cos, sin)
        h = block.ffn_norm(after_attn)
        private = swiglu(h, block.private_expert.w13.weight, block.private_expert.w2.weight)
    assert bool((routed.weights_TK == 0).all())
    assert private.abs().max() > 0
    torch.testing.assert_close(got, after_attn + private, rtol=1e-5, atol=1e-6)
    assert model.param_counts()["private_experts"] == cfg.n_layers * 3 * cfg.d_model * 32


def test_depth_embedding_moves_the_experts_input_not_the_router():
    cfg = family_config(depth_embedding="normal", top_k=2)
    model, x, cos, sin = block_inputs(cfg)
    block, pool = model.layers[2], model.experts[0]
    with torch.no_grad():
        got, routed = block(x, pool, cos, sin)
        want, _ = reference_block(block, pool, x, cos, sin, experts_shift=block.depth_embedding)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        block.depth_embedding.mul_(10)  # the router does not see it: same picks, same gates
        moved, routed_moved = block(x, pool, cos, sin)
    assert torch.equal(routed.expert_ids_TK, routed_moved.expert_ids_TK)
    assert torch.equal(routed.weights_TK, routed_moved.weights_TK)
    assert (moved - got).abs().max() > 1e-4
    # "zeros" starts as the model without it (the same draws for every other weight)
    torch.manual_seed(3)
    plain = build_model(family_config()).eval()
    torch.manual_seed(3)
    zeros = build_model(family_config(depth_embedding="zeros")).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, zeros(ids).logits)


def test_window_ranks_are_the_nearest_layers_blocks():
    for mode, kw in (("pool", {}), ("grouped", {"n_groups": 2})):
        cfg = get_preset("debug").replace(moe_mode=mode, n_layers=8, num_experts=16, router_window=3, **kw)
        ranks, per_pool, block = window_ranks(cfg), cfg.layers_per_pool, cfg.experts_per_block
        for layer in range(cfg.n_layers):
            own = layer % per_pool
            for r in range(1, per_pool + 1):
                nearest = sorted(range(per_pool), key=lambda j: (abs(j - own), j))[:r]
                want = {e for j in nearest for e in range(j * block, (j + 1) * block)}
                assert set(torch.where(ranks[layer] < r * block)[0].tolist()) == want, (mode, layer, r)


def test_window_router_picks_only_candidates_and_renormalises_over_them():
    cfg = family_config(router="softmax", top_k=2, router_window=2, router_window_warmup=0.5,
                        switch_loss_coef=0.01, pool_loss_coef=0.0)
    model, _, _, _ = block_inputs(cfg)
    h = torch.randn(64, cfg.d_model)
    block_size = cfg.experts_per_block
    counts = []
    previous = None
    for progress in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9):
        model.set_router_progress(progress)
        for layer, block in enumerate(model.layers):
            mask = block.router.candidate_mask_E
            with torch.no_grad():
                out = block.router(h)
            assert bool(mask[out.expert_ids_TK].all())  # no masked expert is ever picked
            logits = block.router.gate(h)
            want = torch.softmax(logits[:, mask], dim=-1)  # the softmax over the candidates only
            torch.testing.assert_close(out.scores_TE[:, mask], want)
            assert bool((out.scores_TE[:, ~mask] == 0).all())
            if layer == 1:
                counts.append(int(mask.sum()))
                assert previous is None or bool((mask | ~previous).all())  # windows only grow
                previous = mask.clone()
    assert counts[0] == block_size and counts[-1] == 2 * block_size == counts[-2]
    assert counts == sorted(counts)
    with pytest.raises(ConfigError, match="router_window"):
        get_preset("debug-vanilla").replace(router_window=2)
    with pytest.raises(ConfigError, match="top_k"):
        family_config(num_experts=8, top_k=3, router_window=2)  # a block of 2 cannot hold 3 picks


def test_switch_loss_over_candidates_divides_by_the_window_not_the_pool():
    """switch_loss_width: the pool's E (default, as the studies ran) against the C candidates (ours), by hand:
    alpha * W * sum_i f_i P_i with W = E or C; the picks and scores are the same either way."""
    cfg = family_config(router="softmax", top_k=1, router_window=2, router_window_warmup=0.5,
                        switch_loss_coef=0.01, pool_loss_coef=0.0)
    pool_width, _, _, _ = block_inputs(cfg)
    candidates, _, _, _ = block_inputs(cfg.replace(switch_loss_width="candidates"))
    candidates.load_state_dict(pool_width.state_dict())
    h = torch.randn(64, cfg.d_model)
    seen = set()
    for progress in (0.0, 0.25, 0.5):
        pool_width.set_router_progress(progress)
        candidates.set_router_progress(progress)
        for block_e, block_c in zip(pool_width.layers, candidates.layers):
            with torch.no_grad():
                out_e, out_c = block_e.router(h), block_c.router(h)
            assert torch.equal(out_e.expert_ids_TK, out_c.expert_ids_TK)
            mask = block_c.router.candidate_mask_E
            n_experts, n_candidates = mask.numel(), int(mask.sum())
            seen.add(n_candidates)
            f = torch.bincount(out_c.expert_ids_TK.flatten(), minlength=n_experts).float() / h.shape[0]
            sum_fp = (f * out_c.scores_TE.mean(0)).sum()
            torch.testing.assert_close(out_c.aux_loss, 0.01 * n_candidates * sum_fp)
            torch.testing.assert_close(out_e.aux_loss, 0.01 * n_experts * sum_fp)
    assert len(seen) > 1  # the window grew while the loss was checked
    # an even load over C candidates gives the loss 1 (times alpha), whatever the pool's width
    scores = torch.zeros(8, 16)
    scores[:, :4] = 0.25
    counts = torch.tensor([2.0] * 4 + [0.0] * 12)
    assert float(switch_loss(scores, counts, 1, width=torch.tensor(4))) == 1.0
    assert float(switch_loss(scores, counts, 1)) == 4.0
    with pytest.raises(ConfigError, match="switch_loss_width"):
        family_config(router="softmax", switch_loss_width="candidates")  # no window: every expert is one
    with pytest.raises(ConfigError, match="switch_loss_width"):
        family_config(router="softmax", router_window=2, switch_loss_width="window")


def test_window_norm_router_uses_the_window_width_and_never_picks_outside():
    cfg = get_preset("debug").replace(n_layers=4, top_k=2, router_window=2)
    model = build_model(cfg)
    router = model.layers[0].router
    assert router.norm_c == pytest.approx(norm_router_constant(cfg.router_width, cfg.routed_top_k))
    with torch.no_grad():
        router.gate.weight.neg_()  # plenty of all-zero rows: ties must not pick a masked expert
        out = router(-torch.randn(256, cfg.d_model).abs())
    assert bool(router.candidate_mask_E[out.expert_ids_TK].all())


# ---- through everything else -----------------------------------------------------------------------

FAMILY = {
    "private": dict(router="softmax", private_hidden=32, switch_loss_coef=0.01, pool_loss_coef=0.0),
    # as the study's cs-moe-k2 routes: fine-grained experts, top-2 renormalised, beside the private expert
    "private-fine": dict(router="softmax", private_hidden=32, granularity=2, renormalize=True,
                         switch_loss_coef=0.01, pool_loss_coef=0.0),
    "depth": dict(depth_embedding="normal", top_k=2),
    "window": dict(router_window=2, router_window_warmup=0.5, top_k=2),
    "tied": dict(moe_mode="grouped", n_groups=2, num_experts=4, router="softmax", z_loss_coef=1e-4,
                 switch_loss_coef=0.01, pool_loss_coef=0.0),
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_fused_pool_gradient_equals_the_plain_one(name):
    cfg = family_config(**FAMILY[name])
    grads = {}
    for fused in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg)
        model.set_router_progress(0.3)
        model.set_execution(fused_pool_wgrad=fused)
        ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
        model(ids, ids).total_loss.backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[False].keys() == grads[True].keys()
    for n in grads[False]:
        torch.testing.assert_close(grads[True][n], grads[False][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", list(FAMILY))
def test_export_then_import_restores_the_model_exactly(name, tmp_path):
    cfg = family_config(vocab_size=512, **FAMILY[name])
    torch.manual_seed(0)
    model = build_model(cfg)
    model.set_router_progress(0.3)
    export_hf(model, None, tmp_path / "hf")
    back = import_hf(tmp_path / "hf")
    assert back.config == cfg
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        assert torch.equal(back.eval()(ids).logits, model.eval()(ids).logits)


def _args(corpus, root, name, *extra):
    return ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:320",
            "--data.data-dir", str(root / "data"), "--train.out-dir", str(root), "--train.run-name", name,
            "--train.progress", "false", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--train.sample-tokens", "0", "--train.eval-tokens", "256", "--train.precision", "fp32",
            "--set", "model.n_layers=4", "--set", "model.private_hidden=32", "--set", "model.depth_embedding=normal",
            "--set", "model.router_window=2", "--set", "model.router_window_warmup=0.5", *extra]


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_interrupted_run_with_a_growing_window_resumes_exactly(corpus, tmp_path, monkeypatch):
    common = ["--train.steps", "6", "--train.log-interval", "1", "--train.eval-interval", "3",
              "--train.ckpt-interval", "100"]
    assert cli.main(_args(corpus, tmp_path, "straight", *common)) == 0
    original = WindowSampler.next_batch

    def next_batch(self):
        if self.step == 3:  # step 3 (the window half open): Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(WindowSampler, "next_batch", next_batch)
    assert cli.main(_args(corpus, tmp_path, "split", *common)) == 130
    monkeypatch.setattr(WindowSampler, "next_batch", original)
    assert cli.main(["train", "--resume", str(tmp_path / "split"), "--train.progress", "false"]) == 0
    straight, split = _metrics(tmp_path / "straight"), _metrics(tmp_path / "split")
    for key in ("loss", "aux_loss", "val_loss"):
        assert [r[key] for r in straight if key in r] == [r[key] for r in split if key in r], key
    model, _ = load_model(tmp_path / "split")
    # trained to the end: every router's window is fully open, and the checkpoint says so
    assert all(int(b.router.candidate_mask_E.sum()) == model.config.router_width for b in model.layers)


# No balancing losses: their statistics are per rank (tests/test_distributed.py says why). Two designs: the
# pool with every pool option on (private expert, depth embedding, a widening window), and experts tied over
# pairs of layers with z-loss and the shared experts' learning rate scaled (parameter groups found by name
# must survive FSDP2's sharding).
GLOO_COMMON = ["--train.steps", "3", "--train.log-interval", "1", "--set", "model.pool_loss_coef=0",
               "--set", "train.batch_size=4"]
GLOO_DESIGNS = {
    "pool-options": [],
    "tied": ["--set", "model.moe_mode=grouped", "--set", "model.n_groups=2", "--set", "model.num_experts=4",
             "--set", "model.router=softmax", "--set", "model.switch_loss_coef=0", "--set", "model.z_loss_coef=1e-4",
             "--set", "model.private_hidden=0", "--set", "model.depth_embedding=none", "--set", "model.router_window=0",
             "--set", "model.router_window_warmup=0",
             # p = 2 (lr / 4 for the tied experts): strong enough that FSDP2 losing the parameter group would move
             # the third step's loss by ~3e-4 relative, 3x the tolerance below (p = 0.5 moves it by ~1e-4)
             "--set", "train.shared_expert_lr_power=2"],
}


@pytest.fixture(scope="module")
def single_process_runs(corpus, tmp_path_factory):
    root, done = tmp_path_factory.mktemp("family-gloo"), set()

    def run(design: str) -> Path:
        if design not in done:
            assert cli.main(_args(corpus, root, design, *GLOO_COMMON, *GLOO_DESIGNS[design])) == 0
            done.add(design)
        return root
    return run


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("design, mode", [("pool-options", "ddp"), ("pool-options", "fsdp"), ("tied", "fsdp")])
def test_two_gloo_ranks_match_one_process(corpus, single_process_runs, design, mode):
    root = single_process_runs(design)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    name = f"{design}-{mode}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "unipool.train", *_args(corpus, root, name, *GLOO_COMMON, *GLOO_DESIGNS[design])[1:],
           "--train.distributed", mode]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    single, dist = _metrics(root / design), _metrics(root / name)
    for a, b in zip([r["loss"] for r in single if "loss" in r], [r["loss"] for r in dist if "loss" in r], strict=True):
        assert a == pytest.approx(b, rel=1e-4)


# ---- the study's budget claims ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["family.yaml", "family-gpu.yaml"])
def test_family_study_rows_have_the_budgets_its_comments_state(name):
    sys.path.insert(0, str(REPO / "experiments"))
    from study import variant_sections

    study = yaml.safe_load((REPO / "experiments" / name).read_text())
    base = study["base"]["model"]
    vanilla_active_ffn = base["ffn_hidden"] * base["top_k"]
    unipool = ModelConfig.from_dict({**base, "vocab_size": 4096, **study["variants"]["unipool"]})
    unipool_gate = norm_router_constant(unipool.router_width, unipool.routed_top_k) * mean_picked_gate_sum(
        unipool.router_width, unipool.routed_top_k)
    for variant, overrides in study["variants"].items():
        cfg = ModelConfig.from_dict({**base, "vocab_size": 4096, **variant_sections(overrides)["model"]})
        report = param_report(cfg)
        assert cfg.routed_top_k * cfg.expert_hidden + cfg.private_hidden == vanilla_active_ffn, variant
        want_budget = 0.5 if variant == "tie-g2" else 1.0
        assert report["expert_budget_vs_matched_vanilla"] == pytest.approx(want_budget), variant
        if variant.startswith("gate-control"):  # started at UniPool's initial mean gate: NormRouter's c or the
            gate = cfg.routed_scaling_factor if cfg.router == "softmax" else cfg.norm_router_c  # softmax's factor
            assert gate == f"match_gate:{unipool_gate:.3f}", variant


def test_the_gpu_family_file_has_the_cpu_files_rows_and_contrasts():
    """family-gpu.yaml is family.yaml at the 182M shape: the same rows, options and contrasts; only the
    expert widths (ffn_hidden, private_hidden) scale with the model."""
    cpu, gpu = (yaml.safe_load((REPO / "experiments" / n).read_text()) for n in ("family.yaml", "family-gpu.yaml"))
    assert list(gpu["variants"]) == list(cpu["variants"]) and gpu["contrasts"] == cpu["contrasts"]
    assert gpu["read_contrasts"] == cpu["read_contrasts"]
    scale = gpu["base"]["model"]["ffn_hidden"] / cpu["base"]["model"]["ffn_hidden"]
    for name, row in cpu["variants"].items():
        want = {k: (v * scale if k in ("ffn_hidden", "private_hidden") else v) for k, v in row.items()}
        assert gpu["variants"][name] == want, name


def test_the_docs_family_tables_are_the_committed_results():
    """docs/results.md's study 3 table and its cost table are rendered from the committed JSON, not typed,
    and the cost table measured every row of the study."""
    sys.path.insert(0, str(REPO / "experiments"))
    import family_table as ft

    docs = (REPO / "docs" / "results.md").read_text()
    study = REPO / "experiments" / "family.yaml"
    assert docs.split(ft.BEGIN)[1].split(ft.END)[0].strip() == ft.render(study)
    assert docs.split(ft.PAIRS_BEGIN)[1].split(ft.PAIRS_END)[0].strip() == ft.render_contrasts(study)
    cost = docs.split(ft.COST_BEGIN)[1].split(ft.COST_END)[0].strip()
    assert cost == ft.render_cost(study)
    assert "not measured" not in cost


def test_the_probe_draws_from_a_windowed_router_candidates():
    from unipool.analysis.probe import RandomRouting, wrap_model

    cfg = family_config(router_window=2, router_window_warmup=0.5, top_k=2)
    model = build_model(cfg).eval()
    model.set_router_progress(0.0)  # each router: its own block only
    ids = torch.randint(0, cfg.vocab_size, (4, 32))
    with RandomRouting(wrap_model(model), range(cfg.n_layers), generator=torch.Generator().manual_seed(0)):
        with torch.no_grad():
            routing = model(ids).routing
    for block, routed in zip(model.layers, routing):
        assert bool(block.router.candidate_mask_E[routed.expert_ids_TK].all())


def test_a_cost_row_measured_under_another_base_reads_not_measured(tmp_path):
    """A cost row records the whole run config it measured: a later change to the study's base (not only to
    the row's overrides) turns it into "not measured" instead of a stale number."""
    sys.path.insert(0, str(REPO / "experiments"))
    from family_table import COST_JSON, render_cost
    from study import run_config

    study = yaml.safe_load((REPO / "experiments" / "family.yaml").read_text())
    bench = json.loads(COST_JSON.read_text())
    study["variants"] = {v: study["variants"][v] for v in (r["variant"] for r in bench["rows"])}  # rows measured
    study["contrasts"] = {k: pair for k, pair in study["contrasts"].items() if set(pair) <= set(study["variants"])}
    for row in bench["rows"]:
        row["config"] = run_config(study, row["variant"], 0, None)
    (tmp_path / "cost.json").write_text(json.dumps(bench))
    same = tmp_path / "same" / "family.yaml"
    same.parent.mkdir()
    same.write_text(yaml.safe_dump(study, sort_keys=False))
    assert "not measured" not in render_cost(same, tmp_path / "cost.json")
    study["base"]["train"]["seq_len"] *= 2  # the study's base moved on since the measurement
    moved = tmp_path / "moved" / "family.yaml"
    moved.parent.mkdir()
    moved.write_text(yaml.safe_dump(study, sort_keys=False))
    table = render_cost(moved, tmp_path / "cost.json")
    assert table.count("| not measured |") == len(study["variants"])


def test_every_interval_quoted_about_study_3_is_a_row_of_its_contrast_table():
    """Numbers in prose match the tables: every "mean [low, high]" (or "mean, CI [low, high]") quoted in study
    3's section of docs/results.md, or after "study 3" in a row of the claims tables above it, is a row of the
    rendered contrast table; a number typed from an older report would not be."""
    docs = (REPO / "docs" / "results.md").read_text()
    section = docs[docs.index("## Study 3"):docs.index("## Model surgery")]
    claims = [line.split("tudy 3", 1)[1] for line in docs[:docs.index("## Study 3")].splitlines()
              if line.startswith("|") and "tudy 3" in line]
    table = section[section.index("<!-- family-contrasts:begin -->"):section.index("<!-- family-contrasts:end -->")]
    rows = set()
    for line in table.splitlines()[3:]:
        cells = [c.strip() for c in line.split("|")]
        if cells[4].startswith("["):
            low, high = cells[4].strip("[]").split(", ")
            rows.add((cells[3], low, high))
    quoted = re.findall(r"([−+-]\d\.\d{3})(?:,? (?:CI )?)\[([−+-]\d\.\d{3}), ([−+-]\d\.\d{3})\]",
                        "\n".join([section, *claims]))
    assert len(quoted) > 20  # the prose quotes its intervals in this form
    missing = [q for q in quoted if tuple(n.replace("−", "-") for n in q) not in rows]
    assert not missing, f"quoted in docs/results.md but not in the contrast table: {missing}"


def test_the_contrast_table_computes_paired_statistics_by_hand(tmp_path):
    """Every row − vanilla, every row − UniPool and the read_contrasts, each pair once in either order: the per-seed differences
    over the seeds both rows finished, their mean, the 95% t interval and the count below 0, checked against
    values computed here by hand."""
    sys.path.insert(0, str(REPO / "experiments"))
    import family_table

    study = {"base": {}, "seeds": [0, 1, 2], "results_dir": str(tmp_path),
             "variants": {"vanilla": {}, "unipool": {}, "x": {}},
             "read_contrasts": {"x vs unipool again": ["x", "unipool"], "unipool vs x": ["unipool", "x"]}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(study))
    results = [{"variant": "vanilla", "val_losses": {"0": 4.0, "1": 4.1, "2": 4.2}},
               {"variant": "unipool", "val_losses": {"0": 3.9, "1": 4.0, "2": 4.3}},
               {"variant": "x", "val_losses": {"0": 3.8, "1": 4.05}}]  # seed 2 not finished
    (tmp_path / "results.json").write_text(json.dumps(results))
    table = family_table.render_contrasts(tmp_path / "s.yaml").splitlines()[2:]
    # the two read contrasts are one pair in either order: listed once, in the read orientation that
    # comes first (the file's keys sorted: "unipool vs x"), in place of the automatic x − unipool
    assert [line.split(" | ")[0] for line in table] == ["| unipool − vanilla", "| x − vanilla", "| unipool − x"]
    # unipool − vanilla: -0.1, -0.1, +0.1; mean -0.0333, SE = stdev/sqrt(3) = 0.11547/1.732 = 0.06667, t(2) 4.303:
    # -0.0333 ± 0.2869 = [-0.3202, +0.2535]
    assert table[0] == ("| unipool − vanilla | 3 | -0.033 | [-0.320, +0.254] | -0.100, -0.100, +0.100 | 2 of 3 "
                        "| spans 0 |")
    # unipool − x on seeds 0-1: +0.1, -0.05; mean +0.025, SE 0.075, t(1) 12.706
    assert table[2] == "| unipool − x | 2 | +0.025 | [-0.928, +0.978] | +0.100, -0.050 | 1 of 2 | spans 0 |"
    results[2]["val_losses"] = {"0": 3.5, "1": 3.6, "2": 3.7}
    (tmp_path / "results.json").write_text(json.dumps(results))
    # x − vanilla: -0.5 each seed: SE 0, so the interval is the point and lies below 0
    assert family_table.render_contrasts(tmp_path / "s.yaml").splitlines()[3] == (
        "| x − vanilla | 3 | -0.500 | [-0.500, -0.500] | -0.500, -0.500, -0.500 | 3 of 3 | below 0 |")


def test_family_table_names_a_missing_json_and_its_command(tmp_path):
    sys.path.insert(0, str(REPO / "experiments"))
    from family_table import render_cost

    with pytest.raises(SystemExit) as e:
        render_cost(REPO / "experiments" / "family.yaml", tmp_path / "absent.json")
    assert f"missing {tmp_path / 'absent.json'}" in str(e.value) and "bench/family_cost.py" in str(e.value)


def test_a_contrast_is_listed_once_in_either_order_and_seeds_in_number_order():
    sys.path.insert(0, str(REPO / "experiments"))
    import family_table as ft
    from study import paired_deltas

    study = {"variants": {"vanilla": {}, "unipool": {}, "noaux": {}},
             "read_contrasts": {"sharing at the gate": ["unipool", "noaux"]}}
    assert ft.contrast_pairs(study) == [("unipool", "vanilla"), ("noaux", "vanilla"), ("unipool", "noaux")]
    assert list(paired_deltas({"10": 1.0, "2": 2.0, "9": 3.0}, {"2": 0.0, "9": 0.0, "10": 0.0})) == ["2", "9", "10"]
