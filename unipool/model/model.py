"""The unipool decoder: a LLaMA-style transformer whose every FFN is a mixture of experts.

Notable design choices
- RMSNorm (pre-norm), RoPE (rotate-half convention, base 1e6 in the paper), SwiGLU experts,
  grouped-query attention through scaled_dot_product_attention, untied input/output embeddings,
  no biases anywhere, vocabulary padded to a multiple (Megatron's 50257 -> 51200).
- Experts live in `Unipool.experts`, a ModuleList of `config.n_pools` ExpertPools, registered once.
  Layer l calls pool `config.pool_of_layer(l)`; blocks receive their pool as a forward argument and
  never hold it as an attribute, so each expert tensor appears once in `named_parameters()`, in the
  state dict and in FSDP. Vanilla MoE is n_pools = L; UniPool is one pool; grouped sharing is G.
- Every layer keeps its own router (`layers.{i}.router`), whatever the storage mode.
- Balancing losses travel in `ModelOutput.aux_loss`; per-layer routing in `ModelOutput.routing`.
  The pool-level loss uses f-bar from the previous micro-batch by default (as the paper does); that
  statistic is a buffer that the training loop refreshes with `update_routing_state(output)` after
  each forward, never inside forward. Sigmoid routers' aux-loss-free biases move once per optimizer
  step (`update_router_biases`, from counts summed over micro-batches and ranks).
- The relatives of UniPool are options of the same blocks (docs/design.md, "The sharing family"): an
  always-on private FFN per layer (`private_hidden`), a depth embedding on the experts' input
  (`depth_embedding`), experts tied over consecutive layers (grouped mode), and routers restricted to a
  window of layers' experts that the training loop widens with `set_router_progress`.
- No I/O, logging or distributed code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from unipool.model.config import ModelConfig
from unipool.model.moe import DISPATCH, ExpertPool
from unipool.model.router import Router, RouterOutput, load_fraction, pool_loss, routed_scaling_value


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, vocab_size): padded vocabulary rows are sliced off
    loss: torch.Tensor | None  # mean next-token cross-entropy, when targets were given
    aux_loss: torch.Tensor  # all balancing losses, already scaled by their coefficients
    routing: list[RouterOutput]  # one per layer

    @property
    def total_loss(self) -> torch.Tensor:
        assert self.loss is not None, "total_loss needs targets"
        return self.loss + self.aux_loss


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_tables(head_dim: int, max_len: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    # float64 on the CPU whatever `device` is (default: the current default device): MPS has no float64,
    # and one computation gives the same float32 tables on every device
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":  # shapes only (a model built to be materialised later): nothing to compute
        return torch.empty(max_len, head_dim, device=device), torch.empty(max_len, head_dim, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device="cpu", dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, device="cpu", dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: (S, head_dim)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, S, head_dim); cos/sin: (S, head_dim)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        # Optional QK-norm, only so that imported OLMoE ("full") / Qwen3-MoE ("head") models match.
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            q_dim, k_dim = (cfg.head_dim, cfg.head_dim) if cfg.qk_norm == "head" else \
                (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim)
            self.q_norm, self.k_norm = RMSNorm(q_dim, cfg.norm_eps), RMSNorm(k_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    """A dense SwiGLU FFN: one layer's private, always-on expert (`private_hidden`)."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * hidden, bias=False)  # gate and up projections, stacked
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


