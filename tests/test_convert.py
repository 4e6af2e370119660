"""`unipool convert`: a per-layer MoE into a shared pool, with the source's logits at step 0."""

import json

import pytest
import torch
from helpers import HF_TINY, TEXTS, make_run, tiny_hf

from unipool import cli
from unipool.interop.convert import (
    ConvertError,
    convert_to_shared,
    max_logit_difference,
    merge_across_layers,
    merge_within_layers,
)
from unipool.interop.hf import import_hf
from unipool.model.model import build_model
from unipool.presets import get_preset
from unipool.run import Run
from unipool.weights import load_model

transformers = pytest.importorskip("transformers")

# 4 layers (grouped:2 needs 2 per pool); Qwen3-MoE with renormalised top-k and a head_dim of its own
FAMILIES = {"mixtral": ("mixtral", {}), "olmoe": ("olmoe", {}), "qwen3_moe": ("qwen3_moe-normtopk", dict(head_dim=32))}
LAYERS = 4


def _perturbed(cfg, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for block in model.layers:
            if hasattr(block.router, "expert_bias"):
                block.router.expert_bias.normal_(0, 0.05)
    return model


SOURCES = {
    "softmax": dict(),
    "softmax-renormalised-top2": dict(top_k=2, renormalize=True),
    "norm": dict(router="norm", switch_loss_coef=0.0),
    "sigmoid-top2": dict(router="sigmoid", top_k=2),
    "fine-grained": dict(granularity=2, top_k=1),
    # a factor computed from the router's width: the pool keeps the source's number, not its own width's
    "softmax-scaled-match-gate": dict(routed_scaling_factor="match_gate:1.024"),
}


@pytest.mark.parametrize("name", list(SOURCES))
@pytest.mark.parametrize("pools", [1, 2])
def test_exact_at_step_zero_then_the_windows_open(name, pools):
    source = _perturbed(get_preset("debug-vanilla").replace(n_layers=4, **SOURCES[name]))
    model = convert_to_shared(source, pools)
    cfg = model.config
    assert cfg.n_pools == pools and cfg.n_routed_experts == source.config.n_routed_experts * 4 // pools
    assert sum(p.numel() for p in model.experts.parameters()) == sum(p.numel() for p in source.experts.parameters())
    assert max_logit_difference(source, model, cfg.vocab_size) <= 1e-5
    model.set_router_progress(1.0)  # every router sees its whole pool: a different model from here on
    assert all(bool(b.router.candidate_mask_E.all()) for b in model.layers)
    assert max_logit_difference(source, model, cfg.vocab_size) > 1e-2


def test_window_one_keeps_the_source_routing_and_zeros_init_leaves_rows_empty():
    source = _perturbed(get_preset("debug-vanilla").replace(n_layers=4))
    kept = convert_to_shared(source, 1, window=1)
    kept.set_router_progress(1.0)
    assert max_logit_difference(source, kept, source.config.vocab_size) <= 1e-5
    zeros = convert_to_shared(source, 1, router_init="zeros")
    w = zeros.layers[1].router.gate.weight
    block = source.config.num_experts
    assert torch.equal(w[block:2 * block], source.layers[1].router.gate.weight)
    assert not w[:block].any() and not w[2 * block:].any()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_hugging_face_moe_converts_exactly(family, tmp_path):
    name, overrides = FAMILIES[family]
    hf = tiny_hf(name, num_hidden_layers=LAYERS, **overrides)
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--out", str(tmp_path / "run")]) == 0
    model, _ = load_model(tmp_path / "run")
    ids = torch.randint(0, HF_TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_converted_run_is_an_ordinary_run(tmp_path, capsys):
    src, source = make_run(tmp_path / "src", preset="debug-vanilla")
    out = tmp_path / "pool"
    assert cli.main(["convert", str(src), "--to", "pool", "--out", str(out)]) == 0
    assert "max |logit difference| to the source at step 0" in capsys.readouterr().out
    model, meta = load_model(out)
    assert model.config.moe_mode == "pool" and meta["step"] == 0
    assert max_logit_difference(source, model, source.config.vocab_size) <= 1e-5
    assert (out / "tokenizer.json").read_text() == (src / "tokenizer.json").read_text()
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(TEXTS[:20]))
    for command in (["eval", str(out)], ["routing", str(out), "--out", str(tmp_path / "routing")]):
        assert cli.main([*command, "--data", str(text), "--max-tokens", "512"]) == 0, command
    assert (tmp_path / "routing" / "routing.json").is_file()
    assert cli.main(["params", "--config", str(out / "config.json")]) == 0
    assert cli.main(["export", str(out), "--hf", str(tmp_path / "hf")]) == 0


@pytest.mark.parametrize("args, message", [
    (["--to", "layerwise"], "not implemented"),
    (["--to", "grouped:3"], "must divide"),
    (["--to", "grouped:2"], "one layer per pool"),
    (["--to", "pool", "--experts", "3"], "between the 4 experts of one layer and the 8"),
    (["--to", "pool", "--unmask-over", "0"], "not the source's model"),
    (["--to", "pool", "--window", "5"], "--window must be between 1 and the 2 layers"),
    (["--to", "ring"], "--to must be"),
    # options of the exact conversion that merging does not apply
    (["--to", "pool", "--experts", "6", "--window", "1"], "--window has no effect on merging to --experts 6"),
    (["--to", "pool", "--experts", "6", "--unmask-over", "0.2", "--router-init", "zeros"],
     "--unmask-over and --router-init have no effect on merging"),
])
def test_refusals_are_one_line(tmp_path, capsys, args, message):
    src, _ = make_run(tmp_path / "src", preset="debug-vanilla")  # 2 layers x 4 experts
    assert cli.main(["convert", str(src), *args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "out").exists()


def test_refuses_a_shared_source_and_never_overwrites(tmp_path, capsys):
    pool_run, _ = make_run(tmp_path / "pool", preset="debug")
    assert cli.main(["convert", str(pool_run), "--to", "pool", "--out", str(tmp_path / "out")]) == 2
    assert "already shares experts" in capsys.readouterr().err
    src, _ = make_run(tmp_path / "src", preset="debug-vanilla")
    assert cli.main(["convert", str(src), "--to", "pool", "--out", str(pool_run)]) == 2
    assert "unipool run" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "missing"), "--to", "pool", "--out", str(tmp_path / "o")]) == 2
    assert "no such" in capsys.readouterr().err


