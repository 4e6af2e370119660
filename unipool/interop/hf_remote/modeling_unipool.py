"""An exported unipool model for transformers (self-contained: imports torch and transformers only).

The math is unipool's (unipool/model/model.py, router.py, moe.py): pre-norm LLaMA-style blocks with RoPE
(rotate-half, tables computed in float64 on the CPU), grouped-query attention, optional QK-norm, and a per-layer
router into SwiGLU experts. Expert storage keeps unipool's layout:

    model.experts.{p}.gate_up_proj  (E, 2F, D)   gate rows first, then up rows
    model.experts.{p}.down_proj     (E, D, F)

with `n_pools` pools owned once by the model and passed to each layer at call time (layer l uses pool
l // (L / n_pools)). A UniPool export therefore stores the shared pool once and loads it as one set of
parameters; vanilla MoE is n_pools = L.

Experts run as grouped GEMMs over the routed rows sorted by expert (`torch._grouped_mm`, as unipool
runs them), or as a plain loop over the experts that received tokens where grouped_mm is missing,
cannot take the shapes, or (on CPU) has too few rows to pay for itself (config.expert_kernel:
auto | grouped_mm | loop). Generation supports
transformers' DynamicCache (use_cache=True) and use_cache=False, under the cache's old name
(`past_key_values`, transformers < 5.24) and its new one (`cache`).

The export is for inference. Its forward computes the logits, the loss on `labels` and, with
output_router_logits=True, the router logits, but no balancing loss (`aux_loss` stays None), so fine-tuning
it does not balance the experts or move a sigmoid router's selection biases. Per-layer hidden states and
attention weights are not computed either: output_hidden_states=True or output_attentions=True raises a
ValueError instead of returning None where the caller expects them. return_dict=False (or
config.return_dict False) returns transformers' tuple of the fields that are set.
"""

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .configuration_unipool import UnipoolConfig

try:  # transformers 5: guarded init helpers that skip tensors already loaded from the checkpoint
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init

# transformers 5.24 renamed the KV cache from `past_key_values` to `cache`, in model inputs and outputs.
# The forwards accept both names; outputs are built with whichever field this transformers has.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in fields(MoeModelOutputWithPast)} else "past_key_values"
_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
# Before torch 2.11 the CPU kernel also needs 16-byte aligned storage, which memory-mapped weights lack.
_CPU_GROUPED_MM_MIN_ROWS = 8  # fewer routed rows run faster as a loop on CPU (see _grouped_mm_pays)
_CPU_GROUPED_MM_NEEDS_ALIGNED_STORAGE = tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 11)


def _refuse_unsupported_outputs(kwargs):
    for name in ("output_hidden_states", "output_attentions"):
        if kwargs.get(name):
            raise ValueError(f"{name}=True is not supported by the exported unipool model: it returns the logits, "
                             "the KV cache and, with output_router_logits=True, the router logits")


def _as_asked(output, kwargs, config):
    """transformers' convention: a tuple of the fields that are set when return_dict is False (the argument,
    else config.return_dict), the output object otherwise."""
    return_dict = kwargs.get("return_dict")
    if return_dict is None:
        return_dict = getattr(config, "return_dict", True)
    return output if return_dict else output.to_tuple()


# unipool:mirror unipool.model.model.RMSNorm.forward (tests/test_hf.py checks the copy against the model)
class UnipoolRMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


# unipool:mirror unipool.model.model.rope_tables
def rope_tables(head_dim, max_len, base, device=None):
    # float64 on the CPU whatever `device` is: MPS has no float64, and one computation gives the same
    # float32 tables on every device
    device = torch.get_default_device() if device is None else torch.device(device)
    if device.type == "meta":  # shapes only (a model built to be materialised later): nothing to compute
        return torch.empty(max_len, head_dim, device=device), torch.empty(max_len, head_dim, device=device)
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device="cpu", dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_len, device="cpu", dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: (S, head_dim)
    return angles.cos().float().to(device), angles.sin().float().to(device)


# unipool:mirror unipool.model.model.apply_rope
def apply_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).type_as(x)


