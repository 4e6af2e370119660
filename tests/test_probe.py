"""Routing probe: random routing touches only the chosen layer, is uniform, and reports end to end.

Tiny randomly initialised HF models of every supported family are built offline from their config
classes; the text is Python's own documentation (pydoc_data), tokenized with a byte-level BPE.
"""

import json
from pydoc_data.topics import topics

import pytest
import torch
from scipy.stats import chi2

from unipool.analysis.probe import (
    GATES,
    ProbeConfig,
    ProbeError,
    RandomRouting,
    RoutingRecorder,
    expert_usage,
    lm_eval_results,
    markdown_table,
    parse_layers,
    run_probe,
    task_metrics,
    top_used,
    wrap_model,
    write_report,
)
from unipool.cli import main
from unipool.data.tokenizer import train_bpe
from unipool.interop.hf_moe import HF_FAMILIES
from unipool.model.model import build_model
from unipool.model.router import Router
from unipool.presets import get_preset
from unipool.weights import save_model

transformers = pytest.importorskip("transformers")

VOCAB, E, K = 512, 8, 2
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 4, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 0,
          "pad_token_id": 0, "initializer_range": 0.2}
DEEPSEEK = {"intermediate_size": 32, "moe_intermediate_size": 16, "n_routed_experts": E, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
            "v_head_dim": 8, "n_group": 2, "topk_group": 1}
FAMILIES = {
    "mixtral": {"intermediate_size": 32, "num_local_experts": E},
    "olmoe": {"intermediate_size": 32, "num_experts": E},
    "qwen2_moe": {"intermediate_size": 32, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 32,
                  "num_experts": E},
    "qwen3_moe": {"intermediate_size": 32, "moe_intermediate_size": 16, "num_experts": E, "head_dim": 8,
                  "norm_topk_prob": True},
    "deepseek_v2": {**DEEPSEEK, "q_lora_rank": None, "topk_method": "group_limited_greedy",
                    "routed_scaling_factor": 1.5},
    "deepseek_v3": {**DEEPSEEK, "q_lora_rank": 16, "norm_topk_prob": True, "routed_scaling_factor": 2.5},
}
assert set(FAMILIES) == set(HF_FAMILIES)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "pydoc.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics))[:150_000])
    return path


@pytest.fixture(scope="module")
def bpe(text_file):
    return train_bpe([text_file], VOCAB)


@pytest.fixture(scope="module")
def tokens(bpe, text_file):
    ids = torch.tensor(bpe.encode(text_file.read_text())[: 8 * 128])
    return ids.view(8, 128)  # 1024 real-text tokens


def tiny_hf(family: str):
    cfg = transformers.AutoConfig.for_model(family, **COMMON, num_experts_per_tok=K, **FAMILIES[family])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def chi_square(counts_E: torch.Tensor) -> float:
    expected = counts_E.sum() / counts_E.numel()
    return float(((counts_E - expected) ** 2 / expected).sum())


CRITICAL = chi2.ppf(0.999, E - 1)  # a uniform router exceeds this 1 time in 1000


def gate_inputs(target):
    """Capture each MoE router's input hidden states (HF)."""
    seen, handles = {}, []
    for i, router in target.routers.items():
        handles.append(router.register_forward_pre_hook(lambda m, args, i=i: seen.__setitem__(i, args[0].detach())))
    return seen, handles


def learned_ids(router, x) -> torch.Tensor:
    """The family's own top-k, by calling the router's forward without hooks."""
    return type(router).forward(router, x)[2]


def as_sets(ids_TK: torch.Tensor) -> torch.Tensor:
    return ids_TK.sort(-1).values