def window_ranks(cfg: ModelConfig) -> torch.Tensor:
    """(L, E) long: the order in which each layer's router gains the experts of its pool, nearest first.

    The pool's experts form `layers_per_pool` blocks, block j belonging to the pool's j-th layer; a layer
    ranks the blocks by distance |j - own| (the lower layer first on a tie) and the experts within a
    block by index. A router window of r layers is the experts ranked below r * block."""
    per_pool, block = cfg.layers_per_pool, cfg.experts_per_block
    ranks = torch.empty(cfg.n_layers, cfg.n_routed_experts, dtype=torch.long)
    for layer in range(cfg.n_layers):
        own = layer % per_pool
        by_distance = sorted(range(per_pool), key=lambda j: (abs(j - own), j))
        for position, j in enumerate(by_distance):
            ranks[layer, j * block:(j + 1) * block] = position * block + torch.arange(block)
    return ranks


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.router = Router(cfg.d_model, cfg.n_routed_experts, cfg.routed_top_k, cfg.router,
                             renormalize=cfg.renormalize,
                             scaling=routed_scaling_value(cfg.routed_scaling_factor, cfg.router_width,
                                                          cfg.routed_top_k, cfg.init_std * math.sqrt(cfg.d_model),
                                                          cfg.renormalize),
                             norm_c=cfg.norm_router_c, norm_eps=cfg.norm_router_eps,
                             random_gates=cfg.random_gates, switch_coef=cfg.switch_loss_coef,
                             z_coef=cfg.z_loss_coef, bias_rate=cfg.aux_free_bias_rate,
                             balance_scores=cfg.balance_scores, count_dead_picks=cfg.count_dead_picks,
                             scale_param=cfg.norm_router_scale, window=cfg.router_width if cfg.router_window else None,
                             masked=cfg.stored_router_masks, switch_width=cfg.switch_loss_width)
        if cfg.router == "random" and cfg.random_gates == "uniform":
            # nothing reads this router's logits (the config refuses balance losses on them), so no gradient
            # reaches it: frozen, so that data-parallel training does not wait for one
            self.router.requires_grad_(False)
        self.private_expert = SwiGLU(cfg.d_model, cfg.private_hidden) if cfg.private_hidden else None
        self.depth_embedding = nn.Parameter(torch.empty(cfg.d_model)) if cfg.depth_embedding != "none" else None

    def forward(self, x: torch.Tensor, pool: ExpertPool, cos: torch.Tensor, sin: torch.Tensor):
        x = x + self.attention(self.attention_norm(x), cos, sin)
        b, s, d = x.shape
        h_TD = self.ffn_norm(x).reshape(b * s, d)
        routed = self.router(h_TD)
        # The depth embedding tells shared experts which layer calls them; the router does not see it.
        experts_in_TD = h_TD if self.depth_embedding is None else h_TD + self.depth_embedding.to(h_TD.dtype)
        y_TD = pool(experts_in_TD, routed.expert_ids_TK, routed.weights_TK)
        if self.private_expert is not None:
            y_TD = y_TD + self.private_expert(h_TD)
        x = x + y_TD.view(b, s, d).type_as(x)
        return x, routed


