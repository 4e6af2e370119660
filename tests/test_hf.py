"""HF bridge: exported models give our logits in transformers (shared pools stay shared), generate with a
KV cache, ship a working tokenizer; imported Mixtral / OLMoE / Qwen3-MoE models give transformers' logits."""

import json
import pydoc_data.topics
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from helpers import HF_FAMILIES, HF_TINY, hf_config, tiny_hf
from safetensors import safe_open
from safetensors.torch import save_file

from unipool import cli
from unipool.data.tokenizer import train_bpe
from unipool.interop.hf import HFError, export_hf, import_hf
from unipool.model.model import build_model
from unipool.presets import get_preset
from unipool.weights import add_weights, load_model

TEXT = [
    "The while statement is used for repeated execution as long as an expression is true.",
    "A class definition is an executable statement. The class name is bound to the class object.",
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    corpus = tmp_path_factory.mktemp("corpus") / "topics.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    return train_bpe([corpus], 512)


def _perturbed(cfg):
    """A model whose every weight matters: norms and routers moved away from their init values."""
    model = build_model(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for block in model.layers:
            if hasattr(block.router, "expert_bias"):
                block.router.expert_bias.copy_(torch.randn_like(block.router.expert_bias) * 0.05)
        model.set_router_progress(0.3)  # a router window part-way open (no-op without one)
    return model.eval()


def _load_hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True)
    return model.eval()


CONFIGS = {
    # UniPool: one shared pool, NormRouter, top-2, padded vocabulary (512 -> 576 rows)
    "pool-norm": dict(preset="debug", top_k=2, vocab_multiple=96),
    # vanilla per-layer MoE, softmax top-2 renormalised, OLMoE-style QK-norm
    "layerwise-softmax": dict(preset="debug-vanilla", top_k=2, renormalize=True, qk_norm="full"),
    # grouped sharing: 4 layers, 2 pools; fine-grained experts (g=2)
    "grouped-norm-g2": dict(preset="debug", moe_mode="grouped", n_layers=4, n_groups=2, num_experts=4, granularity=2),
    # sigmoid router with selection bias, top-2 (gates renormalised, as the official code does), per-head
    # QK-norm and an explicit head_dim != d_model / n_heads
    "pool-sigmoid-head": dict(preset="debug", router="sigmoid", top_k=2, qk_norm="head", attn_head_dim=32),
    # top-1 sigmoid with renormalize set: its gate is the score, not 1
    "pool-sigmoid-k1": dict(preset="debug", router="sigmoid", top_k=1, renormalize=True),
    # the sharing family: a private expert per layer beside the pool (CS-MoE), a depth embedding (MoRE),
    # experts tied over 2 layers with z-loss (Expert Tying), routers in a window being widened (ReXMoE)
    "pool-private": dict(preset="debug", router="softmax", top_k=2, private_hidden=32, switch_loss_coef=0.01,
                         pool_loss_coef=0.0),
    # ... routed as the study's cs-moe-k2: fine-grained experts, top-2 renormalised
    "pool-private-fine": dict(preset="debug", router="softmax", top_k=1, granularity=2, renormalize=True,
                              private_hidden=32, switch_loss_coef=0.01, pool_loss_coef=0.0),
    "pool-depth-embedding": dict(preset="debug", depth_embedding="normal", top_k=2),
    "tied-softmax-z": dict(preset="debug-vanilla", moe_mode="grouped", n_layers=4, n_groups=2, num_experts=4,
                           z_loss_coef=1e-4),
    "pool-window": dict(preset="debug", n_layers=4, router_window=2, router_window_warmup=0.5, top_k=2),
    "pool-window-softmax": dict(preset="debug", n_layers=4, router="softmax", router_window=3,
                                router_window_warmup=0.5),
    # per-layer softmax top-2, its gates scaled to a NormRouter-sized gate (routed_scaling_factor "match_gate",
    # the study's scaled control): the export carries the resolved factor
    "layerwise-softmax-scaled": dict(preset="debug-vanilla", top_k=2, routed_scaling_factor="match_gate:1.5"),
}


def _config(name, vocab_size):
    kw = dict(CONFIGS[name])
    return get_preset(kw.pop("preset")).replace(vocab_size=vocab_size, **kw)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_matches_our_logits_and_keeps_pools_shared(name, tokenizer, tmp_path):
    cfg = _config(name, tokenizer.vocab_size)
    ours = _perturbed(cfg)
    out = export_hf(ours, tokenizer, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_unipool.UnipoolForCausalLM"
    assert "import unipool" not in (out / "modeling_unipool.py").read_text()

    hf = _load_hf(out)
    ids = torch.tensor([tokenizer.encode(t)[:16] for t in TEXT])
    with torch.no_grad():
        expected, got = ours(ids).logits, hf(ids).logits
    assert got.shape == expected.shape == (2, 16, tokenizer.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # Same parameters, and each pool exists once: on disk and as one tensor whichever layer calls it.
    assert sum(p.numel() for p in hf.parameters()) == ours.param_counts()["total"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert sum(k.startswith("model.experts.") and k.endswith("gate_up_proj") for k in f.keys()) == cfg.n_pools  # noqa: SIM118
    seen = []
    for pool in hf.model.experts:
        pool.register_forward_hook(lambda mod, args, res: seen.append(mod.gate_up_proj.data_ptr()))
    with torch.no_grad():
        hf(ids)
    assert len(seen) == cfg.n_layers
    for layer, ptr in enumerate(seen):
        assert ptr == hf.model.experts[cfg.pool_of_layer(layer)].gate_up_proj.data_ptr()
    assert len(set(seen)) == cfg.n_pools


def _greedy(model, ids, n):
    """Reference greedy decoding with our model: full recompute per token."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids


def _set_kernel(hf, kernel):
    for pool in hf.model.experts:
        pool.kernel = kernel


@pytest.mark.parametrize("kernel", ["auto", "loop"])
def test_export_generate_with_and_without_cache(kernel, tokenizer, tmp_path):
    ours = _perturbed(_config("pool-norm", tokenizer.vocab_size))
    hf = _load_hf(export_hf(ours, tokenizer, tmp_path / "hf"))
    _set_kernel(hf, kernel)
    prompt = tokenizer.encode(TEXT[0])[:10]
    expected = _greedy(ours, prompt, 8)
    x = torch.tensor([prompt])
    kw = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_id)
    assert hf.generate(x, **kw)[0].tolist() == expected
    assert hf.generate(x, use_cache=False, **kw)[0].tolist() == expected

    # A left-padded batch: every row generates what it generates alone, with and without the cache.
    short = tokenizer.encode(TEXT[1])[:6]
    batch = torch.tensor([prompt, [tokenizer.eos_id] * 4 + short])
    mask = torch.tensor([[1] * 10, [0] * 4 + [1] * 6])
    for use_cache in (True, False):
        got = hf.generate(batch, attention_mask=mask, use_cache=use_cache, **kw)
        assert got[0].tolist() == expected
        assert got[1, 4:].tolist() == _greedy(ours, short, 8)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_grouped_gemm_experts_match_the_loop(name, tokenizer, tmp_path):
    # The exported experts run as grouped GEMMs where torch._grouped_mm takes the shapes; the per-expert
    # loop stays as the fallback. Both give our logits, and the config can force either.
    ours = _perturbed(_config(name, tokenizer.vocab_size))
    hf = _load_hf(export_hf(ours, tokenizer, tmp_path / "hf"))
    ids = torch.tensor([tokenizer.encode(t)[:16] for t in TEXT])
    x_TD = torch.randn(32, ours.config.d_model)
    assert all(pool._grouped_mm_fits(x_TD) for pool in hf.model.experts) == hasattr(torch, "_grouped_mm")
    logits = {}
    for kernel in ("grouped_mm", "loop"):
        _set_kernel(hf, kernel)
        with torch.no_grad():
            logits[kernel] = hf(ids).logits
    torch.testing.assert_close(logits["grouped_mm"], logits["loop"], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(logits["grouped_mm"], ours(ids).logits, atol=1e-5, rtol=1e-5)

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["expert_kernel"] == "auto"
    loop = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), trust_remote_code=True,
                                                             expert_kernel="loop")
    assert {pool.kernel for pool in loop.model.experts} == {"loop"}


def test_export_skips_dead_rows_and_still_matches(tokenizer, tmp_path):
    # Every router row points the same way (negated): a token whose normalised hidden state has a positive
    # component along it gets no positive score in any expert, so about half the (token, layer) rows are
    # dead. The exported experts skip those rows in both kernels; the logits stay ours.
    ours = _perturbed(_config("pool-norm", tokenizer.vocab_size))
    with torch.no_grad():
        for block in ours.layers:
            w_ED = block.router.gate.weight
            w_ED.copy_(-w_ED[:1].abs().expand_as(w_ED) + 0.01 * torch.randn_like(w_ED))
    ids = torch.tensor([tokenizer.encode(t)[:16] for t in TEXT])
    with torch.no_grad():
        out = ours(ids)
    dead = torch.stack([(r.weights_TK == 0).all(-1).float().mean() for r in out.routing])
    assert 0.2 < float(dead.mean()) < 0.8, dead
    hf = _load_hf(export_hf(ours, tokenizer, tmp_path / "hf"))
    for kernel in ("grouped_mm", "loop") if hasattr(torch, "_grouped_mm") else ("loop",):
        _set_kernel(hf, kernel)
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, out.logits, atol=1e-5, rtol=1e-5, msg=kernel)


def test_export_tokenizer_round_trips(tokenizer, tmp_path):
    out = export_hf(_perturbed(_config("pool-norm", tokenizer.vocab_size)), tokenizer, tmp_path / "hf")
    text = "Mixture-of-Experts: «every layer» routes into one pool.\n\n  def f(x):\n\treturn x ** 2  # ✓"
    loaders = [lambda: transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=False),
               lambda: transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True),
               lambda: transformers.PreTrainedTokenizerFast.from_pretrained(str(out))]
    for load in loaders:
        hf_tok = load()
        assert hf_tok(text)["input_ids"] == tokenizer.encode(text)
        assert hf_tok.decode(tokenizer.encode(text)) == text
        assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == tokenizer.eos_id


def test_export_tokenizer_loads_at_a_terminal_without_remote_code(tokenizer, tmp_path):
    # At a terminal transformers asks "[y/N]" before it runs remote code. The tokenizer is a plain
    # tokenizers file: loading it with trust_remote_code=False asks nothing and imports none of the
    # export's code (checked in a child process whose stdin is a pseudo-terminal).
    out = export_hf(_perturbed(_config("pool-norm", tokenizer.vocab_size)), tokenizer, tmp_path / "hf")
    script = ("import sys, transformers\n"
              f"tok = transformers.AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=False)\n"
              "remote = sorted(m for m in sys.modules if m.startswith('transformers_modules'))\n"
              "print('LOADED', tok('one pool')['input_ids'], 'REMOTE', remote)\n")
    text = _run_in_pty([sys.executable, "-c", script])
    assert "[y/N]" not in text
    assert f"LOADED {tokenizer.encode('one pool')} REMOTE []" in text


def _run_in_pty(argv, timeout=120) -> str:
    """Run argv with a pseudo-terminal as stdin/stdout (answering nothing) and return what it printed."""
    import os
    import pty
    import select
    import subprocess

    parent, child = pty.openpty()
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, close_fds=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    os.close(child)
    chunks = []
    while True:
        ready, _, _ = select.select([parent], [], [], timeout)
        if not ready:  # a question waiting for an answer
            proc.kill()
            break
        try:
            data = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=30)
    os.close(parent)
    return b"".join(chunks).decode(errors="replace")


def test_cli_export_then_import_restores_the_model(tokenizer, tmp_path, capsys):
    ours = _perturbed(_config("grouped-norm-g2", tokenizer.vocab_size))
    run = tmp_path / "run"
    add_weights(run / "checkpoints", 5, ours)
    tokenizer.save(run / "tokenizer.json")

    assert cli.main(["export", str(run), "--hf", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(tmp_path / "back")
    assert back.config == ours.config
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (tmp_path / "hf" / "tokenizer.json").read_text()
    ids = torch.tensor([tokenizer.encode(TEXT[0])[:20]])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(ids).logits, ours(ids).logits, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# Import
# ------------------------------------------------------------------------------------------------

MOE_FAMILIES = [k for k in HF_FAMILIES if k not in ("llama", "qwen3")]


def _assert_same_logits(hf, other):
    ids = torch.randint(0, HF_TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, other.eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_import_matches_transformers(family, tmp_path):
    hf = tiny_hf(family)
    with torch.no_grad():  # move norms off 1 so that every tensor's mapping is tested
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf.save_pretrained(str(tmp_path))
    ours = import_hf(tmp_path)
    assert ours.config.moe_mode == "layerwise" and ours.config.padded_vocab_size == HF_TINY["vocab_size"]
    assert ours.param_counts()["total"] == sum(p.numel() for p in hf.parameters())
    _assert_same_logits(hf, ours)
    # and back out through our own export: same logits again under transformers, and the same greedy text
    # as the original model, with the cache, for a single prompt and a left-padded batch
    export = _load_hf(export_hf(ours, None, tmp_path / "export"))
    _assert_same_logits(hf, export)
    ids = torch.randint(3, HF_TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = HF_TINY["pad_token_id"], 0
    kw = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=HF_TINY["pad_token_id"])
    for batch, attention_mask in ((ids[:1], mask[:1]), (ids, mask)):
        expected = hf.generate(batch, attention_mask=attention_mask, **kw)
        assert export.generate(batch, attention_mask=attention_mask, **kw).tolist() == expected.tolist()


def test_import_reads_fused_expert_tensors(tmp_path):
    # transformers 5 holds experts as fused 3-D gate_up_proj / down_proj; a file with those names imports too.
    hf = tiny_hf("qwen3_moe")
    hf.config.save_pretrained(str(tmp_path))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    _assert_same_logits(hf, import_hf(tmp_path))


REFUSED = [
    ("mixtral", dict(tie_word_embeddings=True), "tied input/output embeddings"),
    ("mixtral", dict(sliding_window=16), "sliding-window attention"),
    ("mixtral", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}), "RoPE scaling"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv"),
    ("olmoe", dict(attention_bias=True), "biases"),
    ("qwen3_moe", dict(mlp_only_layers=[1]), "dense MLP layers"),
    ("qwen3_moe", dict(decoder_sparse_step=2), "dense MLP layers"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=16), "sliding-window"),
]


@pytest.mark.parametrize("family,overrides,message", REFUSED)
def test_import_refuses_what_does_not_map(family, overrides, message, tmp_path, capsys):
    hf_config(family, **overrides).save_pretrained(str(tmp_path / "hf"))
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "run").exists()


def test_import_refuses_shared_experts_and_other_families(tmp_path):
    cfg = transformers.Qwen2MoeConfig(**HF_TINY, moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                      num_experts=4, num_experts_per_tok=2)
    cfg.save_pretrained(str(tmp_path / "qwen2"))
    with pytest.raises(HFError, match="shared experts"):
        import_hf(tmp_path / "qwen2")
    transformers.LlamaConfig(**HF_TINY).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(HFError, match="model_type 'llama'"):
        import_hf(tmp_path / "llama")
    with pytest.raises(HFError, match="no such directory"):
        import_hf(tmp_path / "missing")
    # a directory with a config but no safetensors weights
    tiny_hf("mixtral").config.save_pretrained(str(tmp_path / "noweights"))
    with pytest.raises(HFError, match="no model.safetensors"):
        import_hf(tmp_path / "noweights")


def test_refusals_name_the_missing_features(tmp_path, capsys):
    deepseek = transformers.DeepseekV3Config(**HF_TINY, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                                             first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, n_group=2,
                                             topk_group=1, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    deepseek.save_pretrained(str(tmp_path / "deepseek"))
    assert cli.main(["import", str(tmp_path / "deepseek"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model_type 'deepseek_v3'" in err
    for feature in ("shared experts (n_shared_experts=1)", "dense FFN layers", "first_k_dense_replace=1",
                    "multi-head latent attention (MLA", "group-limited routing (n_group=2"):
        assert feature in err
    transformers.LlamaConfig(**HF_TINY).save_pretrained(str(tmp_path / "llama"))
    with pytest.raises(HFError, match=r"model_type 'llama': it has dense FFNs only \(no mixture-of-experts layers\)"):
        import_hf(tmp_path / "llama")


def _safetensors_dtypes(paths):
    """The floating-point dtypes stored in safetensors files (flags and counters left out)."""
    dtypes = set()
    for path in paths:
        with safe_open(str(path), "pt") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return {d for d in dtypes if d.startswith(("F", "BF"))}


def test_bf16_import_and_export_keep_the_dtype_and_shard(tmp_path, capsys):
    hf = tiny_hf("olmoe").to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path / "hf"))
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "bfloat16" in capsys.readouterr().out
    assert _safetensors_dtypes((tmp_path / "run" / "checkpoints").glob("*/model.safetensors")) == {"BF16"}

    # export keeps bf16 and, above --max-shard-size, writes shards and an index as save_pretrained does
    assert cli.main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "out"), "--max-shard-size", "100KB"]) == 0
    out = tmp_path / "out"
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    assert all(p.stat().st_size <= 100_000 + 10_000 for p in shards)  # one tensor is never split; headers add a little
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [p.name for p in shards]
    assert _safetensors_dtypes(shards) == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    exported = _load_hf(out)
    assert exported.dtype == torch.bfloat16
    with torch.no_grad():  # the same bf16 weights: the same logits up to bf16 rounding in the two codes
        ids = torch.randint(0, HF_TINY["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(exported(ids).logits.float(), hf(ids).logits.float(), atol=0.1, rtol=0.05)
    # and the sharded export imports again, to the same weights
    back = import_hf(out)
    ours, _ = load_model(tmp_path / "run")
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name

    # --dtype overrides; a bad size is one line
    assert cli.main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "fp32"), "--dtype", "float32"]) == 0
    assert _safetensors_dtypes([tmp_path / "fp32" / "model.safetensors"]) == {"F32"}
    assert not (tmp_path / "fp32" / "model.safetensors.index.json").exists()
    assert cli.main(["export", str(tmp_path / "run"), "--hf", str(tmp_path / "x"), "--max-shard-size", "lots"]) == 2
    assert "not a size: 'lots'" in capsys.readouterr().err


def test_export_names_a_missing_tokenizer(tmp_path):
    with pytest.raises(HFError, match="no tokenizer file"):
        export_hf(build_model(get_preset("debug")), tmp_path / "missing.json", tmp_path / "hf")


@pytest.mark.parametrize("scale", ["softplus", "exp"])
def test_export_refuses_a_norm_router_scale_it_cannot_compute(tmp_path, scale):
    model = build_model(get_preset("debug").replace(norm_router_scale=scale, norm_router_c="one"))
    with pytest.raises(HFError, match=f"norm_router_scale='{scale}'"):
        export_hf(model, None, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()  # refused before anything is written


def _mirrored_lines(fn) -> list[str]:
    """A function's code lines, stripped, without comments, blank lines or its signature and docstring."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return [line for stmt in body for line in (ast.unparse(stmt).splitlines())]


def test_exported_code_mirrors_the_model():
    """The exported modeling file copies the model's attention, RoPE and RMSNorm (it cannot import unipool).
    Each copy carries a `unipool:mirror` marker, and every line of the model's function must appear in the
    copy, in order, with the projections renamed: a change to the model's math that the export misses fails."""
    import inspect

    from unipool.interop.hf_remote import modeling_unipool as remote
    from unipool.model import model as core

    source = inspect.getsource(remote)
    rename = {"self.wq": "self.q_proj", "self.wk": "self.k_proj", "self.wv": "self.v_proj", "self.wo": "self.o_proj"}
    pairs = [(core.RMSNorm.forward, remote.UnipoolRMSNorm.forward, "unipool.model.model.RMSNorm.forward"),
             (core.apply_rope, remote.apply_rope, "unipool.model.model.apply_rope"),
             (core.rope_tables, remote.rope_tables, "unipool.model.model.rope_tables"),
             (core.Attention.forward, remote.UnipoolAttention.forward, "unipool.model.model.Attention.forward")]
    for ours, copy, name in pairs:
        assert f"# unipool:mirror {name}" in source, f"{name}: the copy lost its marker"
        expected = _mirrored_lines(ours)
        if name.endswith("Attention.forward"):  # SDPA's own GQA: the copy repeats K/V before an explicit call
            expected = [ln for ln in expected if "scaled_dot_product_attention" not in ln]
        for old, new in rename.items():
            expected = [ln.replace(old, new) for ln in expected]
        got = iter(_mirrored_lines(copy))
        missing = [ln for ln in expected if not any(ln == g for g in got)]
        assert not missing, f"{name}: the exported copy no longer has {missing[:3]}"


def test_export_runs_under_autocast_like_our_model(tokenizer, tmp_path):
    # Under CPU bf16 autocast the expert matmuls return bf16 while the residual stream stays fp32: the
    # per-expert loop (and so every decoding step, which routes too few rows for grouped GEMMs) must
    # accumulate in the residual dtype, and give our model's logits under the same autocast.
    ours = _perturbed(_config("pool-norm", tokenizer.vocab_size))
    hf = _load_hf(export_hf(ours, tokenizer, tmp_path / "hf"))
    ids = torch.tensor([tokenizer.encode(t)[:16] for t in TEXT])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ours(ids).logits
        for kernel in ("auto", "loop"):
            _set_kernel(hf, kernel)
            got = hf(ids).logits
            assert got.dtype == expected.dtype, kernel
            torch.testing.assert_close(got.float(), expected.float(), atol=0.1, rtol=0.05, msg=kernel)
        _set_kernel(hf, "auto")
        out = hf.generate(ids[:1, :10], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                          pad_token_id=tokenizer.eos_id)
    assert out.shape == (1, 14)


def test_export_refuses_output_flags_it_does_not_compute_and_returns_tuples_when_asked(tokenizer, tmp_path):
    hf = _load_hf(export_hf(_perturbed(_config("pool-norm", tokenizer.vocab_size)), tokenizer, tmp_path / "hf"))
    ids = torch.tensor([tokenizer.encode(TEXT[0])[:8]])
    for flag in ("output_hidden_states", "output_attentions"):
        for module in (hf, hf.model):
            with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
                module(ids, **{flag: True})
    with torch.no_grad():  # False, as generate passes them, is fine
        assert hf(ids, output_hidden_states=False, output_attentions=False).logits.shape[1] == 8
        # return_dict=False: transformers' tuple of the fields that are set (the cache is, with use_cache)
        full = hf(ids, labels=ids)
        loss, logits, *_ = hf(ids, labels=ids, return_dict=False)
        assert torch.equal(loss, full.loss) and torch.equal(logits, full.logits)
        assert torch.equal(hf.model(ids, return_dict=False)[0], hf.model(ids).last_hidden_state)


def test_rope_tables_are_computed_on_the_cpu_and_the_export_looks_them_up_exactly(tokenizer, tmp_path):
    # MPS has no float64: the float64 work runs on the CPU with an explicit device whatever the target
    # (no MPS here: the CPU case shows where it runs), and only the float32 tables move; a meta build
    # computes nothing. The export's tables are bit-identical to ours.
    from torch.utils._python_dispatch import TorchDispatchMode

    from unipool.interop.hf_remote import modeling_unipool as remote
    from unipool.model.model import rope_tables

    class Float64Devices(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.devices = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
                self.devices.add(out.device.type)
            return out

    for tables in (rope_tables, remote.rope_tables):
        with Float64Devices() as seen:
            cos, sin = tables(16, 32, 1e4, device="cpu")
        assert seen.devices == {"cpu"} and cos.dtype == sin.dtype == torch.float32
        with Float64Devices() as seen:  # a meta build (shapes only) computes nothing at all
            cos, sin = tables(16, 32, 1e4, device="meta")
        assert seen.devices == set() and cos.device.type == sin.device.type == "meta"
        assert cos.dtype == sin.dtype == torch.float32 and tuple(cos.shape) == (32, 16)

    ours = _perturbed(_config("pool-norm", tokenizer.vocab_size))
    hf = _load_hf(export_hf(ours, tokenizer, tmp_path / "hf"))
    positions = torch.tensor([[0, 1, 5, 63], [7, 7, 2, 30]])
    cos, sin = hf.model.rope_cos_sin(positions)
    assert torch.equal(cos[:, 0], ours.rope_cos[positions]) and torch.equal(sin[:, 0], ours.rope_sin[positions])
    far = hf.model.rope_cos_sin(torch.tensor([[500]]))[0]  # past max_position_embeddings: the table grows
    assert torch.equal(far[0, 0, 0], rope_tables(ours.config.head_dim, 501, ours.config.rope_base)[0][500])


def test_import_refuses_to_write_into_its_source(tokenizer, tmp_path, capsys):
    src = export_hf(_perturbed(_config("pool-norm", tokenizer.vocab_size)), tokenizer, tmp_path / "hf")
    before = sorted(p.name for p in src.iterdir())
    for out, where in ((src, "is the source"), (src / "run", "is inside the source"), (tmp_path, "holds the source")):
        assert cli.main(["import", str(src), "--out", str(out), "--force"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and where in err and "\n" not in err, err
    assert sorted(p.name for p in src.iterdir()) == before
    assert json.loads((src / "config.json").read_text())["model_type"] == "unipool"


def test_import_maps_the_balance_coefficient_to_the_same_loss_at_balance(tmp_path, capsys):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from unipool.model.router import expert_counts, switch_loss

    n_layers, n_experts, top_k, coef = 4, 4, 2, 0.02
    tiny_hf("mixtral", num_hidden_layers=n_layers, router_aux_loss_coef=coef).save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    ours, _ = load_model(tmp_path / "run")
    assert ours.config.switch_loss_coef == pytest.approx(0.01)  # 0.02 * top-2 / 4 layers
    assert "switch_loss_coef 0.01 = router_aux_loss_coef x top-2 / 4 layers" in out

    # Balanced routing (every expert picked equally often, probabilities near uniform) in every layer:
    # transformers' loss is k = 2 there, times 0.02; ours is 1 per layer, times 0.01, over 4 layers.
    tokens = torch.arange(8)
    logits_TE = torch.zeros(8, n_experts)
    logits_TE[tokens, tokens % n_experts] = 1e-3
    logits_TE[tokens, (tokens + 1) % n_experts] = 1e-3
    hf_term = coef * float(load_balancing_loss_func((logits_TE,) * n_layers, n_experts, top_k))
    scores_TE = logits_TE.softmax(-1)
    counts_E = expert_counts(scores_TE.topk(top_k, dim=-1).indices, n_experts)
    assert counts_E.tolist() == [4.0] * n_experts
    ours_term = n_layers * ours.config.switch_loss_coef * float(switch_loss(scores_TE, counts_E, top_k))
    assert hf_term == pytest.approx(0.04, rel=1e-3) and ours_term == pytest.approx(hf_term, rel=1e-3)


def test_import_warns_when_there_is_no_tokenizer(tmp_path, capsys):
    tiny_hf("olmoe").save_pretrained(str(tmp_path / "hf"))
    capsys.readouterr()
    assert cli.main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    assert "warning: no tokenizer.json found in" in capsys.readouterr().out
    assert not (tmp_path / "run" / "tokenizer.json").exists()


def test_json_that_is_not_an_object_is_one_line_naming_the_file(tmp_path, capsys):
    from unipool.interop.hf_moe import HFMoEError, checkpoint_model_type

    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[]")
    with pytest.raises(HFError, match=r"list/config.json holds a JSON list, not an object"):
        import_hf(tmp_path / "list")
    with pytest.raises(HFMoEError, match=r"list/config.json holds a JSON list, not an object"):
        checkpoint_model_type(tmp_path / "list")
    hf = tiny_hf("mixtral")
    hf.save_pretrained(str(tmp_path / "index"))
    (tmp_path / "index" / "model.safetensors.index.json").write_text("3")
    with pytest.raises(HFError, match=r"model.safetensors.index.json holds a JSON int, not an object"):
        import_hf(tmp_path / "index")
    capsys.readouterr()  # save_pretrained's progress bar
    assert cli.main(["import", str(tmp_path / "list"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "config.json" in err and "\n" not in err, err