# ---- HF families ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_probe_changes_only_the_chosen_layer(family, tokens):
    tokens = tokens[:4]  # 512 tokens
    target = wrap_model(tiny_hf(family))
    moe = list(target.routers)
    chosen = moe[len(moe) // 2]
    with torch.no_grad(), RoutingRecorder(target) as base:
        target.model(tokens)
    seen, handles = gate_inputs(target)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), RandomRouting(target, [chosen], "uniform", gen), RoutingRecorder(target) as probed:
        target.model(tokens)
    for h in handles:
        h.remove()
    for i in moe:
        used = as_sets(probed.ids(i))
        if i < chosen:  # upstream: bit-identical choices
            assert torch.equal(used, as_sets(base.ids(i)))
        elif i == chosen:  # randomised: almost no token keeps its learned set (chance 1/28 per token)
            agree = (used == as_sets(base.ids(i))).all(-1).float().mean()
            assert agree < 0.2
            assert (used[:, 1:] != used[:, :-1]).all()  # k distinct experts per token
        else:  # downstream: new inputs, but still the learned router's own top-k on them
            with torch.no_grad():
                assert torch.equal(used, as_sets(learned_ids(target.routers[i], seen[i])))
    # removing the hooks restores the learned routing exactly
    with torch.no_grad(), RoutingRecorder(target) as again:
        target.model(tokens)
    assert all(torch.equal(again.ids(i), base.ids(i)) for i in moe)


@pytest.mark.parametrize("family", sorted(HF_FAMILIES))
def test_hf_random_choices_are_uniform_and_gated_like_the_family(family, tokens):
    tokens = tokens[:4]  # 512 tokens, 1024 picks
    target = wrap_model(tiny_hf(family))
    chosen = target.deep_layers[-1]
    router = target.routers[chosen]
    scale = getattr(router, "routed_scaling_factor", 1.0)
    with torch.no_grad(), RoutingRecorder(target) as learned:
        target.model(tokens)
    seen, handles = gate_inputs(target)
    with torch.no_grad(), RandomRouting(target, [chosen], "uniform", torch.Generator().manual_seed(1)), \
            RoutingRecorder(target) as rand:
        target.model(tokens)
    # uniform over experts; the test can fail: the learned router on the same tokens is far from uniform
    assert chi_square(learned.counts(chosen)) > CRITICAL
    assert chi_square(rand.counts(chosen)) < CRITICAL
    weights = rand.weights(chosen).float()
    torch.testing.assert_close(weights, torch.full_like(weights, scale / K))

    with torch.no_grad(), RandomRouting(target, [chosen], "model", torch.Generator().manual_seed(2)), \
            RoutingRecorder(target) as rec:
        target.model(tokens[:2])
    for h in handles:
        h.remove()
    ids, weights = rec.ids(chosen), rec.weights(chosen).float()
    # slow reference: the family's gate formula, written out by hand
    logits = seen[chosen].reshape(-1, 32).float() @ router.weight.float().T
    scores = logits.sigmoid() if family == "deepseek_v3" else logits.softmax(-1)
    ref = scores.gather(1, ids)
    if family in ("mixtral", "qwen3_moe", "deepseek_v3"):  # these configs renormalise the top-k
        ref = ref / ref.sum(-1, keepdim=True)
    torch.testing.assert_close(weights, ref * scale, rtol=1e-4, atol=1e-6)


# ---- unipool models --------------------------------------------------------------------------------

def tiny_unipool(**changes):
    torch.manual_seed(0)
    return build_model(get_preset("debug").replace(**changes)).eval()


@pytest.mark.parametrize("chosen", [0, 1])
def test_unipool_probe_changes_only_the_chosen_layer(chosen, tokens):
    model = tiny_unipool()
    target = wrap_model(model)
    with torch.no_grad():
        base = model(tokens).routing
        with RandomRouting(target, [chosen], "uniform", torch.Generator().manual_seed(0)):
            probed = model(tokens).routing
    for i, (b, p) in enumerate(zip(base, probed)):
        if i < chosen:
            assert torch.equal(p.expert_ids_TK, b.expert_ids_TK)
        elif i == chosen:
            assert (p.expert_ids_TK == b.expert_ids_TK).float().mean() < 0.3  # 1/8 by chance
            torch.testing.assert_close(p.weights_TK, torch.full_like(p.weights_TK, 1.0))  # 1/k, k=1
        else:
            assert torch.equal(p.expert_ids_TK, p.scores_TE.topk(1, -1).indices)
    assert all(r.random_gates is None for r in target.routers.values())  # restored on exit