def test_training_from_a_converted_run_starts_where_the_source_stands(corpus, tmp_path):
    """Healing: `train.init_from` the converted run and `init_from` the source itself, same seed and data:
    the first step's loss is the same (the same function), the routers' windows then open."""
    common = ["--train.out-dir", str(tmp_path), "--train.progress", "false", "--train.precision", "fp32",
              "--data.sources", str(corpus), "--data.data-dir", str(tmp_path / "data"), "--train.sample-tokens", "0",
              "--train.eval-tokens", "256", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
              "--train.log-interval", "1"]
    assert cli.main(["train", "--preset", "debug-vanilla", "--data.tokenizer", "bpe:320", "--train.steps", "4",
                     "--train.run-name", "source", *common]) == 0
    assert cli.main(["convert", str(tmp_path / "source"), "--to", "pool", "--out", str(tmp_path / "pool")]) == 0
    for name, start in (("continued", "source"), ("healed", "pool")):
        assert cli.main(["train", "--preset", "debug-vanilla", "--train.steps", "6", "--train.run-name", name,
                         "--train.init-from", str(tmp_path / start), *common]) == 0
    first = {}
    for name in ("continued", "healed"):
        lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        first[name] = next(r["loss"] for r in lines if "loss" in r)
    assert first["healed"] == pytest.approx(first["continued"], abs=1e-5)
    healed, _ = load_model(tmp_path / "healed")
    assert healed.config.moe_mode == "pool"
    assert all(bool(b.router.candidate_mask_E.all()) for b in healed.layers)  # opened over the run