# unipool:mirror unipool.model.model.Attention.forward (projections renamed as transformers names them; the KV
# cache, the explicit grouped-query repeat and the padding mask are the additions)
class UnipoolAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads, config.num_key_value_heads,
                                                        config.head_dim)
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm != "none":
            q_dim, k_dim = ((self.head_dim, self.head_dim) if self.qk_norm == "head"
                            else (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim))
            self.q_norm = UnipoolRMSNorm(q_dim, config.rms_norm_eps)
            self.k_norm = UnipoolRMSNorm(k_dim, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache):
        b, s, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        if self.n_kv_heads != self.n_heads:  # grouped-query attention
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, s, -1))


class UnipoolRouter(nn.Module):
    """One layer's router: softmax | norm (NormRouter) | sigmoid (with selection bias) | random."""

    def __init__(self, config):
        super().__init__()
        self.kind, self.top_k, self.n_experts = config.router, config.num_experts_per_tok, config.num_experts
        self.renormalize, self.norm_c, self.norm_eps = config.renormalize, config.norm_router_c, config.norm_router_eps
        self.random_gates = config.random_gates
        self.scaling = float(getattr(config, "routed_scaling_factor", 1.0))  # exports before it: 1.0
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.kind == "norm":
            self.scale = nn.Parameter(torch.ones(1))
        if self.kind == "sigmoid":
            self.register_buffer("expert_bias", torch.zeros(self.n_experts))
        if getattr(config, "router_masked", False):
            self.register_buffer("candidate_mask", torch.ones(self.n_experts, dtype=torch.bool))

    def forward(self, x_TD):
        logits_TE = F.linear(x_TD, self.weight)
        mask_E = getattr(self, "candidate_mask", None)
        if mask_E is not None:  # experts outside the router's window: logit -inf (NormRouter: 0)
            logits_TE = logits_TE.masked_fill(~mask_E, 0.0 if self.kind == "norm" else float("-inf"))
        z = logits_TE.float()
        if self.kind == "norm":
            scores_TE = F.relu(z / (z.norm(dim=-1, keepdim=True) + self.norm_eps)) * self.scale * self.norm_c
        elif self.kind == "sigmoid":
            scores_TE = torch.sigmoid(z)
        else:
            scores_TE = torch.softmax(z, dim=-1)
        if self.kind == "random":
            ids_TK = torch.rand(z.shape, device=z.device).topk(self.top_k, dim=-1).indices
            if self.random_gates == "uniform":
                return logits_TE, ids_TK, torch.full(ids_TK.shape, 1.0 / self.top_k, device=z.device)
            return logits_TE, ids_TK, scores_TE.gather(1, ids_TK)
        select_TE = scores_TE + self.expert_bias if self.kind == "sigmoid" else scores_TE
        if mask_E is not None:
            select_TE = select_TE.masked_fill(~mask_E, float("-inf"))
        ids_TK = select_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, ids_TK)
        # sigmoid: k > 1 only (a single sigmoid gate is its score)
        if self.renormalize and (self.kind == "softmax" or (self.kind == "sigmoid" and self.top_k > 1)):
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.scaling != 1.0:
            weights_TK = weights_TK * self.scaling
        return logits_TE, ids_TK, weights_TK