def test_unipool_random_choices_are_uniform(tokens):
    model = tiny_unipool()
    target = wrap_model(model)
    chosen = target.deep_layers[0]
    assert target.deep_layers == [1]
    with torch.no_grad(), RoutingRecorder(target) as learned:
        model(tokens)
    with torch.no_grad(), RandomRouting(target, [chosen], "uniform", torch.Generator().manual_seed(3)), \
            RoutingRecorder(target) as rand:
        for _ in range(2):
            model(tokens)
    assert chi_square(learned.counts(chosen)) > CRITICAL
    assert chi_square(rand.counts(chosen)) < CRITICAL
    # "model" gates: the NormRouter's own scores at the random picks
    with torch.no_grad(), RandomRouting(target, [chosen], "model", torch.Generator().manual_seed(4)):
        r = model(tokens[:2]).routing[chosen]
    assert torch.equal(r.weights_TK, r.scores_TE.gather(1, r.expert_ids_TK))
    assert (r.weights_TK == 0).any() and (r.weights_TK > 0).any()  # ReLU'd scores: some picks get no gate


def test_unipool_uniform_gates_carry_the_routers_scaling_factor(tokens):
    """`uniform` gates are scale / k for our models too: a softmax router scaled by routed_scaling_factor keeps
    its output scale under the probe, as DeepSeek's factor does for the HF families; `model` gates are scaled
    by the router itself."""
    model = tiny_unipool(router="softmax", top_k=2, routed_scaling_factor=3.0, pool_loss_coef=0.0)
    target = wrap_model(model)
    with torch.no_grad(), RandomRouting(target, [1], "uniform", torch.Generator().manual_seed(0)):
        r = model(tokens[:2]).routing[1]
    assert torch.equal(r.weights_TK, torch.full_like(r.weights_TK, 1.5))
    with torch.no_grad(), RandomRouting(target, [1], "model", torch.Generator().manual_seed(0)):
        r = model(tokens[:2]).routing[1]
    torch.testing.assert_close(r.weights_TK, 3.0 * r.scores_TE.gather(1, r.expert_ids_TK), rtol=0, atol=0)


def test_unipool_random_dagger_draws_from_most_used(tokens):
    model = tiny_unipool(num_experts=16, top_k=2)
    target = wrap_model(model)
    batches = [(tokens, tokens)]
    usage = expert_usage(target, batches, "cpu")
    with torch.no_grad():
        ref = model(tokens).routing
    for i in target.routers:  # usage = learned routing counts
        torch.testing.assert_close(usage[i], ref[i].counts_E)
    cand = top_used(usage, 8)
    for i in target.routers:  # the 8 largest counts
        assert cand[i].numel() == 8 and usage[i][cand[i]].min() >= usage[i].sort().values[-8]
    with torch.no_grad(), RandomRouting(target, [1], "uniform", torch.Generator().manual_seed(0), cand), \
            RoutingRecorder(target) as rec:
        model(tokens)
    picked = rec.ids(1).unique()
    assert set(picked.tolist()) == set(cand[1].tolist())  # 2048 draws cover all 8 candidates, nothing else


def test_expert_usage_counts_only_picks_with_a_nonzero_gate(tokens):
    # Layer 1's router rows share one direction, so many tokens get every NormRouter score zero: their pick
    # is a tie among zeros that adds nothing, and must not make its expert a Random-dagger candidate.
    model = tiny_unipool()
    gate = model.layers[1].router.gate.weight
    with torch.no_grad():
        gate.copy_(torch.randn(gate.shape[1])[None] + 0.3 * torch.randn_like(gate))
        r = model(tokens).routing[1]
    live = r.weights_TK != 0
    assert 0.1 < 1 - live.float().mean() < 0.9  # both kinds of rows
    usage = expert_usage(wrap_model(model), [(tokens, tokens)], "cpu")
    torch.testing.assert_close(usage[1], torch.bincount(r.expert_ids_TK[live], minlength=8).float())


def test_top_used_breaks_ties_by_index():
    assert top_used({0: torch.tensor([0.0, 0, 0, 0, 0, 5, 0, 0])}, 3)[0].tolist() == [0, 1, 5]
    chosen = top_used({0: torch.ones(8), 1: torch.tensor([0.0, 2, 1, 2])}, 2)
    assert {i: c.tolist() for i, c in chosen.items()} == {0: [0, 1], 1: [1, 3]}


def hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("kind", ["unipool", "qwen3_moe"])
def test_leaving_random_routing_restores_the_model_bit_for_bit(kind, tokens):
    model = tiny_unipool(num_experts=16, top_k=2) if kind == "unipool" else tiny_hf(kind)
    target = wrap_model(model)
    state = {i: dict(vars(r)) for i, r in target.routers.items()}
    with torch.no_grad():
        before = model(tokens[:2]).logits
        for gates in GATES:
            with RandomRouting(target, target.routers, gates, torch.Generator().manual_seed(0),
                               {i: torch.arange(4) for i in target.routers}):
                assert not torch.equal(model(tokens[:2]).logits, before)
        after = model(tokens[:2]).logits
    assert torch.equal(after, before)
    assert hooks_left(model) == 0
    for i, r in target.routers.items():  # not one attribute of a router was added, dropped or rebound
        assert vars(r).keys() == state[i].keys() and all(vars(r)[k] is v for k, v in state[i].items())
    # a configuration that cannot run fails before any hook is registered
    with pytest.raises(ProbeError, match="fewer than top_k"), RandomRouting(target, [1], "uniform",
                                                                          candidates={1: torch.tensor([0])}):
        pass
    assert hooks_left(model) == 0


def test_router_has_no_probe_state():
    for name in ("set_random_routing", "generator", "random_candidates"):
        assert not hasattr(Router, name)
    for kind in ("softmax", "norm", "sigmoid"):
        r = Router(8, 16, 2, kind)
        assert not hasattr(r, "generator") and not hasattr(r, "random_candidates") and r.random_gates is None


def hand_scores(router, h_TD):
    logits_TE = router.gate(h_TD).float()
    if router.kind == "softmax":
        return logits_TE.softmax(-1)
    if router.kind == "sigmoid":
        return logits_TE.sigmoid()
    z_TE = logits_TE / (logits_TE.norm(dim=-1, keepdim=True) + router.norm_eps)  # NormRouter
    return z_TE.relu() * router.scale * router.norm_c


def reference_forward(model, input_ids, layers, gates, generator, candidates):
    """The decoder written out by hand, with random routing in `layers`: k distinct experts per token,
    the top-k of uniform noise over the (candidate) experts, drawn from `generator` layer by layer."""
    cfg = model.config
    b, s = input_ids.shape
    cos, sin = model.rope_cos[:s], model.rope_sin[:s]
    x = model.tok_embeddings(input_ids)
    routing = []
    for i, block in enumerate(model.layers):
        x = x + block.attention(block.attention_norm(x), cos, sin)
        h_TD = block.ffn_norm(x).reshape(b * s, -1)
        r = block.router
        learned = r.forward(h_TD)  # forward(), not __call__: no hooks
        ids_TK, weights_TK = learned.expert_ids_TK, learned.weights_TK
        if i in layers:
            pool_C = candidates.get(i, torch.arange(r.n_experts))
            ids_TK = pool_C[torch.rand(b * s, pool_C.numel(), generator=generator).topk(r.top_k, -1).indices]
            if gates == "uniform":
                weights_TK = torch.full(ids_TK.shape, 1 / r.top_k)
            else:
                weights_TK = hand_scores(r, h_TD).gather(1, ids_TK)
                if r.renormalize and r.kind in ("softmax", "sigmoid"):
                    weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True)
        routing.append((ids_TK, weights_TK, learned))
        x = x + model.experts[cfg.pool_of_layer(i)](h_TD, ids_TK, weights_TK).view(b, s, -1)
    return model.output(model.norm(x))[..., : cfg.vocab_size], routing


@pytest.mark.parametrize("router, gates, layers, restrict", [
    ({}, "model", [1], False),  # NormRouter, top-1
    ({"router": "softmax", "renormalize": True}, "model", [0, 1], True),
    ({"router": "softmax"}, "model", [0, 1], False),
    ({"router": "sigmoid", "renormalize": True}, "model", [1], True),
    ({"router": "softmax", "renormalize": True}, "uniform", [0, 1], False),
    ({"router": "sigmoid", "renormalize": True}, "uniform", [0], True),
])
def test_unipool_hook_matches_a_hand_written_reference(router, gates, layers, restrict, tokens):
    model = tiny_unipool(**({"num_experts": 16, "top_k": 2} if router else {}), switch_loss_coef=1e-2, **router)
    target = wrap_model(model)
    candidates = {i: torch.tensor([1, 4, 5, 9, 12]) % target.n_experts for i in layers} if restrict else {}
    with torch.no_grad():
        with RandomRouting(target, layers, gates, torch.Generator().manual_seed(7), candidates):
            out = model(tokens[:2])
        ref_logits, ref_routing = reference_forward(model, tokens[:2], layers, gates,
                                                    torch.Generator().manual_seed(7), candidates)
    assert torch.equal(out.logits, ref_logits)
    for i, (r, (ids_TK, weights_TK, learned)) in enumerate(zip(out.routing, ref_routing)):
        assert torch.equal(r.expert_ids_TK, ids_TK) and torch.equal(r.weights_TK, weights_TK)
        assert torch.equal(r.counts_E, torch.bincount(ids_TK.flatten(), minlength=target.n_experts).float())
        assert torch.equal(r.scores_TE, learned.scores_TE) and torch.equal(r.aux_loss, learned.aux_loss)
        assert r.dead_rows == (weights_TK == 0).all(-1).sum()  # the telemetry describes the picks made
        if i in layers and restrict:
            assert set(ids_TK.unique().tolist()) <= set(candidates[i].tolist())


