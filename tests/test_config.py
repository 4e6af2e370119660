import json

import pytest

from unipool.cli import main
from unipool.model.config import ConfigError, ModelConfig
from unipool.presets import PRESETS, get_preset


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(top_k=9, num_experts=8), "top_k"),
        (dict(num_experts=0), "num_experts"),
        (dict(d_model=100, n_heads=12), "n_heads"),
        (dict(granularity=5), "granularity"),
        (dict(n_kv_heads=5), "n_kv_heads"),
        (dict(moe_mode="grouped", n_groups=5), "n_groups"),
        (dict(moe_mode="shared"), "moe_mode"),
        (dict(router="topk"), "router"),
        (dict(norm_router_c="big"), "norm_router_c"),
        (dict(pool_loss_coef=-1.0), "pool_loss_coef"),
        # a field another setting would ignore: refused, so a run trains what it says
        (dict(moe_mode="pool", n_groups=4), "n_groups"),
        (dict(moe_mode="layerwise", n_groups=2), "n_groups"),
        (dict(router="norm", renormalize=True), "renormalize"),
        (dict(router="random", renormalize=True), "renormalize"),
        (dict(router_window=0, router_window_warmup=0.5), "router_window_warmup"),
        (dict(router="random"), "pool_loss_coef"),  # debug's pool loss 0.01: nothing would read the scores
        (dict(random_gates="model"), "random_gates"),  # a NormRouter: no random gates to take
        (dict(router="random", pool_loss_coef=0.0, z_loss_coef=1e-3), "z_loss_coef"),
    ],
)
def test_bad_config_fails_at_construction_naming_the_field(changes, field):
    with pytest.raises(ConfigError) as e:
        get_preset("debug").replace(**changes)
    msg = str(e.value)
    assert f"model.{field}" in msg and "\n" not in msg


def test_unknown_field_and_preset_are_one_line_errors():
    with pytest.raises(ConfigError, match="unknown field"):
        ModelConfig.from_dict({**get_preset("debug").to_dict(), "pool_sise": 3})
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("nope")


def test_config_round_trips_through_json():
    for name, preset in PRESETS.items():
        assert ModelConfig.from_dict(json.loads(preset.model.to_json())) == preset.model, name


