import math

import pytest
import torch
import torch.nn.functional as F

from unipool.model.model import Attention, apply_rope, build_model, rope_tables
from unipool.model.moe import ExpertPool
from unipool.model.router import pool_loss
from unipool.presets import get_preset

MODES = {
    "pool": dict(),
    "layerwise": dict(moe_mode="layerwise", num_experts=4, router="softmax", switch_loss_coef=1e-2, pool_loss_coef=0.0),
    "grouped": dict(moe_mode="grouped", n_groups=2, num_experts=4),
    "fine-grained": dict(granularity=2),
    "sigmoid": dict(router="sigmoid", top_k=2, pool_loss_coef=0.0),
    "random": dict(router="random", pool_loss_coef=0.0),
    "random-model-gates": dict(router="random", random_gates="model"),
    "z-loss": dict(router="softmax", z_loss_coef=1e-3, pool_loss_stats="current"),
}


def tokens(cfg, b=2, s=16):
    return torch.randint(0, cfg.vocab_size, (b, s))


@pytest.mark.parametrize("mode", MODES)
def test_debug_forward_backward_every_mode(mode):
    cfg = get_preset("debug").replace(n_layers=4, **MODES[mode])
    model = build_model(cfg)
    x = tokens(cfg)
    out = model(x, x)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert len(out.routing) == cfg.n_layers
    assert math.isfinite(out.total_loss.item())
    out.total_loss.backward()
    model.update_routing_state(out)
    for name, p in model.named_parameters():
        if cfg.router == "random" and cfg.random_gates == "uniform" and name.endswith("router.gate.weight"):
            assert not p.requires_grad  # nothing reads its scores: frozen
            continue
        assert p.grad is not None, name
    assert model.pool_load_valid


def test_shared_pool_is_one_set_of_tensors():
    cfg = get_preset("debug").replace(n_layers=4)
    model = build_model(cfg)
    assert len(model.experts) == 1
    pool_params = dict(model.experts.named_parameters())
    assert set(pool_params) == {"0.w13_EFD", "0.w2_EDF"}
    # No block owns expert weights; every parameter appears once.
    assert not any(isinstance(m, ExpertPool) for m in model.layers.modules())
    ptrs = [p.data_ptr() for p in model.parameters()]
    assert len(ptrs) == len(set(ptrs))
    assert sum(p.numel() for p in pool_params.values()) == cfg.n_routed_experts * 3 * cfg.d_model * cfg.expert_hidden
    # Each layer's call runs on the very same storage.
    seen = []
    model.experts[0].register_forward_hook(lambda mod, args, out: seen.append(mod.w13_EFD.data_ptr()))
    x = tokens(cfg)
    model(x)
    assert seen == [model.experts[0].w13_EFD.data_ptr()] * cfg.n_layers


def test_pool_gradient_accumulates_from_every_layer():
    cfg = get_preset("debug").replace(n_layers=4, pool_loss_coef=0.0)
    model = build_model(cfg)
    pool = model.experts[0]
    outs = []
    pool.register_forward_hook(lambda mod, args, out: outs.append(out))
    x = tokens(cfg)
    model(x)
    cots = [torch.randn_like(o) for o in outs]
    per_layer = [torch.autograd.grad((o * c).sum(), pool.w13_EFD, retain_graph=True)[0] for o, c in zip(outs, cots)]
    for g in per_layer:  # every layer sends gradient into the one pool
        assert g.abs().sum() > 0
    total = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cots)), pool.w13_EFD)[0]
    torch.testing.assert_close(total, sum(per_layer))


def test_pool_loss_gives_experts_no_gradient():
    # f-bar is detached, so the only path from the pool loss to expert weights would be through the
    # load statistic: with one layer (no later router reading the expert output) the experts get
    # exactly nothing. With more layers, later routers' inputs depend on earlier expert outputs and
    # the loss back-propagates into the residual stream, as Megatron's aux losses do.
    cfg = get_preset("debug").replace(n_layers=1, pool_loss_stats="current", pool_loss_coef=1.0)
    model = build_model(cfg)
    out = model(tokens(cfg))
    loss = model._pool_loss(out.routing)
    grads = torch.autograd.grad(loss, list(model.experts.parameters()), allow_unused=True, retain_graph=True)
    assert all(g is None for g in grads)
    router_params = list(model.layers[0].router.parameters())
    assert all(g.abs().sum() > 0 for g in torch.autograd.grad(loss, router_params))


def test_pool_loss_reaches_every_router():
    cfg = get_preset("debug").replace(n_layers=3, pool_loss_stats="current", pool_loss_coef=1.0)
    model = build_model(cfg)
    out = model(tokens(cfg))
    loss = model._pool_loss(out.routing)
    router_params = [p for b in model.layers for p in b.router.parameters()]
    grads = torch.autograd.grad(loss, router_params)
    assert all(g.abs().sum() > 0 for g in grads)