@pytest.mark.parametrize("kind", ["unipool", "olmoe"])
def test_recorder_sees_the_random_picks_whichever_context_comes_first(kind, tokens):
    model = tiny_unipool(num_experts=16, top_k=2) if kind == "unipool" else tiny_hf(kind)
    target = wrap_model(model)
    chosen = target.deep_layers[-1]
    recorded = []
    for recorder_first in (False, True):
        rand = RandomRouting(target, [chosen], "model", torch.Generator().manual_seed(5))
        rec = RoutingRecorder(target)
        with torch.no_grad(), (rec if recorder_first else rand), (rand if recorder_first else rec):
            model(tokens[:2])
        recorded.append((rec.ids(chosen), rec.weights(chosen)))
    with torch.no_grad(), RoutingRecorder(target) as learned:
        model(tokens[:2])
    assert torch.equal(recorded[0][0], recorded[1][0]) and torch.equal(recorded[0][1], recorded[1][1])
    assert not torch.equal(recorded[0][0], learned.ids(chosen))


# ---- end to end ------------------------------------------------------------------------------------

def save_hf(tmp_path, family, bpe):
    from transformers import PreTrainedTokenizerFast

    model_dir = tmp_path / family
    tiny_hf(family).save_pretrained(model_dir)
    bpe.save(tmp_path / "bpe")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "bpe" / "tokenizer.json"), eos_token="<|endoftext|>")
    tok.save_pretrained(model_dir)
    return model_dir


def test_cli_end_to_end_on_hf_model(tmp_path, bpe, text_file, capsys):
    model_dir = save_hf(tmp_path, "qwen2_moe", bpe)
    out = tmp_path / "out"
    rc = main(["probe", str(model_dir), "--data", str(text_file), "--max-tokens", "512", "--seq-len", "64",
               "--seeds", "0,1", "--out", str(out), "--device", "cpu", "--gates", "model"])
    assert rc == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["family"] == "qwen2_moe" and report["deep_layers"] == [2, 3] and report["tokens"] == 512
    assert any("shared experts" in n for n in report["notes"])
    labels = [r["layer"] for r in report["rows"] if r["metric"] == "loss"]
    assert labels == ["2", "3", "all deep"]
    for r in report["rows"]:
        assert r["baseline"] == report["baseline"][r["metric"]]
        assert len(r["per_seed"]) == 2 and r["per_seed"][0] != r["per_seed"][1]  # seeds differ
        assert r["randomized_std"] > 0
        assert r["delta"] == pytest.approx(sum(r["per_seed"]) / 2 - r["baseline"])
    md = (out / "probe.md").read_text()
    assert "| all deep | loss |" in md and "| 2 | ppl |" in md
    assert (out / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 3 | loss |" in capsys.readouterr().out


def test_cli_end_to_end_on_unipool_checkpoint(tmp_path, bpe, text_file):
    model = tiny_unipool(num_experts=16, top_k=2)
    ckpt = tmp_path / "ckpt"
    save_model(model, ckpt, {"step": 0})
    bpe.save(ckpt)
    out = tmp_path / "out"
    rc = main(["probe", str(ckpt), "--data", str(text_file), "--max-tokens", "256", "--seeds", "0,1",
               "--restrict-top", "8", "--layers", "0,1", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "probe.json").read_text())
    assert report["family"] == "unipool" and report["restrict_top"] == 8
    assert sorted(report["candidates"]) == ["0", "1"] and all(len(c) == 8 for c in report["candidates"].values())
    assert [r["layer"] for r in report["rows"] if r["metric"] == "loss"] == ["0", "1", "all chosen"]
    assert (out / "probe.png").is_file()


TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tiny_task(tmp_path):
    """A local 6-question multiple-choice lm-eval task, tiny_mc, in tmp_path/tasks."""
    topics_list = sorted(topics)
    with open(tmp_path / "mc.jsonl", "w") as f:
        for i in range(6):
            a, b, c = topics_list[3 * i: 3 * i + 3]
            f.write(json.dumps({"question": f"See also the section on {a} and", "choices": [b, c, a],
                                "answer": 2}) + "\n")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK_YAML.format(data=tmp_path / "mc.jsonl"))
    return tmp_path / "tasks"