def test_init_from_a_missing_run_is_one_line(tmp_path, capsys):
    assert cli.main(["train", "--preset", "debug", "--train.init-from", str(tmp_path / "nope"),
                     "--train.out-dir", str(tmp_path), "--train.progress", "false"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.init_from") and "\n" not in err


DENSE = ["llama", "qwen3"]


def _dense_hf(family, path):
    hf = tiny_hf(family, num_hidden_layers=LAYERS)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("family", DENSE)
@pytest.mark.parametrize("target", ["layerwise", "pool", "grouped:2"])
def test_dense_model_upcycles_exactly(family, target, tmp_path):
    hf = _dense_hf(family, tmp_path / "hf")
    out = tmp_path / "moe"
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", target, "--experts", "4", "--out", str(out)]) == 0
    model, _ = load_model(out)
    cfg = model.config
    assert cfg.routed_top_k == 2 and cfg.renormalize and cfg.n_routed_experts == 4 * cfg.layers_per_pool
    ids = torch.randint(0, HF_TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, hf(ids).logits, atol=1e-5, rtol=1e-5)
        w13 = model.experts[0].w13_EFD
        assert torch.equal(w13[0], w13[3])  # every expert a copy of the FFN


def test_drop_upcycling_redraws_the_given_fraction_of_each_expert(tmp_path):
    _dense_hf("llama", tmp_path / "hf")
    out = tmp_path / "moe"
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "layerwise", "--experts", "4", "--drop-upcycling", "0.5",
                     "--out", str(out)]) == 0
    model, _ = load_model(out)
    w13, w2 = model.experts[1].w13_EFD, model.experts[1].w2_EDF
    hidden = w2.shape[2]
    from safetensors.torch import load_file

    ffn = load_file(str(tmp_path / "hf" / "model.safetensors"))
    gate = ffn["model.layers.1.mlp.gate_proj.weight"]
    for e in range(4):
        redrawn = ~(w13[e, :hidden] == gate).all(-1)
        assert int(redrawn.sum()) == round(0.5 * hidden), e
        assert not (w2[e][:, redrawn] == ffn["model.layers.1.mlp.down_proj.weight"][:, redrawn]).any()
        assert torch.equal(w2[e][:, ~redrawn], ffn["model.layers.1.mlp.down_proj.weight"][:, ~redrawn])


