"""Parameter counts against the UniPool paper (Tables 6 and 8), built on the meta device."""

import json

import pytest

from unipool.cli import main
from unipool.model.params import param_report
from unipool.presets import get_preset

# scale: (total params as printed, dense-equivalent "active" params as printed, expert params)
PAPER = {
    "182m": ("777.9M", "182.5M", "679.5M"),
    "469m": ("2.588B", "469.8M", "2.416B"),
    "650m": ("3.834B", "652.3M", "3.624B"),
    "830m": ("5.081B", "834.8M", "4.832B"),
    "978m": ("5.742B", "978.4M", "5.436B"),
}


def fmt(n: int, like: str) -> str:
    return f"{n / 1e9:.3f}B" if like.endswith("B") else f"{n / 1e6:.1f}M"


@pytest.mark.parametrize("scale", PAPER)
def test_paper_totals_and_active_counts(scale):
    total, active, experts = PAPER[scale]
    uni = param_report(get_preset(f"unipool-{scale}"))
    van = param_report(get_preset(f"vanilla-{scale}"))
    # The paper's totals are the UniPool models (each router has M outputs).
    assert fmt(uni["total"], total) == total
    assert fmt(uni["dense_equivalent"], active) == active
    assert fmt(van["dense_equivalent"], active) == active
    assert fmt(uni["experts"], experts) == fmt(van["experts"], experts) == experts
    # Vanilla differs only in router width: L * d * (M - 8) weights and the L NormRouter scales.
    cfg = get_preset(f"unipool-{scale}")
    assert uni["total"] - van["total"] == cfg.n_layers * cfg.d_model * (cfg.num_experts - 8) + cfg.n_layers
    assert uni["expert_budget_vs_matched_vanilla"] == van["expert_budget_vs_matched_vanilla"] == 1.0


def test_reduced_pool_budgets():
    assert param_report(get_preset("unipool-182m-m64"))["expert_budget_vs_matched_vanilla"] == pytest.approx(2 / 3)
    assert param_report(get_preset("unipool-182m-m48"))["expert_budget_vs_matched_vanilla"] == pytest.approx(0.5)
    assert param_report(get_preset("unipool-830m-m160"))["expert_budget_vs_matched_vanilla"] == pytest.approx(160 / 384)
    assert param_report(get_preset("unipool-182m-g4"))["expert_budget_vs_matched_vanilla"] == pytest.approx(1.0)


def test_fine_grained_keeps_active_params_and_flops():
    for mode in ("unipool-182m", "vanilla-182m", "unipool-182m-g2"):
        base = get_preset(mode)
        fine = base.replace(granularity=2)
        a, b = param_report(base), param_report(fine)
        assert a["experts"] == b["experts"]
        # Routers widen with the split (E*g outputs), everything else active is identical.
        router_growth = base.n_layers * base.d_model * base.num_experts
        assert b["active"] - a["active"] == router_growth
        assert a["dense_equivalent"] == b["dense_equivalent"]
        flops = lambda c: c.routed_top_k * 3 * 2 * c.d_model * c.expert_hidden  # noqa: E731
        assert flops(base) == flops(fine)


def test_params_cli_json(capsys):
    assert main(["params", "--preset", "unipool-978m", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == 5_741_815_320 and out["n_pools"] == 1 and out["experts_per_pool"] == 192