def test_pool_loss_uses_previous_micro_batch_statistics():
    cfg = get_preset("debug").replace(n_layers=3, pool_loss_coef=0.5)
    model = build_model(cfg)
    x1, x2 = tokens(cfg), tokens(cfg)
    out1 = model(x1)
    assert out1.aux_loss.item() == 0.0  # the first micro-batch has no pool loss
    model.update_routing_state(out1)
    loads = torch.zeros(cfg.n_routed_experts)
    for r in out1.routing:
        loads += torch.bincount(r.expert_ids_TK.flatten(), minlength=cfg.n_routed_experts) / r.expert_ids_TK.numel()
    loads /= cfg.n_layers
    torch.testing.assert_close(model.pool_load_PE[0], loads)
    out2 = model(x2)
    expected = 0.5 * pool_loss([r.scores_TE for r in out2.routing], loads)
    torch.testing.assert_close(out2.aux_loss, expected)
    # "current" uses this micro-batch's own statistics instead
    model.config = cfg.replace(pool_loss_stats="current")  # configs are frozen: the model gets a new one
    out3 = model(x2)
    torch.testing.assert_close(out3.aux_loss, 0.5 * pool_loss([r.scores_TE for r in out3.routing],
                                                              model.pool_loads(out3.routing)[0]))


def test_grouped_pools_have_separate_statistics():
    cfg = get_preset("debug").replace(n_layers=4, moe_mode="grouped", n_groups=2, num_experts=4)
    model = build_model(cfg)
    out = model(tokens(cfg))
    loads = model.pool_loads(out.routing)
    assert loads.shape == (2, 4)
    torch.testing.assert_close(loads.sum(-1), torch.ones(2))


def _attention_reference(attn, x, cos, sin):
    """Plain multi-head attention with K/V heads repeated and an explicit causal mask."""
    b, s, _ = x.shape
    q = attn.wq(x).view(b, s, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.wk(x).view(b, s, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    v = attn.wv(x).view(b, s, attn.n_kv_heads, attn.head_dim).transpose(1, 2)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    rep = attn.n_heads // attn.n_kv_heads
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)
    scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
    y = torch.softmax(scores, -1) @ v
    return attn.wo(y.transpose(1, 2).reshape(b, s, -1))


def test_gqa_attention_matches_reference():
    cfg = get_preset("debug")
    attn = Attention(cfg)
    x = torch.randn(2, 10, cfg.d_model)
    cos, sin = rope_tables(cfg.head_dim, 10, cfg.rope_base)
    torch.testing.assert_close(attn(x, cos, sin), _attention_reference(attn, x, cos, sin), rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    head_dim = 16
    cos, sin = rope_tables(head_dim, 64, 1e6)
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(i, j):
        qi = apply_rope(q.view(1, 1, 1, -1).expand(1, 1, 64, -1), cos, sin)[0, 0, i]
        kj = apply_rope(k.view(1, 1, 1, -1).expand(1, 1, 64, -1), cos, sin)[0, 0, j]
        return (qi * kj).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37), rtol=1e-4, atol=1e-5)
    assert torch.allclose(apply_rope(q.view(1, 1, 1, -1), cos[7:8], sin[7:8]).norm(), q.norm(), atol=1e-5)


def test_activation_checkpointing_gives_identical_gradients():
    cfg = get_preset("debug").replace(n_layers=3, pool_loss_stats="current")
    model = build_model(cfg)
    x = tokens(cfg)
    model(x, x).total_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing = True
    model(x, x).total_loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], msg=n)


def test_padded_vocab_is_sliced_and_loss_is_cross_entropy():
    cfg = get_preset("debug").replace(vocab_size=500, vocab_multiple=64)
    assert cfg.padded_vocab_size == 512
    model = build_model(cfg)
    assert model.output.weight.shape[0] == 512
    x = tokens(cfg)
    out = model(x, x)
    assert out.logits.shape[-1] == 500
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits.reshape(-1, 500).float(), x.reshape(-1)))


def test_init_table():
    cfg = get_preset("debug").replace(n_layers=8, d_model=256, n_heads=4, ffn_hidden=512, init_std=0.01)
    model = build_model(cfg)
    assert model.tok_embeddings.weight.std().item() == pytest.approx(0.01, rel=0.05)
    out_std = 0.01 / math.sqrt(16)
    assert model.layers[0].attention.wo.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.experts[0].w2_EDF.std().item() == pytest.approx(out_std, rel=0.05)
    assert model.experts[0].w13_EFD.std().item() == pytest.approx(0.01, rel=0.05)
    assert model.layers[0].router.scale.item() == 1.0


def test_meta_build_of_largest_preset_allocates_nothing():
    model = build_model(get_preset("unipool-978m"), "meta")
    assert all(p.is_meta for p in model.parameters())
    assert model.param_counts()["total"] == 5_741_815_320