@pytest.mark.parametrize("kind", ["hf", "unipool"])
def test_cli_zero_shot_tasks(kind, tmp_path, bpe, text_file):
    """--tasks: accuracy rows from a local lm-eval task; the baseline equals a direct lm-eval run."""
    pytest.importorskip("lm_eval")
    from unipool.analysis.probe import load_target

    write_tiny_task(tmp_path)
    if kind == "hf":
        model_dir = save_hf(tmp_path, "qwen3_moe", bpe)
    else:
        model_dir = tmp_path / "ckpt"
        save_model(tiny_unipool(), model_dir, {"step": 0})
        bpe.save(model_dir)
    out = tmp_path / "out"
    rc = main(["probe", str(model_dir), "--data", str(text_file), "--max-tokens", "128", "--seq-len", "64",
               "--seeds", "0", "--layers", "3" if kind == "hf" else "1", "--tasks", "tiny_mc",
               "--include-path", str(tmp_path / "tasks"), "--limit", "6", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "probe.json").read_text())
    rows = {r["metric"]: r for r in report["rows"]}
    assert set(rows) == {"loss", "ppl", "tiny_mc/acc", "avg/acc"}  # avg/acc for one task too
    assert rows["avg/acc"]["per_seed"] == rows["tiny_mc/acc"]["per_seed"]
    direct = lm_eval_results(load_target(model_dir), ["tiny_mc"], str(tmp_path / "tasks"), 6)  # no hooks
    assert rows["tiny_mc/acc"]["baseline"] == pytest.approx(100 * direct["results"]["tiny_mc"]["acc,none"])
    assert 0 <= rows["tiny_mc/acc"]["randomized_mean"] <= 100
    assert rows["tiny_mc/acc"]["randomized_std"] is None and "— (n=1)" in (out / "probe.md").read_text()


