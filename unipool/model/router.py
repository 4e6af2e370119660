"""Per-layer routers and the balancing losses.

Shape suffixes: T tokens, D model dim, E experts seen by the router (pool width), K experts per token.

Routers (one per layer in every mode, `layers.{i}.router`):
- softmax: softmax over all E logits, then top-k; the gate is the probability (optionally
  renormalised over the k picks). The vanilla baseline (Megatron --moe-router-pre-softmax).
- norm: NormRouter (KERN, arXiv 2509.25913; UniPool eq. 7):
      s = sigma * c * relu(z / (||z||_2 + eps)),  z = W h;  top-k on s;  gate = s (no softmax).
  sigma is a learnable per-layer scale (init 1); c makes the picked scores ~unit norm at init.
- sigmoid: sigmoid scores, selection on score + bias where the bias is nudged towards balance
  outside the gradient (DeepSeek's aux-loss-free balancing, arXiv 2408.15664); gate = score.
- random: uniform random top-k per token, for a model trained without a learned choice. Gates are
  1/k ("uniform") or the router's softmax scores at the picked experts ("model"). The routing probe
  does not use this kind: it leaves the router as it is and replaces its output with a forward hook
  (`unipool.analysis.probe.RandomRouting`), so a model carries no probe state.

The balancing losses use `scores_TE` (softmax probabilities, or NormRouter/sigmoid scores):
- Switch loss per layer:  alpha * E * sum_i f_i P_i   with f_i = count_i / (T k), P_i = mean_t s_ti.
- Pool loss (UniPool eqs. 4-6) is computed by the model from every layer's `scores_TE` and the
  f-bar statistics; see `pool_loss`.
Options that are ours, not the paper's (defaults are the paper's; docs/design.md):
- `balance_scores="normalized"`: P_i from each row's scores divided by their sum (`balance_probs`).
- `count_dead_picks=False`: picks whose gate is exactly zero are no load: left out of counts_E and f.
- `scale_param="softplus" | "exp"`: sigma = softplus(raw) or exp(raw), so it cannot cross zero.
- `norm_c="match_gate:<g>"`: c chosen so that the mean sum of picked gates at initialisation is g.
- `scaling` (config `routed_scaling_factor`): softmax/sigmoid gates times a constant, after any
  renormalisation (DeepSeek-V3's routed_scaling_factor); the balancing losses still see the probabilities.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    expert_ids_TK: torch.Tensor  # long, indices into this layer's pool
    weights_TK: torch.Tensor  # gates multiplying each picked expert's output
    scores_TE: torch.Tensor  # per-expert scores used by the balancing losses (with grad)
    counts_E: torch.Tensor  # float, tokens routed to each expert in this call (detached)
    aux_loss: torch.Tensor  # this layer's Switch + z loss (already scaled by coefficients)
    # float scalar, detached: tokens whose picked gates are all exactly zero (their FFN output is 0)
    dead_rows: torch.Tensor | None = None


def norm_router_constant(num_experts: int, top_k: int, n_samples: int = 100_000, seed: int = 42) -> float:
    """c = E_x[1 / ||top_k(relu(x / ||x||))||_2] for x ~ N(0, I_E), by Monte Carlo (UniPool App. H).

    Same estimator and seed as the official code (numpy RandomState(42), 1e5 samples), drawn in
    chunks from one stream so the numbers are identical. Small-E rule: a sample whose entries are
    all negative has no positive score and gives 1/0; the literal estimator is then inf (E=8: about
    1 in 256 samples). We average over samples with a positive score instead, i.e. the expectation
    conditioned on the router picking a non-zero expert. For the pool sizes in the paper no sample
    is all-negative, so the value is exactly the literal estimator's.
    """
    return _norm_router_constant(int(num_experts), int(top_k), int(n_samples), int(seed))


def _gaussian_draws(num_experts: int, n_samples: int, seed: int, chunk: int = 10_000):
    """x ~ N(0, I_E), `n_samples` rows in chunks drawn from one numpy RandomState(seed) stream (the official
    estimator's), so every Monte Carlo estimate below sees the same numbers."""
    rng = np.random.RandomState(seed)
    for start in range(0, n_samples, chunk):
        yield rng.standard_normal((min(chunk, n_samples - start), num_experts))


def _top_k(y: np.ndarray, top_k: int) -> np.ndarray:
    """The k largest entries of each row (unordered)."""
    return -np.partition(-y, top_k - 1, axis=1)[:, :top_k] if top_k < y.shape[1] else y


@functools.lru_cache(maxsize=64)
def _norm_router_constant(num_experts: int, top_k: int, n_samples: int, seed: int) -> float:
    total, kept = 0.0, 0
    for x in _gaussian_draws(num_experts, n_samples, seed):
        y = np.maximum(x / np.linalg.norm(x, axis=1, keepdims=True), 0.0)
        norm = np.sqrt((_top_k(y, top_k) ** 2).sum(axis=1))
        ok = norm > 0
        total += float((1.0 / norm[ok]).sum())
        kept += int(ok.sum())
    return total / kept


@functools.lru_cache(maxsize=64)
def mean_picked_gate_sum(num_experts: int, top_k: int, n_samples: int = 100_000, seed: int = 42) -> float:
    """E_x[sum of top_k(relu(x / ||x||))] for x ~ N(0, I_E): the mean sum of picked NormRouter gates
    at initialisation per unit of c * sigma, from the same draw as `norm_router_constant`.

    Why this is "at initialisation" whatever the init std: z = W h with W's entries i.i.d.
    N(0, std^2) is, for any fixed input h != 0, an isotropic Gaussian N(0, std^2 ||h||^2 I_E), and
    NormRouter divides z by its norm, so the scores' distribution depends neither on the std nor on
    h. All-negative samples count with a gate sum of 0: they are the rows that start dead.
    """
    total = 0.0
    for x in _gaussian_draws(num_experts, n_samples, seed):
        y = np.maximum(x / np.linalg.norm(x, axis=1, keepdims=True), 0.0)
        total += float(_top_k(y, top_k).sum())
    return total / n_samples


def norm_router_c_value(spec: str | float, num_experts: int, top_k: int) -> float:
    """c for a `norm_router_c` setting: "monte_carlo" (the paper's), "one", a number, or
    "match_gate:<g>" (the c that makes the mean sum of picked gates at initialisation g, sigma = 1)."""
    if spec == "monte_carlo":
        return norm_router_constant(num_experts, top_k)
    if spec == "one":
        return 1.0
    if isinstance(spec, str) and spec.startswith("match_gate:"):
        return float(spec.split(":", 1)[1]) / mean_picked_gate_sum(int(num_experts), int(top_k))
    return float(spec)


@functools.lru_cache(maxsize=64)
def mean_picked_softmax_sum(num_experts: int, top_k: int, logit_std: float, renormalize: bool = False,
                            n_samples: int = 100_000, seed: int = 42) -> float:
    """E[sum of the top-k softmax probabilities] for logits ~ N(0, logit_std^2 I_E), by Monte Carlo: a softmax
    router's mean picked-gate sum at initialisation. There logit_std = init_std * sqrt(d_model): the router's
    input is an RMSNorm output (weight 1, so norm sqrt(d)) and its weights are i.i.d. N(0, init_std^2), so for
    any input the logits are N(0, init_std^2 d I) (as for NormRouter, `mean_picked_gate_sum`). Renormalised
    picks sum to 1."""
    if renormalize:
        return 1.0
    total = 0.0
    for x in _gaussian_draws(num_experts, n_samples, seed):
        x = x * logit_std
        p = np.exp(x - x.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        total += float(_top_k(p, top_k).sum())
    return total / n_samples


def routed_scaling_value(spec: str | float, num_experts: int, top_k: int, logit_std: float,
                         renormalize: bool = False) -> float:
    """The factor of a `routed_scaling_factor` setting: a number, or "match_gate:<g>" (a softmax router's
    factor that makes the mean sum of picked gates at initialisation g; see `mean_picked_softmax_sum`)."""
    if isinstance(spec, str) and spec.startswith("match_gate:"):
        gate = mean_picked_softmax_sum(int(num_experts), int(top_k), float(logit_std), bool(renormalize))
        return float(spec.split(":", 1)[1]) / gate
    return float(spec)


def balance_probs(scores_TE: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """P_E of the balancing losses: the mean score per expert over the tokens ("raw", the paper's).

    normalized: each row divided by its sum first, so that shrinking a whole row no longer lowers the
    loss; rows whose scores are all zero (0/0) are left out of the mean, so they neither lower nor
    raise it (ours; for softmax scores it is the raw P up to rounding)."""
    scores_TE = scores_TE.float()
    if not normalized:
        return scores_TE.mean(0)
    sum_T1 = scores_TE.sum(-1, keepdim=True)
    live_T1 = sum_T1 > 0
    probs_TE = torch.where(live_T1, scores_TE / sum_T1.clamp_min(1e-30), 0.0)
    return probs_TE.sum(0) / live_T1.sum().clamp_min(1)


def load_fraction(counts_E: torch.Tensor, n_picks: int, live_only: bool = False) -> torch.Tensor:
    """f_E = count / (T k) (the paper's); live_only: count / (picks with a nonzero gate), for counts
    that leave out the zero-gate picks (`count_dead_picks=False`), so f sums to 1 again."""
    if live_only:
        return counts_E / counts_E.sum().clamp_min(1)
    return counts_E / max(n_picks, 1)


def switch_loss(scores_TE: torch.Tensor, counts_E: torch.Tensor, top_k: int, normalized: bool = False,
                live_only: bool = False, width: torch.Tensor | None = None) -> torch.Tensor:
    """Unscaled Switch load-balancing loss E * sum_i f_i P_i (multiply by alpha outside). `width` replaces
    E (the number of experts the router may pick, as a tensor: no host sync); 1 at an even load over them."""
    n_tokens, n_experts = scores_TE.shape
    f_E = load_fraction(counts_E, n_tokens * top_k, live_only)
    return (n_experts if width is None else width) * (f_E * balance_probs(scores_TE, normalized)).sum()


def pool_loss(scores_LTE: list[torch.Tensor], load_E: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Unscaled pool-level loss M * sum_i fbar_i * Pbar_i (UniPool eq. 6).

    `load_E` is f-bar, the layer-averaged routed fraction per expert (detached); Pbar_i is the mean
    over layers of each layer's P_i (`balance_probs`). The gradient therefore flows only through the
    router scores: into W and sigma, and (like Megatron's aux losses) through each router's input into
    the residual stream, but never directly into the expert weights.
    """
    n_experts = load_E.shape[0]
    p_bar_E = torch.stack([balance_probs(s, normalized) for s in scores_LTE]).mean(0)
    return n_experts * (load_E.detach() * p_bar_E).sum()


def expert_counts(ids_TK: torch.Tensor, n_experts: int, weights_TK: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens routed to each expert (float); with `weights_TK`, only picks whose gate is nonzero.
    Counting by scatter_add keeps the count on the device (no host sync, unlike bincount)."""
    ones = torch.ones(ids_TK.numel(), device=ids_TK.device)
    if weights_TK is not None:
        ones = (weights_TK.reshape(-1) != 0).float()
    return torch.zeros(n_experts, device=ids_TK.device).scatter_add_(0, ids_TK.flatten(), ones)


def dead_row_count(weights_TK: torch.Tensor) -> torch.Tensor:
    """Tokens whose picked gates are all exactly zero (their FFN output is 0), as a detached float scalar
    on the device (no host sync)."""
    return (weights_TK.detach() == 0).all(-1).sum().float()


def random_topk(n_tokens: int, n_experts: int, top_k: int, device: torch.device,
                generator: torch.Generator | None = None,
                candidates_C: torch.Tensor | None = None) -> torch.Tensor:
    """k distinct experts per token, uniformly at random (from `candidates_C` if given)."""
    pool = n_experts if candidates_C is None else candidates_C.numel()
    noise = torch.rand(n_tokens, pool, device=device if generator is None else generator.device,
                       generator=generator).to(device)
    ids_TK = noise.topk(top_k, dim=-1).indices
    return ids_TK if candidates_C is None else candidates_C.to(device)[ids_TK]


# sigma as a function of its parameter, and the parameter value that gives sigma = 1
SCALE_PARAMS = {
    "linear": (lambda p: p, 1.0),  # the paper's: sigma is the parameter
    "softplus": (F.softplus, math.log(math.e - 1.0)),
    "exp": (torch.exp, 0.0),
}


class Router(nn.Module):
    def __init__(self, d_model: int, n_experts: int, top_k: int, kind: str = "softmax", *,
                 renormalize: bool = False, scaling: float = 1.0, norm_c: str | float = "monte_carlo",
                 norm_eps: float = 1e-8,
                 random_gates: str = "uniform", switch_coef: float = 0.0, z_coef: float = 0.0,
                 bias_rate: float = 1e-3, balance_scores: str = "raw", count_dead_picks: bool = True,
                 scale_param: str = "linear", window: int | None = None, masked: bool = False,
                 switch_width: str = "pool"):
        super().__init__()
        self.n_experts, self.top_k, self.kind = n_experts, top_k, kind
        self.renormalize, self.scaling, self.norm_eps = renormalize, float(scaling), norm_eps
        self.switch_coef, self.z_coef, self.bias_rate = switch_coef, z_coef, bias_rate
        self.switch_over_candidates = switch_width == "candidates"  # E of the Switch loss: C, not the pool's
        self.normalized_balance, self.count_dead_picks = balance_scores == "normalized", count_dead_picks
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        self.scale_param = scale_param if kind == "norm" else None
        if kind == "norm":
            # sigma, the learnable routing strength. Linear (the paper's): the parameter `scale` is
            # sigma. Otherwise the parameter is `scale_raw` and sigma = softplus/exp of it: another
            # name, so nothing that reads `scale` as sigma (e.g. the Hugging Face export) misreads it.
            init = torch.full((1,), SCALE_PARAMS[scale_param][1])
            if scale_param == "linear":
                self.scale = nn.Parameter(init)
            else:
                self.scale_raw = nn.Parameter(init)
            # c is the constant of the width the router ends up choosing from (a window's, if it has one).
            self.norm_c = norm_router_c_value(norm_c, window or n_experts, top_k)
        if kind == "sigmoid":
            # Selection-only bias, updated by `update_bias` outside the gradient.
            self.register_buffer("expert_bias", torch.zeros(n_experts), persistent=True)
        if window or masked:
            # The experts this router may pick now (a router window, grown by the model's
            # `set_router_progress`, or a stored mask); saved with the weights so a trained model routes
            # as it trained.
            self.register_buffer("candidate_mask_E", torch.ones(n_experts, dtype=torch.bool), persistent=True)
        # Gates of a model trained with random routing (config `random_gates`); None for learned routing.
        self.random_gates: str | None = random_gates if kind == "random" else None

    def sigma(self) -> torch.Tensor | None:
        """NormRouter's sigma (shape (1,), with grad); None for routers without one."""
        if self.kind != "norm":
            return None
        if self.scale_param == "linear":
            return self.scale
        return SCALE_PARAMS[self.scale_param][0](self.scale_raw)

    @torch.no_grad()
    def reset_scale(self) -> None:
        """sigma = 1, whatever the parametrisation."""
        if self.kind == "norm":
            param = self.scale if self.scale_param == "linear" else self.scale_raw
            param.fill_(SCALE_PARAMS[self.scale_param][1])

    def scores(self, logits_TE: torch.Tensor) -> torch.Tensor:
        logits_TE = logits_TE.float()
        if self.kind == "norm":
            norm_T1 = logits_TE.norm(dim=-1, keepdim=True)
            return F.relu(logits_TE / (norm_T1 + self.norm_eps)) * self.sigma() * self.norm_c
        if self.kind == "sigmoid":
            return torch.sigmoid(logits_TE)
        return torch.softmax(logits_TE, dim=-1)  # softmax and random

    def weights_at(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        """The gates this router gives the experts `ids_TK`: their scores, renormalised over the k
        picks if it renormalises, times its scaling factor. Public because the probe gates random picks
        the same way.

        Sigmoid with k > 1 always renormalises, as the official code (Megatron's
        topk_routing_with_score_function) does: gates / (sum + 1e-20); with k = 1 its gate is the score,
        `renormalize` or not (renormalising one gate would make it 1)."""
        weights_TK = scores_TE.gather(1, ids_TK)
        if self.kind == "sigmoid" and self.top_k > 1:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        elif self.renormalize and self.kind == "softmax":
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.scaling != 1.0:  # skipped at 1.0: the default path stays bit-identical
            weights_TK = weights_TK * self.scaling
        return weights_TK

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        logits_TE = self.gate(x_TD)
        mask_E = getattr(self, "candidate_mask_E", None)
        if mask_E is not None:
            # Experts outside the window get no score: a softmax or sigmoid sees a logit of -inf (the
            # softmax renormalises over the window), NormRouter a logit of 0 (its norm is the window's).
            logits_TE = logits_TE.masked_fill(~mask_E, 0.0 if self.kind == "norm" else -math.inf)
        scores_TE = self.scores(logits_TE)
        if self.kind == "random":
            # No generator: a model trained this way draws from torch's global stream, like dropout.
            ids_TK = random_topk(x_TD.shape[0], self.n_experts, self.top_k, x_TD.device)
        else:
            select_TE = scores_TE + self.expert_bias if self.kind == "sigmoid" else scores_TE
            if mask_E is not None:  # a NormRouter row of zeros must not pick a masked expert in a tie
                select_TE = select_TE.masked_fill(~mask_E, -math.inf)
            ids_TK = select_TE.topk(self.top_k, dim=-1).indices
        if self.random_gates == "uniform":
            weights_TK = torch.full(ids_TK.shape, 1.0 / self.top_k, device=x_TD.device)
        else:
            weights_TK = self.weights_at(scores_TE, ids_TK)

        counts_E = expert_counts(ids_TK, self.n_experts, None if self.count_dead_picks else weights_TK.detach())
        aux = scores_TE.new_zeros(())
        if self.switch_coef > 0:
            width = mask_E.sum() if self.switch_over_candidates and mask_E is not None else None
            aux = aux + self.switch_coef * switch_loss(scores_TE, counts_E, self.top_k, self.normalized_balance,
                                                       live_only=not self.count_dead_picks, width=width)
        if self.z_coef > 0:
            z_TE = logits_TE if mask_E is None else logits_TE.masked_fill(~mask_E, -math.inf)  # candidates only
            aux = aux + self.z_coef * torch.logsumexp(z_TE.float(), dim=-1).square().mean()
        return RouterOutput(ids_TK, weights_TK, scores_TE, counts_E, aux, dead_row_count(weights_TK))

    @torch.no_grad()
    def update_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones.
        Called once per optimizer step with the counts of all its micro-batches and ranks (the
        official cadence; `Unipool.update_router_biases`)."""
        if self.kind == "sigmoid" and self.bias_rate > 0:
            mask_E = getattr(self, "candidate_mask_E", None)
            if mask_E is None:
                self.expert_bias += self.bias_rate * torch.sign(counts_E.mean() - counts_E)
            else:  # balance among the experts this router may pick; a masked one's bias waits, unchanged
                step_E = torch.sign(counts_E[mask_E].float().mean() - counts_E)
                self.expert_bias += self.bias_rate * step_E * mask_E
