"""Expert storage and dropless dispatch.

Shape suffixes: T tokens, K experts per token, D model dim, F expert hidden dim, E experts in a pool,
N = T * K routed rows. `w13_EFD` stacks the gate (w1) and up (w3) projections along F, so its F axis
is 2 x the expert hidden size: one grouped GEMM computes both.

An `ExpertPool` is a set of E SwiGLU experts stored as two stacked tensors. The model owns
`n_pools` of them: one per layer (vanilla), one for all layers (UniPool), or one per group of layers.
Whichever layer calls a pool, it is the same tensors, so gradients from every calling layer
accumulate into them.

Dispatch is dropless and has no Python loop over experts: the N = T * K (token, expert) pairs are
sorted by expert, each expert's rows form one contiguous segment, and the experts run as grouped
GEMMs over those segments (`torch._grouped_mm`). Outputs are un-permuted with a gather and combined
with the gates. `moe_reference` is the per-expert loop the fast path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # grouped_mm is not an autocast op: pick the autocast dtype by hand so bf16 autocast runs the
    # expert GEMMs in bf16 like every nn.Linear around them.
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor, *dims: int) -> bool:
    """torch._grouped_mm needs 16-byte aligned row strides, i.e. dims divisible by 16 / itemsize."""
    if not _HAS_GROUPED_MM:
        return False
    per_16_bytes = 16 // torch.empty((), dtype=_compute_dtype(x)).element_size()
    return all(d % per_16_bytes == 0 for d in dims)


def _grouped_linear(x_ND: torch.Tensor, w_EOD: torch.Tensor, offs_E: torch.Tensor,
                    use_grouped_mm: bool) -> torch.Tensor:
    """Row segment e of x (ending at offs_E[e]) times w[e].T, for every expert e."""
    if use_grouped_mm:
        return torch._grouped_mm(x_ND, w_EOD.transpose(-2, -1), offs=offs_E)
    # Fallback without grouped_mm: one GEMM per expert segment (a host sync for the bounds).
    out = x_ND.new_empty(x_ND.shape[0], w_EOD.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        out[start:end] = x_ND[start:end] @ w_EOD[e].T
        start = end
    return out


def moe_dispatch(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t), computed with sort + grouped GEMMs."""
    n_tokens, top_k = expert_ids_TK.shape
    n_experts, hidden = w2_EDF.shape[0], w2_EDF.shape[2]
    dtype = _compute_dtype(x_TD)
    use_gmm = impl == "grouped_mm" or (impl == "auto" and grouped_mm_supported(x_TD, x_TD.shape[1], hidden))

    flat_ids_N = expert_ids_TK.reshape(-1)
    order_N = torch.argsort(flat_ids_N, stable=True)  # routed rows grouped by expert
    counts_E = torch.zeros(n_experts, dtype=torch.int32, device=x_TD.device).scatter_add_(
        0, flat_ids_N, torch.ones_like(flat_ids_N, dtype=torch.int32))
    offs_E = counts_E.cumsum(0, dtype=torch.int32)

    x_ND = x_TD.to(dtype)[order_N // top_k]
    h_N2F = _grouped_linear(x_ND, w13_EFD.to(dtype), offs_E, use_gmm)
    gate_NF, up_NF = h_N2F.split(hidden, dim=-1)
    y_ND = _grouped_linear(F.silu(gate_NF) * up_NF, w2_EDF.to(dtype), offs_E, use_gmm)

    # Un-permute with a gather (deterministic, no atomics): row n of the sorted order came from
    # flat position order_N[n], so flat position j lives at sorted row inverse_N[j].
    inverse_N = torch.empty_like(order_N).scatter_(0, order_N, torch.arange(order_N.numel(), device=x_TD.device))
    y_TKD = y_ND[inverse_N].view(n_tokens, top_k, -1)
    return (y_TKD * weights_TK.to(dtype).unsqueeze(-1)).sum(1)


def moe_reference(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                  w13_EFD: torch.Tensor, w2_EDF: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct per-expert loop: the test reference for `moe_dispatch`."""
    hidden = w2_EDF.shape[2]
    out_TD = torch.zeros_like(x_TD)
    for e in range(w13_EFD.shape[0]):
        token_idx, slot = torch.where(expert_ids_TK == e)
        if token_idx.numel() == 0:
            continue
        h = x_TD[token_idx] @ w13_EFD[e].T
        y = (F.silu(h[:, :hidden]) * h[:, hidden:]) @ w2_EDF[e].T
        out_TD = out_TD.index_add(0, token_idx, y * weights_TK[token_idx, slot].unsqueeze(-1))
    return out_TD


class ExpertPool(nn.Module):
    """E SwiGLU experts (no biases) in two stacked tensors; callable from any number of layers."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, dispatch: str = "auto"):
        super().__init__()
        self.n_experts, self.d_model, self.hidden, self.dispatch = n_experts, d_model, hidden, dispatch
        self.w13_EFD = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.w2_EDF = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        return moe_dispatch(x_TD, expert_ids_TK, weights_TK, self.w13_EFD, self.w2_EDF, self.dispatch)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, hidden={self.hidden}"
