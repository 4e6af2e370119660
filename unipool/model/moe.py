"""Expert storage and dropless dispatch.

Shape suffixes: T tokens, K experts per token, D model dim, F expert hidden dim, E experts in a pool,
N = T * K routed rows, R routed rows of all layers that share a pool. `w13_EFD` stacks the gate (w1)
and up (w3) projections along F, so its F axis is 2 x the expert hidden size: one grouped GEMM
computes both.

An `ExpertPool` is a set of E SwiGLU experts stored as two stacked tensors. The model owns
`n_pools` of them: one per layer (vanilla), one for all layers (UniPool), or one per group of layers.
Whichever layer calls a pool, it is the same tensors, so gradients from every calling layer
accumulate into them.

Dispatch is dropless and has no Python loop over experts and no host sync: the N (token, expert)
pairs are sorted by expert, each expert's rows form one contiguous segment, and the experts run as
grouped GEMMs over those segments (`torch._grouped_mm`).

Dead rows are not computed: a routed row whose gate is exactly zero (the tie pick of a NormRouter
token whose scores the ReLU zeroed, or for k > 1 a pick past its positive scores) adds
gate x output = 0, so the sort puts those rows in a trailing segment after the last expert's, which
no GEMM covers (grouped_mm ignores rows past the last offset). Their output rows are set to 0, their
input gradient to 0. Outputs and every parameter gradient are unchanged: the only gradient that
differs is that of the zero gate itself (0 instead of <expert output, output gradient>), and a gate
is exactly 0 only where the function that made it has zero derivative (ReLU at z <= 0, a softmax or
sigmoid that underflowed), so nothing upstream of the gate changes. No host sync: the segment's
length stays on the device. (The exception would be sigma = 0 exactly in a linear-parametrised
NormRouter; training refuses sigma <= 0.) `ExpertPool.skip_dead_rows` (default on) switches it off
for benchmarks.

`_Experts` is a hand-written autograd
Function for gather -> SwiGLU experts -> un-permute: it saves only the layer input and the
gate/up activations (autograd would also keep the gathered rows and the SwiGLU intermediates), and it
can defer its weight gradients. `moe_reference` is the per-expert loop the fast path is tested against.

Fused pool weight gradient (`ExpertPool.defer_wgrad`): when L layers share one pool, computing each
layer's weight gradient as it comes means L grouped GEMMs with tokens/E rows per expert, each
followed by a read-modify-write of the whole pool gradient, so the pool moves through memory L
times (performance.md: 6-12x slower than the GEMMs need). Instead every layer's backward stashes
its (rows, output-gradient) pairs, and `_DeferredWGradSink`, an identity applied to the pool
weights once per forward, in the first layer's call before it uses them, runs after every layer's
backward (autograd only runs a node once all its consumers are done) and computes each weight's
gradient as ONE grouped GEMM over all layers' rows sorted by expert: grad_w[e] = X_e^T dY_e. The
first call's inputs pass through the same identity, so a backward hook on them (FSDP2 reduces a
module's gradients when the gradients of its inputs are ready) fires after the fused gradient exists.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")
DISPATCH = ("auto", "grouped_mm", "loop")  # auto: grouped_mm where the shapes allow it, else the loop


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


# grouped_mm's compile (meta) kernel accepts only bf16; fp32 runs outside the graph.
_grouped_mm_eager = torch.compiler.disable(torch._grouped_mm) if _HAS_GROUPED_MM else None


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = torch._grouped_mm if a.dtype == torch.bfloat16 else _grouped_mm_eager
    return fn(a, b, offs=offs)


def _segment_mm(x_NI: torch.Tensor, w_EIO: torch.Tensor, offs_E: torch.Tensor, use_gmm: bool) -> torch.Tensor:
    """Row segment e of x (ending at offs_E[e]) times w[e], for every expert e: (N, O)."""
    if use_gmm:
        return _grouped_mm(x_NI, w_EIO, offs_E)
    # Fallback without grouped_mm: one GEMM per expert segment (a host sync for the bounds).
    out = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[2])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        out[start:end] = x_NI[start:end] @ w_EIO[e]
        start = end
    return out


def _segment_wgrad(dy_NO: torch.Tensor, x_NI: torch.Tensor, offs_E: torch.Tensor, use_gmm: bool) -> torch.Tensor:
    """Per-expert weight gradient dy_e^T x_e over row segments: (E, O, I); empty segments give 0."""
    if use_gmm:  # the 2-D x 2-D form: offs split the contraction (row) axis
        return _grouped_mm(dy_NO.t(), x_NI, offs_E)
    out = x_NI.new_zeros(offs_E.shape[0], dy_NO.shape[1], x_NI.shape[1])
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        out[e] = dy_NO[start:end].t() @ x_NI[start:end]
        start = end
    return out


class _Experts(torch.autograd.Function):
    """y_flat[order[n]] = expert_{e(n)}(x[order[n] // K]) for sorted row n (expert e(n) by offs).

    Returns the expert outputs in flat (token, slot) order, un-gated. With a `sink`, backward
    returns no weight gradients and stashes what they need in the sink instead.
    """

    @staticmethod
    def forward(ctx, x_TD, w13_EFD, w2_EDF, order_N, offs_E, top_k, use_gmm, sink, dead_tail=False):
        token_N = order_N // top_k if top_k > 1 else order_N
        h_N2F = _segment_mm(x_TD[token_N], w13_EFD.transpose(1, 2), offs_E, use_gmm)
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        y_ND = _segment_mm(F.silu(gate_NF) * up_NF, w2_EDF.transpose(1, 2), offs_E, use_gmm)
        if dead_tail:  # rows past the last expert's segment were not computed (uninitialised memory)
            y_ND = torch.where(_covered(offs_E, y_ND.shape[0]), y_ND, 0.0)
        ctx.save_for_backward(x_TD, w13_EFD, w2_EDF, order_N, offs_E, h_N2F)
        ctx.top_k, ctx.use_gmm, ctx.sink, ctx.dead_tail = top_k, use_gmm, sink, dead_tail
        # Un-permute with a scatter by a permutation (deterministic, no atomics). Out of place: torch
        # 2.11's compile loses the backward of an in-place copy into a fresh tensor returned from here (every
        # input gradient came back zero in bf16).
        return torch.empty_like(y_ND).index_copy(0, order_N, y_ND)

    @staticmethod
    def backward(ctx, dy_flat_ND):
        x_TD, w13_EFD, w2_EDF, order_N, offs_E, h_N2F = ctx.saved_tensors
        top_k, use_gmm, sink = ctx.top_k, ctx.use_gmm, ctx.sink
        token_N = order_N // top_k if top_k > 1 else order_N
        dy_ND = dy_flat_ND[order_N]
        gate_NF, up_NF = h_N2F.chunk(2, dim=-1)
        silu_NF = F.silu(gate_NF)
        da_NF = _segment_mm(dy_ND, w2_EDF, offs_E, use_gmm)
        dh_N2F = torch.cat([torch.ops.aten.silu_backward(da_NF * up_NF, gate_NF), da_NF * silu_NF], dim=-1)
        dx_ND = _segment_mm(dh_N2F, w13_EFD, offs_E, use_gmm)
        if ctx.dead_tail:  # dead rows: no input gradient (the weight-gradient GEMMs stop at offs_E[-1])
            dx_ND = torch.where(_covered(offs_E, dx_ND.shape[0]), dx_ND, 0.0)
        # Back to token order: each token's K rows sum in a fixed order (deterministic).
        dx_TD = torch.empty_like(dx_ND).index_copy(0, order_N, dx_ND)
        if top_k > 1:
            dx_TD = dx_TD.view(-1, top_k, dx_TD.shape[-1]).sum(1)

        x_ND, a_NF = x_TD[token_N], silu_NF * up_NF
        if sink is not None:
            sink.stash.append((offs_E, x_ND, dh_N2F, a_NF, dy_ND))
            return dx_TD, None, None, None, None, None, None, None, None
        dw13 = _segment_wgrad(dh_N2F, x_ND, offs_E, use_gmm)
        dw2 = _segment_wgrad(dy_ND, a_NF, offs_E, use_gmm)
        return dx_TD, dw13, dw2, None, None, None, None, None, None


def _covered(offs_E: torch.Tensor, n_rows: int) -> torch.Tensor:
    """(N, 1) mask of the sorted rows some expert's segment covers (row < offs_E[-1]), on the device."""
    return (torch.arange(n_rows, device=offs_E.device) < offs_E[-1]).unsqueeze(1)


class _DeferredWGradSink(torch.autograd.Function):
    """Identity (plus the cast to the compute dtype, once per forward) on the pool weights and on the
    first calling layer's inputs; its backward runs after every layer's and turns the stashed rows into
    the real gradients.

    The inputs pass through so that whatever hooks them in backward (FSDP2's post-backward reduce of
    the pool's gradients) runs after this, the last node to touch the pool, and not before."""

    @staticmethod
    def forward(ctx, w13_EFD, w2_EDF, deferred, dtype, *inputs):
        # A weak reference: `deferred` holds this node's outputs (the bound weights), so a strong one
        # would close a cycle through the autograd graph that Python's collector cannot see, and every
        # step would leave its bound weights (under autocast a fresh copy of the pool) behind. The
        # layers' `_Experts` nodes hold `deferred` strongly for as long as the graph lives.
        ctx.deferred, ctx.dtypes = weakref.ref(deferred), (w13_EFD.dtype, w2_EDF.dtype)
        ctx.set_materialize_grads(False)  # layers return None: no pool-sized zeros
        return (w13_EFD.to(dtype).view_as(w13_EFD), w2_EDF.to(dtype).view_as(w2_EDF),
                *(t.view_as(t) for t in inputs))

    @staticmethod
    def backward(ctx, dw13_in, dw2_in, *d_inputs):
        deferred = ctx.deferred()
        dw13, dw2 = (None, None) if deferred is None else deferred.fused_wgrad()
        if dw13 is None:  # no layer contributed
            dw13, dw2 = dw13_in, dw2_in
        else:
            dw13, dw2 = dw13.to(ctx.dtypes[0]), dw2.to(ctx.dtypes[1])
            # Any other use of the weights (none in the model) adds up as usual.
            dw13 = dw13 if dw13_in is None else dw13 + dw13_in
            dw2 = dw2 if dw2_in is None else dw2 + dw2_in
        return dw13, dw2, None, None, *d_inputs


# With a deferred weight gradient the backward has a side effect (the stash) that a traced graph
# would run once at trace time: under torch.compile these calls run eagerly (graph breaks).
@torch.compiler.disable
def _experts_deferred(*args):
    return _Experts.apply(*args)


@torch.compiler.disable
def _bind(deferred: "DeferredWGrad", pool: "ExpertPool", x_TD: torch.Tensor, weights_TK: torch.Tensor):
    """The pool weights of this forward (the first call binds them) and the call's inputs."""
    if deferred.w13_EFD is not None:
        return deferred.w13_EFD, deferred.w2_EDF, x_TD, weights_TK
    grad_inputs = [t for t in (x_TD, weights_TK) if t.requires_grad]
    w13, w2, *passed = _DeferredWGradSink.apply(pool.w13_EFD, pool.w2_EDF, deferred, deferred.dtype, *grad_inputs)
    deferred.w13_EFD, deferred.w2_EDF = w13, w2
    passed = iter(passed)
    x_TD = next(passed) if x_TD.requires_grad else x_TD
    weights_TK = next(passed) if weights_TK.requires_grad else weights_TK
    return w13, w2, x_TD, weights_TK


def _sorted_into_experts(offs_LE: torch.Tensor, n_rows: list[int]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Destination rows that merge L expert-sorted row blocks into one, ordered by (expert, layer).

    Layer l's sorted row n (expert e, rank r within the segment) goes to
    start[e] + rows of e in layers < l + r. Returns the per-layer indices and the merged offsets.
    """
    counts_LE = torch.diff(offs_LE, dim=1, prepend=offs_LE.new_zeros(offs_LE.shape[0], 1))
    offs_E = counts_LE.sum(0).cumsum(0)
    before_LE = (offs_E - counts_LE.sum(0)) + (counts_LE.cumsum(0) - counts_LE)  # merged start of (l, e)
    shift_LE = before_LE - (offs_LE - counts_LE)  # merged start minus the layer's own segment start
    dest = []
    for layer, n in enumerate(n_rows):
        rows_N = torch.arange(n, device=offs_LE.device)
        expert_N = torch.searchsorted(offs_LE[layer], rows_N, right=True)  # no sync, no stored ids
        dest.append(shift_LE[layer][expert_N] + rows_N)
    return dest, offs_E.to(torch.int32)


class DeferredWGrad:
    """One forward's view of an ExpertPool whose weight gradients are computed at the end of backward.

    Call it like the pool. Created by `ExpertPool.defer_wgrad(x)` once per forward. The weights are
    bound inside the pool's first call (`_bind`), where a wrapper that shards the pool (FSDP2) has
    gathered them; later calls, an activation-checkpointed layer's recomputation included, reuse them.
    """

    def __init__(self, pool: "ExpertPool", dtype: torch.dtype):
        self.pool, self.dtype = pool, dtype
        self.stash: list[tuple[torch.Tensor, ...]] = []
        self.w13_EFD: torch.Tensor | None = None
        self.w2_EDF: torch.Tensor | None = None

    def __call__(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        return self.pool(x_TD, expert_ids_TK, weights_TK, deferred=self)

    def fused_wgrad(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Both weight gradients from the stash, each as one grouped GEMM over all layers' rows."""
        if not self.stash:
            return None, None
        stash, self.stash = self.stash, []
        n_rows = [s[1].shape[0] for s in stash]
        # Each layer's dead rows (past its last offset) form one more segment, merged last: the GEMMs
        # below cover only the first E segments.
        offs_LE = torch.stack([s[0] for s in stash])
        offs_LE = torch.cat([offs_LE, torch.tensor(n_rows, dtype=offs_LE.dtype, device=offs_LE.device)[:, None]], 1)
        dest, offs_E = _sorted_into_experts(offs_LE, n_rows)
        offs_E = offs_E[:-1]
        use_gmm = self.pool.dispatch != "loop" and grouped_mm_supported(stash[0][1], self.pool.d_model,
                                                                         self.pool.hidden)

        def merged(i: int) -> torch.Tensor:
            # Copy one stashed tensor of every layer into expert order, freeing the stash as it goes.
            first = stash[0][i]
            out = first.new_empty(sum(s[i].shape[0] for s in stash), first.shape[1])
            for layer in range(len(stash)):
                out.index_copy_(0, dest[layer], stash[layer][i])
                stash[layer] = stash[layer][:i] + (None,) + stash[layer][i + 1:]
            return out

        dw13 = _segment_wgrad(merged(2), merged(1), offs_E, use_gmm)  # dh^T x: (E, 2F, D)
        dw2 = _segment_wgrad(merged(4), merged(3), offs_E, use_gmm)  # dy^T a: (E, D, F)
        return dw13, dw2


def moe_dispatch(x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                 w13_EFD: torch.Tensor, w2_EDF: torch.Tensor, impl: str = "auto",
                 deferred: DeferredWGrad | None = None, skip_dead_rows: bool = True) -> torch.Tensor:
    """y_t = sum_k weights[t, k] * expert_{ids[t, k]}(x_t), computed with sort + grouped GEMMs.

    With `deferred`, the weight gradients are left to `deferred` (see DeferredWGrad) and w13/w2 must
    be its weights. skip_dead_rows: rows whose gate is exactly 0 run no expert (module docstring).
    """
    n_tokens, top_k = expert_ids_TK.shape
    n_experts, hidden = w2_EDF.shape[0], w2_EDF.shape[2]
    dtype = _compute_dtype(x_TD)
    use_gmm = impl == "grouped_mm" or (impl == "auto" and grouped_mm_supported(x_TD, x_TD.shape[1], hidden))

    flat_ids_N = expert_ids_TK.reshape(-1)
    if skip_dead_rows:  # zero-gate rows sort as a virtual expert E, after every real one
        flat_ids_N = torch.where(weights_TK.reshape(-1) == 0, n_experts, flat_ids_N)
    order_N = torch.argsort(flat_ids_N, stable=True)  # routed rows grouped by expert
    # scatter_add keeps the counts on the device (bincount syncs with the host on CUDA).
    counts_E = torch.zeros(n_experts + 1, dtype=torch.int32, device=x_TD.device).scatter_add_(
        0, flat_ids_N, torch.ones_like(flat_ids_N, dtype=torch.int32))
    offs_E = counts_E[:n_experts].cumsum(0, dtype=torch.int32)

    experts = _Experts.apply if deferred is None else _experts_deferred
    y_ND = experts(x_TD.to(dtype), w13_EFD.to(dtype), w2_EDF.to(dtype), order_N, offs_E, top_k, use_gmm, deferred,
                   skip_dead_rows)
    gates_TK = weights_TK.to(dtype)
    if top_k == 1:
        return y_ND * gates_TK
    return torch.bmm(gates_TK.unsqueeze(1), y_ND.view(n_tokens, top_k, -1)).squeeze(1)


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
        self.skip_dead_rows = True  # zero-gate rows run no expert (exact; off only to measure the saving)
        self.w13_EFD = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))
        self.w2_EDF = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def forward(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor, weights_TK: torch.Tensor,
                deferred: DeferredWGrad | None = None) -> torch.Tensor:
        w13, w2 = self.w13_EFD, self.w2_EDF
        if deferred is not None:
            w13, w2, x_TD, weights_TK = _bind(deferred, self, x_TD, weights_TK)
        return moe_dispatch(x_TD, expert_ids_TK, weights_TK, w13, w2, self.dispatch, deferred, self.skip_dead_rows)

    def defer_wgrad(self, x: torch.Tensor) -> DeferredWGrad:
        """A view of this pool for one forward whose weight gradients are fused over all calls
        (`x`: any activation, for the compute dtype under autocast)."""
        return DeferredWGrad(self, _compute_dtype(x))

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, d_model={self.d_model}, hidden={self.hidden}"