def test_cli_tasks_fail_before_the_baseline_pass(tmp_path, bpe, text_file, monkeypatch, capsys):
    """A misspelled task or a checkpoint without its tokenizer is refused before any loss is computed."""
    pytest.importorskip("lm_eval")
    import lm_eval.tasks

    import unipool.analysis.probe as probe
    from unipool.data.prepare import prepare

    def no_baseline(*args, **kwargs):
        raise AssertionError("the baseline pass ran")

    class LocalTasks(lm_eval.tasks.TaskManager):  # skips indexing lm-eval's built-in tasks (seconds)
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "include_defaults": False})

    monkeypatch.setattr(probe, "loss_metrics", no_baseline)
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", LocalTasks)
    tasks = write_tiny_task(tmp_path)
    ckpt = tmp_path / "ckpt"
    save_model(tiny_unipool(), ckpt, {"step": 0})
    data = prepare([text_file], tmp_path / "data", bpe, val_fraction=0.25)  # needs no tokenizer to read
    common = ["--data", str(data), "--max-tokens", "128", "--seeds", "0", "--layers", "1",
              "--include-path", str(tasks), "--out", str(tmp_path / "out"), "--device", "cpu"]
    assert main(["probe", str(ckpt), "--tasks", "tiny_mc,tiny_mcq", *common]) == 2
    err = capsys.readouterr().err
    assert "unknown lm_eval task(s): tiny_mcq" in err and err.count("\n") == 1
    assert main(["probe", str(ckpt), "--tasks", "tiny_mc", *common]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer.json" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
    # the Python API: an in-memory unipool model with neither a run nor a tokenizer
    with pytest.raises(ProbeError, match="needs a tokenizer"):
        lm_eval_results(wrap_model(tiny_unipool()), ["tiny_mc"], str(tasks))


def test_cli_errors_are_one_line(tmp_path, bpe, text_file, capsys):
    model_dir = save_hf(tmp_path, "deepseek_v3", bpe)
    assert main(["probe", str(model_dir), "--layers", "0", "--data", str(text_file), "--device", "cpu"]) == 2
    assert "not MoE layers" in capsys.readouterr().err  # layer 0 is dense (first_k_dense_replace=1)
    assert main(["probe", str(model_dir), "--device", "cpu"]) == 2
    assert "need --data" in capsys.readouterr().err
    assert main(["probe", str(model_dir), "--data", str(text_file), "--seq-len", "0", "--device", "cpu"]) == 2
    assert "--seq-len must be between 1" in capsys.readouterr().err  # 0 is refused, not read as "default"
    assert main(["probe", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_cli_rejects_hf_checkpoints_it_cannot_probe(tmp_path, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["probe", str(tmp_path / "llama"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'llama' is not supported by the probe" in err and all(f in err for f in HF_FAMILIES)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{model_type")
    assert main(["probe", str(tmp_path / "broken"), "--device", "cpu"]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_parse_layers_and_task_metrics():
    target = wrap_model(tiny_hf("deepseek_v2"))
    assert target.deep_layers == [2, 3]  # 4 layers: l >= 2; layer 0 is dense
    assert any("shared experts" in n for n in target.notes()) and any("group limit" in n for n in target.notes())
    assert not any("group limit" in n for n in wrap_model(tiny_hf("qwen3_moe")).notes())
    assert parse_layers("deep", target) == ([2, 3], "all deep")
    assert parse_layers("all", target) == ([1, 2, 3], "all")
    assert parse_layers("1,3", target) == ([1, 3], "all chosen")
    assert parse_layers("1-3", target) == ([1, 2, 3], "all chosen")
    results = {"results": {"arc_easy": {"acc,none": 0.5, "acc_norm,none": 0.55, "alias": "arc_easy"},
                           "piqa": {"acc,none": 0.7, "acc_stderr,none": 0.01}}}
    assert task_metrics(results) == pytest.approx(
        {"arc_easy/acc": 50.0, "arc_easy/acc_norm": 55.0, "piqa/acc": 70.0, "avg/acc": 60.0})
    assert task_metrics({"results": {"piqa": {"acc,none": 0.7}}}) == pytest.approx({"piqa/acc": 70.0, "avg/acc": 70.0})


def test_task_metrics_average_leaf_tasks_not_group_aggregates():
    # lm-eval 0.4 with --tasks mmlu,arc_easy: "results" holds the groups' aggregates next to their subtasks,
    # and "groups" / "group_subtasks" name the groups (older versions list leaf tasks with no subtasks too).
    leaves = {"mmlu_abstract_algebra": 0.2, "mmlu_anatomy": 0.4, "mmlu_philosophy": 0.9, "arc_easy": 0.5}
    groups = {"mmlu": 0.55, "mmlu_stem": 0.3, "mmlu_humanities": 0.9}
    results = {
        "results": {t: {"acc,none": v, "alias": t} for t, v in {**leaves, **groups}.items()},
        "groups": {g: {"acc,none": v, "alias": g} for g, v in groups.items()},
        "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_humanities"],
                           "mmlu_stem": ["mmlu_abstract_algebra", "mmlu_anatomy"],
                           "mmlu_humanities": ["mmlu_philosophy"], "arc_easy": []},
    }
    expected = {f"{t}/acc": 100 * v for t, v in leaves.items()}
    assert task_metrics(results) == pytest.approx({**expected, "avg/acc": 50.0})  # (20 + 40 + 90 + 50) / 4


def test_one_seed_reports_no_std(tokens, tmp_path):
    report = run_probe(wrap_model(tiny_unipool()), [(tokens[:2], tokens[:2])], ProbeConfig([1], seeds=[0]),
                       device="cpu", log=lambda s: None)
    assert all(r["randomized_std"] is None for r in report["rows"])
    assert "0.0000 |" not in markdown_table(report).split("|---|")[-1] and "— (n=1)" in markdown_table(report)
    paths = write_report(report, tmp_path)  # JSON null, and a plot without error bars
    assert json.loads(paths["json"].read_text())["rows"][0]["randomized_std"] is None
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