class UnipoolExperts(nn.Module):
    """E SwiGLU experts in two stacked tensors; callable from any number of layers."""

    def __init__(self, config):
        super().__init__()
        e, d, f = config.num_experts, config.hidden_size, config.expert_hidden
        self.kernel = getattr(config, "expert_kernel", "auto")
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * f, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, f))

    def forward(self, x_TD, ids_TK, weights_TK):
        if self.kernel == "grouped_mm" or (self.kernel == "auto" and self._grouped_mm_pays(x_TD, ids_TK.numel())):
            return self._grouped(x_TD, ids_TK, weights_TK)
        return self._loop(x_TD, ids_TK, weights_TK)

    def _grouped_mm_pays(self, x_TD, n_rows):
        """On a GPU grouped GEMMs always (one kernel per weight, no host sync). On CPU the grouped kernel
        costs ~0.1 ms per call whatever the rows, so a decoding step with a handful of routed rows is
        faster as a loop over the few experts it touches (bench/hf_generate.py: the loop wins below 8 rows,
        grouped GEMMs win 1.2-1.7x from 8 rows up, at 48 and 96 experts)."""
        if not self._grouped_mm_fits(x_TD):
            return False
        return x_TD.device.type != "cpu" or n_rows >= _CPU_GROUPED_MM_MIN_ROWS

    def _grouped_mm_fits(self, x_TD):
        """grouped_mm exists here and its kernel takes these tensors: 16-byte aligned rows; any float
        dtype on CPU (with aligned storage before torch 2.11: memory-mapped weights may not be), bf16
        on sm80+ GPUs."""
        if not _HAS_GROUPED_MM or x_TD.dtype != self.gate_up_proj.dtype:
            return False
        per_16_bytes = 16 // x_TD.element_size()
        if any(n % per_16_bytes for n in self.down_proj.shape[1:]):
            return False
        if x_TD.device.type == "cuda":
            return x_TD.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x_TD.device) >= (8, 0)
        if _CPU_GROUPED_MM_NEEDS_ALIGNED_STORAGE:
            return not any(t.data_ptr() % 16 for t in (x_TD, self.gate_up_proj, self.down_proj))
        return x_TD.device.type == "cpu"

    def _grouped(self, x_TD, ids_TK, weights_TK):
        """Sort the T*K routed rows by expert, run each weight as one grouped GEMM over the segments.
        Rows whose gate is exactly zero (a NormRouter row with every score at zero) sort last, past every
        expert's segment: no GEMM computes them and their output is zero, as it would be after gating."""
        n_tokens, top_k = ids_TK.shape
        n_experts = self.down_proj.shape[0]
        flat_ids_N = torch.where(weights_TK.reshape(-1) == 0, n_experts, ids_TK.reshape(-1))
        order_N = torch.argsort(flat_ids_N, stable=True)
        counts_E = torch.zeros(n_experts + 1, dtype=torch.int32, device=x_TD.device).scatter_add_(
            0, flat_ids_N, torch.ones_like(flat_ids_N, dtype=torch.int32))
        offs_E = counts_E[:n_experts].cumsum(0, dtype=torch.int32)
        gate, up = torch._grouped_mm(x_TD[order_N // top_k], self.gate_up_proj.transpose(1, 2),
                                     offs=offs_E).chunk(2, dim=-1)
        y_ND = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offs_E)
        covered_N1 = (torch.arange(y_ND.shape[0], device=y_ND.device) < offs_E[-1]).unsqueeze(1)
        y_ND = torch.where(covered_N1, y_ND, 0.0)  # the skipped rows hold uninitialised memory
        y_ND = torch.empty_like(y_ND).index_copy(0, order_N, y_ND)  # back to (token, slot) order (out of place: see moe.py)
        gates_TK = weights_TK.to(y_ND.dtype)
        if top_k == 1:
            return y_ND * gates_TK
        return torch.bmm(gates_TK.unsqueeze(1), y_ND.view(n_tokens, top_k, -1)).squeeze(1)

    def _loop(self, x_TD, ids_TK, weights_TK):
        # Accumulate in the input's (the residual stream's) dtype: under autocast F.linear returns bf16
        # while x_TD stays fp32, and index_add_ takes only its own dtype.
        out_TD = torch.zeros_like(x_TD)
        live_TK = weights_TK != 0  # zero-gate rows add nothing: not computed
        for e in ids_TK[live_TK].unique().tolist():
            token_idx, slot = torch.where((ids_TK == e) & live_TK)
            gate, up = F.linear(x_TD[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.down_proj[e])
            out_TD.index_add_(0, token_idx, (y * weights_TK[token_idx, slot, None].to(y.dtype)).to(out_TD.dtype))
        return out_TD


class UnipoolPrivateExpert(nn.Module):
    """A layer's always-on private SwiGLU expert, added with weight 1."""

    def __init__(self, hidden_size, hidden):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden_size, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class UnipoolMoE(nn.Module):
    """The layer's side of the MoE: its router, and its private expert and depth embedding if it has them.
    The routed experts are passed in (they may be shared)."""

    def __init__(self, config):
        super().__init__()
        self.gate = UnipoolRouter(config)
        hidden = getattr(config, "private_hidden", 0)
        self.private_expert = UnipoolPrivateExpert(config.hidden_size, hidden) if hidden else None
        if getattr(config, "depth_embedding", False):
            self.depth_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        else:
            self.depth_embedding = None

    def forward(self, x, experts):
        b, s, d = x.shape
        x_TD = x.reshape(b * s, d)
        logits_TE, ids_TK, weights_TK = self.gate(x_TD)
        experts_in_TD = x_TD if self.depth_embedding is None else x_TD + self.depth_embedding.to(x_TD.dtype)
        y_TD = experts(experts_in_TD, ids_TK, weights_TK)
        if self.private_expert is not None:
            y_TD = y_TD + self.private_expert(x_TD)
        return y_TD.view(b, s, d), logits_TE


class UnipoolDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = UnipoolRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = UnipoolAttention(config, layer_idx)
        self.post_attention_layernorm = UnipoolRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = UnipoolMoE(config)

    def forward(self, x, experts, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        y, logits_TE = self.mlp(self.post_attention_layernorm(x), experts)
        return x + y.type_as(x), logits_TE


class UnipoolPreTrainedModel(PreTrainedModel):
    config_class = UnipoolConfig
    base_model_prefix = "model"
    _no_split_modules = ["UnipoolDecoderLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)  # Linear, Embedding, RMSNorm
        std = self.config.initializer_range
        if isinstance(module, UnipoolExperts):
            _init.normal_(module.gate_up_proj, mean=0.0, std=std)
            _init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, UnipoolRouter):
            _init.normal_(module.weight, mean=0.0, std=std)
            if hasattr(module, "scale"):
                _init.ones_(module.scale)
            if hasattr(module, "expert_bias"):
                _init.zeros_(module.expert_bias)
        elif isinstance(module, UnipoolMoE) and module.depth_embedding is not None:
            _init.zeros_(module.depth_embedding)


class UnipoolModel(UnipoolPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.padded_vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(UnipoolDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.experts = nn.ModuleList(UnipoolExperts(config) for _ in range(config.n_pools))
        self.norm = UnipoolRMSNorm(config.hidden_size, config.rms_norm_eps)
        self._rope = None  # (cos, sin) tables of positions 0..n-1 on one device; not a buffer: never saved or cast
        self.post_init()

    def rope_cos_sin(self, position_ids):
        """cos/sin (B, 1, S, head_dim) of these positions, looked up in float32 tables built once per device
        (and again for positions past the longest table so far)."""
        needed = max(int(position_ids.max()) + 1, self.config.max_position_embeddings)
        if self._rope is None or self._rope[0].device != position_ids.device or self._rope[0].shape[0] < needed:
            self._rope = rope_tables(self.config.head_dim, needed, self.config.rope_base, device=position_ids.device)
        cos, sin = self._rope
        return cos[position_ids][:, None], sin[position_ids][:, None]

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, output_router_logits=False, past_key_values=None, **kwargs):
        _refuse_unsupported_outputs(kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values if cache is None else cache
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        b, s, _ = x.shape
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).unsqueeze(0).expand(b, s)
        cos, sin = self.rope_cos_sin(position_ids)
        mask = self._attention_mask(attention_mask, b, s, past, x.device)

        router_logits = []
        for i, layer in enumerate(self.layers):
            x, logits_TE = layer(x, self.experts[self.config.pool_of_layer(i)], cos, sin, mask, cache)
            router_logits.append(logits_TE)
        return _as_asked(MoeModelOutputWithPast(last_hidden_state=self.norm(x), **{_CACHE_FIELD: cache},
                                                router_logits=tuple(router_logits) if output_router_logits else None),
                         kwargs, self.config)

    @staticmethod
    def _attention_mask(attention_mask, b, s, past, device):
        """None (plain causal attention, as in training) or a boolean (B, 1, S, past + S) mask."""
        padded = attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all())
        if past == 0 and not padded:
            return None
        total = past + s
        q_pos = torch.arange(past, total, device=device)[:, None]
        mask = (torch.arange(total, device=device)[None, :] <= q_pos)[None, None].expand(b, 1, s, total)
        if padded:
            mask = mask & attention_mask[:, None, None, -total:].bool()
            mask = mask | ~mask.any(-1, keepdim=True)  # fully padded query rows: avoid NaN, output unused
        return mask


class UnipoolForCausalLM(UnipoolPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = UnipoolModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_router_logits=None, past_key_values=None, **kwargs):
        _refuse_unsupported_outputs(kwargs)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=past_key_values if cache is None else cache, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, output_router_logits=bool(output_router_logits))
        # Padded vocabulary rows are sliced off, as unipool does.
        logits = self.lm_head(out.last_hidden_state)[..., : self.config.vocab_size]
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return _as_asked(MoeCausalLMOutputWithPast(loss=loss, logits=logits, router_logits=out.router_logits,
                                                   **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)}),
                         kwargs, self.config)