def test_mode_layout():
    cfg = get_preset("unipool-182m")
    assert (cfg.n_pools, cfg.num_experts, cfg.layers_per_pool) == (1, 96, 12)
    cfg = get_preset("vanilla-182m")
    assert (cfg.n_pools, cfg.num_experts, cfg.pool_of_layer(5)) == (12, 8, 5)
    cfg = get_preset("unipool-182m-g4")
    assert (cfg.n_pools, cfg.num_experts) == (4, 24)
    assert [cfg.pool_of_layer(i) for i in range(12)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    fine = cfg.replace(granularity=4)
    assert (fine.n_routed_experts, fine.routed_top_k, fine.expert_hidden) == (96, 4, 768)


def test_cli_bad_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps({"model": {**get_preset("debug").to_dict(), "top_k": 100}}))
    assert main(["params", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.top_k") and "\n" not in err
    assert main(["params", "--config", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_budget_named_last_wins():
    """A preset counts steps; `--train.tokens N` on top of it trains N tokens (naming one budget resets the
    other), and a single layer naming both is a one-line error instead of steps silently winning."""
    import argparse

    from unipool.config import add_config_args, apply_dict, preset_config, resolve_config

    base = preset_config("unipool-182m")
    assert base.train.steps == 10_000 and base.train.tokens == 0
    p = argparse.ArgumentParser()
    add_config_args(p)
    run = resolve_config(p.parse_args(["--preset", "unipool-182m", "--train.tokens", "2000000000"]))
    assert (run.train.steps, run.train.tokens) == (0, 2_000_000_000)
    assert run.train.total_steps(64 * 8 * 1024) == 3815  # ceil(2e9 / 524,288)
    back = apply_dict(run, {"train": {"steps": 500}})
    assert (back.train.steps, back.train.tokens) == (500, 0)
    with pytest.raises(ConfigError) as e:
        apply_dict(base, {"train": {"steps": 100, "tokens": 1000}})
    assert "train.tokens" in str(e.value) and "both set" in str(e.value) and "\n" not in str(e.value)
    assert apply_dict(base, {"train": {"steps": 0, "tokens": 1000}}).train.tokens == 1000  # both named, one 0


def _args(*argv):
    import argparse

    from unipool.config import add_config_args

    p = argparse.ArgumentParser()
    add_config_args(p)
    return p.parse_args(list(argv))


@pytest.mark.parametrize("changes, message", [
    (dict(log_interval=0), "train.log_interval: must be a positive integer"),
    (dict(seed=-1), "train.seed: must be >= 0"),
    (dict(log_interval=10, routing_interval=15), "train.routing_interval: must be 0 or a multiple of train.log_interval (10)"),
])
def test_train_values_the_loop_cannot_use_are_refused_before_anything_runs(changes, message):
    import dataclasses

    from unipool.config import preset_config

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        dataclasses.replace(preset_config("debug").train, **changes)


def test_a_config_files_preset_is_its_base_and_the_command_lines_preset_wins(tmp_path):
    from unipool.config import preset_config, resolve_config

    f = tmp_path / "c.yaml"
    f.write_text("preset: unipool-182m\ntrain:\n  lr: 3.0e-4\n")
    run = resolve_config(_args("--config", str(f)))
    want = preset_config("unipool-182m")
    assert run.model == want.model and run.train.steps == want.train.steps and run.train.lr == 3e-4
    assert resolve_config(_args("--config", str(f), "--preset", "debug")).model == get_preset("debug")
    f.write_text("preset: custom\ntrain:\n  lr: 3.0e-4\n")  # a saved run's label: no base of its own
    assert resolve_config(_args("--config", str(f))).model == preset_config("demo").model
    f.write_text("preset: unipool-182M\n")
    with pytest.raises(ConfigError, match="unknown preset 'unipool-182M'"):
        resolve_config(_args("--config", str(f)))


def test_resume_with_its_own_preset_keeps_the_tokenizers_vocabulary():
    from unipool.config import preset_config, resolve_config, resume_incompatibilities

    saved = preset_config("debug")
    saved = saved.replace(model=saved.model.replace(vocab_size=320))  # bpe:320, not the preset's vocabulary
    again = resolve_config(_args("--preset", "debug"), resumed=saved)
    assert resume_incompatibilities(saved, again) == []
    other = resolve_config(_args("--preset", "demo-vanilla"), resumed=saved)
    assert "model.moe_mode" in resume_incompatibilities(saved, other)


def test_explicit_fields_are_what_the_command_line_names(tmp_path):
    from unipool.config import explicit_fields

    f = tmp_path / "c.yaml"
    f.write_text("model:\n  z_loss_coef: 0.001\n  dispatch: loop\ntrain:\n  lr: 0.1\n")  # dispatch: an old exec field
    args = _args("--config", str(f), "--set", "model.pool-loss-coef=0.5", "--model.router-window-warmup", "0.3",
                 "--train.lr", "0.2")
    assert explicit_fields(args, "model") == {"z_loss_coef": 0.001, "pool_loss_coef": "0.5",
                                              "router_window_warmup": "0.3"}


def test_the_fields_another_setting_uses_are_accepted_where_they_apply():
    base = get_preset("debug")  # pool, NormRouter, 2 layers
    assert base.replace(moe_mode="grouped", n_groups=2).n_pools == 2
    assert base.replace(router="softmax", renormalize=True).renormalize
    assert base.replace(router="sigmoid", renormalize=True).renormalize
    assert base.replace(router_window=1, router_window_warmup=0.5).router_window_warmup == 0.5
    assert base.replace(router="random", random_gates="model").pool_loss_coef == 0.01  # gates read the scores
    assert base.replace(router="random", pool_loss_coef=0.0).router == "random"


def test_fields_changed_together_by_several_layers_are_checked_together(tmp_path):
    """A check across fields applies to the command line's result, not to a state between two --set flags."""
    from unipool.config import resolve_config

    window = ["--set", "model.n_layers=4", "--set", "model.router_window=2", "--set", "model.router_window_warmup=0.5"]
    assert resolve_config(_args("--preset", "debug", *window)).model.router_window_warmup == 0.5
    # switching the window off: the first --set alone would leave a warmup without a window
    off = resolve_config(_args("--preset", "debug", *window, "--set", "model.router_window=0",
                               "--set", "model.router_window_warmup=0"))
    assert off.model.router_window == 0 and off.model.router_window_warmup == 0
    # a config file and a flag: the same
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  moe_mode: grouped\n  n_groups: 2\n")
    run = resolve_config(_args("--preset", "debug", "--config", str(f), "--set", "model.moe_mode=pool",
                               "--set", "model.n_groups=1"))
    assert run.model.moe_mode == "pool" and run.model.n_groups == 1
    # what is still wrong at the end is refused, naming the field
    with pytest.raises(ConfigError, match="model.router_window_warmup: needs a router_window"):
        resolve_config(_args("--preset", "debug", *window, "--set", "model.router_window=0"))