def test_dense_refusals(tmp_path, capsys):
    _dense_hf("llama", tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    for args, message in ((["--to", "pool"], "needs --experts"),
                          (["--to", "layerwise", "--experts", "2", "--top-k", "3"], "--top-k between 1"),
                          (["--to", "layerwise", "--experts", "2", "--drop-upcycling", "1"], "[0, 1)"),
                          (["--to", "layerwise", "--experts", "2", "--window", "2"], "--window has no effect on"),
                          (["--to", "layerwise", "--experts", "2", "--router-init", "zeros"], "--router-init has no")):
        assert cli.main(["convert", str(tmp_path / "hf"), *args, "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


@pytest.mark.parametrize("scaling", [1.0, "match_gate:1.024"])
def test_merging_across_layers_keeps_each_layer_routing_to_its_own_experts(scaling):
    source = _perturbed(get_preset("debug-vanilla").replace(n_layers=4, top_k=2, routed_scaling_factor=scaling))
    per_layer = source.config.num_experts
    for n in (15, 10):
        model = merge_across_layers(source, n)
        assert model.config.n_routed_experts == n and model.config.stored_router_masks
        masks = torch.stack([b.router.candidate_mask_E for b in model.layers])
        assert (masks.sum(1) == per_layer).all()  # each layer still has E distinct experts
        # every merged expert is the mean of the source experts routed to it
        w13 = model.experts[0].w13_EFD
        for c in range(n):
            members = [source.experts[layer].w13_EFD[e] for layer in range(4) for e in range(per_layer)
                       if masks[layer, c] and torch.equal(model.layers[layer].router.gate.weight[c],
                                                          source.layers[layer].router.gate.weight[e])]
            assert members and torch.allclose(w13[c], torch.stack(members).mean(0))
        # layer 0 sees the same input in both models: it picks the merged experts holding the source's picks
        ids = torch.randint(0, source.config.vocab_size, (2, 16))
        with torch.no_grad():
            src_routing, merged_routing = source(ids).routing[0], model(ids).routing[0]
        rows = source.layers[0].router.gate.weight
        gate = model.layers[0].router.gate.weight
        to_cluster = {e: int((gate == rows[e]).all(-1).nonzero()[0]) for e in range(per_layer)}
        mapped = src_routing.expert_ids_TK.clone().apply_(lambda e: to_cluster[e])
        assert torch.equal(mapped, merged_routing.expert_ids_TK)
        torch.testing.assert_close(merged_routing.weights_TK, src_routing.weights_TK)


def test_merging_within_layers_is_a_smaller_per_layer_moe(tmp_path):
    source = _perturbed(get_preset("debug-vanilla").replace(n_layers=4, top_k=2))
    model = merge_within_layers(source, 12)
    assert model.config.moe_mode == "layerwise" and model.config.num_experts == 3
    assert sum(p.numel() for p in model.experts.parameters()) == \
        sum(p.numel() for p in merge_across_layers(source, 12).experts.parameters())
    with pytest.raises(ConvertError, match="multiple of the 4 layers"):
        merge_within_layers(source, 10)


def test_cli_merges_and_the_merged_pool_exports_exactly(tmp_path, capsys):
    src, _ = make_run(tmp_path / "src", preset="debug-vanilla")  # 2 layers x 4 experts
    out = tmp_path / "merged"
    assert cli.main(["convert", str(src), "--to", "pool", "--experts", "6", "--out", str(out)]) == 0
    assert "(lossy)" in capsys.readouterr().out
    model, _ = load_model(out)
    assert model.config.n_routed_experts == 6
    assert cli.main(["export", str(out), "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids).logits, atol=1e-5, rtol=1e-5)
    assert cli.main(["convert", str(src), "--to", "grouped:2", "--experts", "3", "--out", str(tmp_path / "x")]) == 2
    assert "implemented for --to pool" in capsys.readouterr().err


def test_switching_losses_keeps_the_logits_and_switching_the_router_keeps_the_picks(tmp_path):
    from unipool.interop.convert import switch_routing

    source = _perturbed(get_preset("debug-vanilla").replace(n_layers=4, top_k=2, renormalize=True))
    pool = convert_to_shared(source, 1)
    with_loss = switch_routing(pool, pool_loss=0.01, switch_loss=0.0)
    assert with_loss.config.pool_loss_coef == 0.01 and with_loss.config.switch_loss_coef == 0.0
    assert max_logit_difference(source, with_loss, source.config.vocab_size) <= 1e-5
    normed = switch_routing(pool, router="norm")
    assert normed.config.router == "norm" and not normed.config.renormalize
    assert all(bool(b.router.candidate_mask_E.sum() == 4) for b in normed.layers)  # still its own block
    ids = torch.randint(0, source.config.vocab_size, (2, 16))
    with torch.no_grad():
        soft, norm = pool(ids).routing[0], normed(ids).routing[0]  # layer 0: the same input
    live = (norm.weights_TK > 0).all(-1)  # rows with a positive score for each pick
    assert live.any()
    assert torch.equal(soft.expert_ids_TK[live].sort(-1).values, norm.expert_ids_TK[live].sort(-1).values)
    assert max_logit_difference(source, normed, source.config.vocab_size) > 1e-3  # the gates changed


def _stored_dtype(run):
    return load_model(run)[1]["dtype"]


def test_convert_stores_the_source_dtype_unless_told_otherwise(tmp_path, capsys):
    hf = tiny_hf("mixtral", num_hidden_layers=LAYERS).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--out", str(tmp_path / "pool")]) == 0
    assert _stored_dtype(tmp_path / "pool") == "bfloat16"
    model, _ = load_model(tmp_path / "pool")  # the bf16 weights, only rearranged
    ids = torch.randint(0, HF_TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(ids).logits, import_hf(tmp_path / "hf").eval()(ids).logits,
                                   atol=1e-5, rtol=1e-5)
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--dtype", "float32",
                     "--out", str(tmp_path / "fp32")]) == 0
    assert _stored_dtype(tmp_path / "fp32") == "float32"

    # a unipool run: its checkpoint's dtype
    src, source = make_run(tmp_path / "src", preset="debug-vanilla")
    Run.open(src).add_weights(source, 20, dtype=torch.bfloat16)
    assert cli.main(["convert", str(src), "--to", "pool", "--out", str(tmp_path / "run-pool")]) == 0
    assert _stored_dtype(tmp_path / "run-pool") == "bfloat16"

    # a dense source
    _dense_hf("llama", tmp_path / "llama")
    hf_dense = tiny_hf("llama", num_hidden_layers=LAYERS).to(torch.bfloat16)
    hf_dense.save_pretrained(tmp_path / "llama16")
    assert cli.main(["convert", str(tmp_path / "llama16"), "--to", "layerwise", "--experts", "2",
                     "--out", str(tmp_path / "moe16")]) == 0
    assert _stored_dtype(tmp_path / "moe16") == "bfloat16"
    assert cli.main(["convert", str(tmp_path / "llama"), "--to", "layerwise", "--experts", "2",
                     "--out", str(tmp_path / "moe32")]) == 0
    assert _stored_dtype(tmp_path / "moe32") == "float32"


def test_upcycling_prints_the_router_it_writes(tmp_path, capsys):
    _dense_hf("llama", tmp_path / "hf")
    capsys.readouterr()
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--experts", "2",
                     "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "renormalised softmax router" in out and "logit difference" not in out
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--experts", "2", "--router", "norm",
                     "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "softmax" not in out and "norm router" in out, out
    assert "max |logit difference| to the upcycled model after --router norm" in out
    model, _ = load_model(tmp_path / "b")
    assert model.config.router == "norm"


def test_config_json_that_is_not_an_object_is_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("[]")
    assert cli.main(["convert", str(tmp_path / "hf"), "--to", "pool", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json holds a JSON list, not an object" in err and "\n" not in err