class Unipool(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg  # validated when it was built
        self.tok_embeddings = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.experts = nn.ModuleList(
            ExpertPool(cfg.n_routed_experts, cfg.d_model, cfg.expert_hidden) for _ in range(cfg.n_pools))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.output = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # f-bar of the previous micro-batch per pool, and whether it has been set yet (the paper's
        # first micro-batch has no pool loss).
        self.register_buffer("pool_load_PE", torch.zeros(cfg.n_pools, cfg.n_routed_experts))
        self.register_buffer("pool_load_valid", torch.zeros((), dtype=torch.bool))
        if cfg.router_window:
            self.register_buffer("window_rank_LE", window_ranks(cfg), persistent=False)
        # How the forward runs, not what it computes (a run's `exec` section; see set_execution).
        self.activation_checkpointing = False
        self.fused_pool_wgrad = False

    def set_execution(self, *, dispatch: str | None = None, fused_pool_wgrad: bool | None = None,
                      activation_checkpointing: bool | None = None) -> None:
        """Expert kernels (auto | grouped_mm | loop), the shared pool's weight gradient fused into one
        grouped GEMM over all layers, and per-block activation checkpointing. None keeps a setting."""
        if dispatch is not None:
            if dispatch not in DISPATCH:
                raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
            for pool in self.experts:
                pool.dispatch = dispatch
        if fused_pool_wgrad is not None:
            self.fused_pool_wgrad = fused_pool_wgrad
        if activation_checkpointing is not None:
            self.activation_checkpointing = activation_checkpointing

    @torch.no_grad()
    def init_weights(self) -> None:
        """All initialisation, in one place (UniPool Table 8, Megatron defaults):

        | parameter                         | init                                  |
        |-----------------------------------|---------------------------------------|
        | tok_embeddings, output            | N(0, init_std)                        |
        | attention wq, wk, wv              | N(0, init_std)                        |
        | attention wo, experts w2          | N(0, init_std / sqrt(2 L)) if scaled  |
        | experts w13 (gate and up)         | N(0, init_std)                        |
        | router gate                       | N(0, init_std)                        |
        | NormRouter scale sigma            | 1                                     |
        | RMSNorm weights (incl. QK-norm)   | 1                                     |
        | private expert w13 / w2           | as the experts' w13 / w2              |
        | depth embedding                   | 0 ("zeros") or N(0, init_std)         |
        """
        cfg = self.config
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers) if cfg.scaled_out_init else std
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        nn.init.normal_(self.output.weight, std=std)
        for block in self.layers:
            for w in (block.attention.wq, block.attention.wk, block.attention.wv, block.router.gate):
                nn.init.normal_(w.weight, std=std)
            nn.init.normal_(block.attention.wo.weight, std=out_std)
            block.router.reset_scale()  # sigma = 1 (NormRouter only)
            block.attention_norm.weight.fill_(1.0)
            if block.attention.qk_norm != "none":
                block.attention.q_norm.weight.fill_(1.0)
                block.attention.k_norm.weight.fill_(1.0)
            block.ffn_norm.weight.fill_(1.0)
            if block.private_expert is not None:
                nn.init.normal_(block.private_expert.w13.weight, std=std)
                nn.init.normal_(block.private_expert.w2.weight, std=out_std)
            if block.depth_embedding is not None:
                if cfg.depth_embedding == "zeros":
                    block.depth_embedding.zero_()
                else:
                    nn.init.normal_(block.depth_embedding, std=std)
        for pool in self.experts:
            nn.init.normal_(pool.w13_EFD, std=std)
            nn.init.normal_(pool.w2_EDF, std=out_std)
        self.norm.weight.fill_(1.0)
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self) -> None:
        """Fill the non-parameter state (RoPE tables, routing statistics) after `to_empty`."""
        cfg = self.config
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_base, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        self.pool_load_PE.zero_()
        self.pool_load_valid.fill_(False)
        for block in self.layers:
            if hasattr(block.router, "expert_bias"):
                block.router.expert_bias.zero_()
        if cfg.router_window:
            self.window_rank_LE.copy_(window_ranks(cfg))
            self.set_router_progress(0.0)
        elif cfg.stored_router_masks:  # a fresh model with stored masks: every expert open (to_empty left garbage)
            for block in self.layers:
                block.router.candidate_mask_E.fill_(True)

    @torch.no_grad()
    def set_router_progress(self, progress: float) -> None:
        """Open each router's window for training progress `progress` (step / total steps, in [0, 1]):
        from its own block of experts at 0 to the whole window at `router_window_warmup` and after,
        nearest experts first. Does nothing without a router window. A function of the step alone, so
        a resumed run routes as an uninterrupted one."""
        cfg = self.config
        if not cfg.router_window:
            return
        block, full = cfg.experts_per_block, cfg.router_width
        ramp = 1.0 if cfg.router_window_warmup == 0 else min(1.0, max(0.0, progress) / cfg.router_window_warmup)
        n_candidates = block + round((full - block) * ramp)
        for block_module, rank_E in zip(self.layers, self.window_rank_LE):
            block_module.router.candidate_mask_E.copy_(rank_E < n_candidates)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor | None = None) -> ModelOutput:
        cfg = self.config
        b, s = input_ids.shape
        if s > cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds model.max_seq_len={cfg.max_seq_len}")
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        x = self.tok_embeddings(input_ids)
        routing: list[RouterOutput] = []
        pools = list(self.experts)
        if self.fused_pool_wgrad and cfg.layers_per_pool > 1 and self.training and torch.is_grad_enabled():
            # Every layer calling a pool adds to the same weight gradient: compute it once per pool
            # at the end of backward, as one grouped GEMM over all layers' rows (moe.DeferredWGrad).
            # A pool with one caller (per-layer MoE) has nothing to fuse.
            pools = [p.defer_wgrad(x) for p in pools]
        for i, block in enumerate(self.layers):
            pool = pools[cfg.pool_of_layer(i)]
            if self.activation_checkpointing and self.training:
                x, routed = checkpoint(block, x, pool, cos, sin, use_reentrant=False)
            else:
                x, routed = block(x, pool, cos, sin)
            routing.append(routed)
        logits = self.output(self.norm(x))[..., : cfg.vocab_size]

        aux = sum((r.aux_loss for r in routing), logits.new_zeros((), dtype=torch.float32))
        if cfg.pool_loss_coef > 0:
            aux = aux + cfg.pool_loss_coef * self._pool_loss(routing)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return ModelOutput(logits, loss, aux, routing)

    def pool_loads(self, routing: list[RouterOutput]) -> torch.Tensor:
        """f-bar per pool: each expert's routed fraction, averaged over the layers calling the pool."""
        cfg = self.config
        loads_PE = torch.zeros_like(self.pool_load_PE)
        for i, r in enumerate(routing):
            loads_PE[cfg.pool_of_layer(i)] += load_fraction(r.counts_E, r.expert_ids_TK.numel(),
                                                            live_only=not cfg.count_dead_picks)
        return loads_PE / cfg.layers_per_pool

    def _pool_loss(self, routing: list[RouterOutput]) -> torch.Tensor:
        cfg = self.config
        if cfg.pool_loss_stats == "current":
            loads_PE = self.pool_loads(routing)
        else:
            # The first micro-batch has no previous statistics: the flag zeroes the loss without a
            # host sync (no `if tensor:` in the hot path).
            loads_PE = self.pool_load_PE * self.pool_load_valid
        per_pool = cfg.layers_per_pool
        # Each pool has its own accumulator (grouped sharing); the losses of the pools add up.
        normalized = cfg.balance_scores == "normalized"
        return sum(pool_loss([r.scores_TE for r in routing[p * per_pool:(p + 1) * per_pool]], loads_PE[p],
                             normalized) for p in range(cfg.n_pools))

    @torch.no_grad()
    def update_routing_state(self, output: ModelOutput) -> None:
        """Call after each training forward: stores f-bar for the next micro-batch's pool loss. Kept
        out of forward so recomputation (activation checkpointing) and evaluation never change it."""
        self.pool_load_PE.copy_(self.pool_loads(output.routing))
        self.pool_load_valid.fill_(True)

    @property
    def has_router_biases(self) -> bool:
        """Whether `update_router_biases` does anything (sigmoid routers with a bias rate)."""
        return self.config.router == "sigmoid" and self.config.aux_free_bias_rate > 0

    @torch.no_grad()
    def update_router_biases(self, counts_LE: torch.Tensor) -> None:
        """Aux-loss-free balancing, once per optimizer step (the official cadence): `counts_LE` are the
        tokens each layer routed to each expert, summed over the step's micro-batches and all ranks
        (the caller all-reduces), so every rank moves its biases the same way."""
        for block, counts_E in zip(self.layers, counts_LE):
            block.router.update_bias(counts_E)

    def router_scales(self) -> list[torch.Tensor] | None:
        """Each layer's NormRouter sigma (shape (1,), detached); None without NormRouters."""
        if self.config.router != "norm":
            return None
        return [block.router.sigma().detach() for block in self.layers]

    # ---- parameter accounting ------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """Total, per-token active, and expert parameters (works on the meta device)."""
        cfg = self.config
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for p in self.experts.parameters())
        routers = sum(p.numel() for b in self.layers for p in b.router.parameters())
        private = sum(p.numel() for b in self.layers if b.private_expert is not None
                      for p in b.private_expert.parameters())
        per_expert = 3 * cfg.d_model * cfg.expert_hidden
        active_experts = cfg.n_layers * cfg.routed_top_k * per_expert
        non_expert = total - experts
        return {
            "total": total,
            "experts": experts,
            "routers": routers,
            "active": non_expert + active_experts,
            # The paper's "active" column: the dense model with one FFN per layer, no routers.
            "dense_equivalent": non_expert - routers + active_experts,
            "per_expert": per_expert,
            "private_experts": private,  # always-on per-layer FFNs: in "active" as every non-expert weight
        }


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu", *, init: bool = True) -> Unipool:
    """Construct on the meta device, materialise on `device`, then initialise weights."""
    with torch.device("meta"):
        model = Unipool(cfg)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    if init:
        model.init_weights()
    else:  # weights come from a checkpoint next
        model.init_buffers()
    return model
