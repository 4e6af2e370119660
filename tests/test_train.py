"""`unipool train`: end to end through the CLI, exact resume after an interrupt, config errors."""

import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from unipool import cli
from unipool.analysis.routing import load_stats
from unipool.config import ConfigError, DataConfig, apply_override, preset_config
from unipool.data.dataset import WindowSampler
from unipool.model.config import ModelConfig
from unipool.train.loop import lr_at, param_groups
from unipool.weights import load_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "prepared"


def debug_args(corpus: Path, data_dir: Path, out: Path, name: str, *extra: str) -> list[str]:
    return ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:320",
            "--data.data-dir", str(data_dir), "--train.out-dir", str(out), "--train.run-name", name,
            "--train.progress", "false", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--train.sample-tokens", "4", "--train.eval-tokens", "256", *extra]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_end_to_end(corpus, data_dir, tmp_path, capsys):
    rc = cli.main(debug_args(corpus, data_dir, tmp_path, "e2e", "--train.steps", "4", "--train.log-interval", "2",
                             "--train.eval-interval", "2", "--train.routing-interval", "2",
                             "--train.tensorboard", "true"))
    assert rc == 0
    run = tmp_path / "e2e"
    captured = capsys.readouterr()
    assert "validation loss" in captured.out and "unigram baseline" in captured.out and f"run directory: {run}" in captured.out
    try:
        import tensorboard  # noqa: F401

        assert any((run / "tensorboard").iterdir())
    except ImportError:  # optional extra: training goes on with metrics.jsonl only
        assert "tensorboard is not installed" in captured.err

    cfg = json.loads((run / "config.json").read_text())
    model_cfg = ModelConfig.from_dict(cfg["model"])
    assert cfg["train"]["steps"] == 4 and cfg["data"]["tokenizer"] == "bpe:320"
    assert model_cfg.vocab_size == json.loads((Path(cfg["data"]["data_dir"]) / "index.json").read_text())["vocab_size"]

    lines = read_metrics(run)
    assert all("step" in r and "tokens" in r for r in lines)
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    assert train_lines[-1]["tokens"] == 4 * 4 * 32
    routing = train_lines[-1]["routing"]
    assert len(routing["load_LE"]) == model_cfg.n_layers and len(routing["load_LE"][0]) == model_cfg.num_experts
    assert [r["step"] for r in lines if "val_loss" in r] == [2, 4]

    model, meta = load_model(run)
    assert meta["step"] == 4 and model.config == model_cfg
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_loss", "val_ppl", "unigram_loss", "tok_per_s", "peak_rss_mb", "wall_time_s", "sample"):
        assert key in summary
    assert summary["val_loss"] == [r for r in lines if "val_loss" in r][-1]["val_loss"]


def test_interrupt_then_resume_is_exact(corpus, data_dir, tmp_path, monkeypatch):
    """6 steps straight == 3 steps, Ctrl-C (checkpoint), resume, 3 more: identical losses (fp32, CPU)."""
    common = ["--train.steps", "6", "--train.grad-accum", "2", "--train.log-interval", "1",
              "--train.eval-interval", "3", "--train.ckpt-interval", "100", "--train.precision", "fp32"]
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "straight", *common)) == 0

    original = WindowSampler.next_batch

    def next_batch(self):
        if self.step == 4:  # first micro-batch of step 3: Ctrl-C arrives mid-step
            os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(WindowSampler, "next_batch", next_batch)
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "split", *common)) == 130
    run = tmp_path / "split"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000003"
    monkeypatch.setattr(WindowSampler, "next_batch", original)
    assert cli.main(["train", "--resume", str(run), "--train.progress", "false"]) == 0

    straight, split = read_metrics(tmp_path / "straight"), read_metrics(run)
    assert [r["step"] for r in split if "loss" in r] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "aux_loss", "grad_norm", "val_loss"):
        assert [r[key] for r in straight if key in r] == [r[key] for r in split if key in r], key
    a, _ = load_model(tmp_path / "straight")
    b, _ = load_model(run)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_signal_in_the_last_step_completes_the_run_and_is_reported(corpus, data_dir, tmp_path, monkeypatch):
    """SIGTERM during the last step: the run finishes normally (exit 0, final checkpoint, summary), and the
    summary names the signal, so a caller running several trainings in one process can stop too."""
    common = ["--train.steps", "3", "--train.grad-accum", "2", "--train.log-interval", "1",
              "--train.eval-interval", "0", "--train.ckpt-interval", "100", "--train.precision", "fp32"]
    original = WindowSampler.next_batch

    def next_batch(self):
        if self.step == 4:  # first micro-batch of step 3 of 3
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self)

    monkeypatch.setattr(WindowSampler, "next_batch", next_batch)
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "last", *common)) == 0
    run = tmp_path / "last"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["signal"] == "SIGTERM" and summary["interrupted"] is False and summary["step"] == 3
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000003"


def test_cli_errors_are_one_line(corpus, data_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("optimizer: {lr: 1}\n")
    cases = [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.bogus=1"], "unknown field(s) bogus"),
        (["--model.num-experts", "many"], "model.num_experts: expected int"),
        (["--config", str(bad_yaml)], "unknown section(s) optimizer"),
        (["--data.sources", str(tmp_path / "missing.txt")], "no such file"),
        (["--data.sources", str(empty), "--data.data-dir", str(tmp_path / "d2")], "no text found"),
        (["--set", "train.seq_len=4096"], "exceeds model.max_seq_len"),
        (["--set", "train.on_nonfinite=rollback", "--train.distributed", "fsdp"], "rollback is not supported"),
    ]
    for extra, expected in cases:
        rc = cli.main(debug_args(corpus, data_dir, tmp_path, "bad", "--train.steps", "1", *extra))
        err = capsys.readouterr().err.strip()
        assert rc == 2, extra
        assert err.startswith("error: ") and expected in err and "\n" not in err, (extra, err)
    assert not (tmp_path / "bad").exists()


def test_resume_refuses_incompatible_config(corpus, data_dir, tmp_path, capsys):
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "r", "--train.steps", "2")) == 0
    capsys.readouterr()
    rc = cli.main(["train", "--resume", str(tmp_path / "r"), "--set", "model.num_experts=4", "--set", "model.top_k=2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.num_experts" in err and "model.top_k" in err and "\n" not in err
    rc = cli.main(["train", "--resume", str(tmp_path / "r"), "--preset", "debug-vanilla"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "model.moe_mode" in err
    rc = cli.main(["train", "--resume", str(tmp_path / "nowhere")])
    assert rc == 2 and "not found" in capsys.readouterr().err


def test_config_resolution_and_overrides(tmp_path):
    run = preset_config("debug")
    run = apply_override(run, "model.num_experts=16")
    run = apply_override(run, "train.lr=3e-4")
    run = apply_override(run, "data.sources=a.txt,b.txt")
    assert (run.model.num_experts, run.train.lr, run.data.sources) == (16, 3e-4, ["a.txt", "b.txt"])
    with pytest.raises(ConfigError, match="model.top_k"):
        apply_override(run, "model.top_k=99")
    # a YAML file shaped like config.json, partial, through the CLI parser
    (tmp_path / "c.yaml").write_text("model: {num_experts: 12}\ntrain: {warmup_frac: 0.2, compile: true}\n")
    parser = cli.build_parser()
    from unipool.config import resolve_config

    args = parser.parse_args(["train", "--preset", "debug", "--config", str(tmp_path / "c.yaml"),
                              "--set", "train.warmup_frac=0.3", "--model.top-k", "2"])
    run = resolve_config(args)  # train.compile, where older configs kept it, lands in the exec section
    assert (run.model.num_experts, run.model.top_k, run.train.warmup_frac, run.exec.compile) == (12, 2, 0.3, True)
    args = parser.parse_args(["train", "--preset", "debug", "--exec.dispatch", "loop", "--exec.activation-checkpointing",
                              "true"])
    run = resolve_config(args)
    assert (run.exec.dispatch, run.exec.activation_checkpointing, run.exec.compile) == ("loop", True, False)
    with pytest.raises(ConfigError, match="exec.dispatch"):
        apply_override(run, "exec.dispatch=fast")
    assert DataConfig().tokenizer == "bpe:8192"


def test_lr_schedule_and_param_groups():
    lrs = [lr_at(s, 100, 1e-3, 1e-4, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup over 10 steps
    assert lrs[10] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4, rel=1e-2)
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4, rel=1e-6)  # cosine midpoint
    from unipool.model.model import build_model

    model = build_model(preset_config("debug").model, "meta")
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if p.ndim == 1}
    assert any("router.scale" in names[id(p)] for p in no_decay["params"])
    assert any("experts.0.w13_EFD" == names[id(p)] for p in decay["params"])
    assert any("tok_embeddings.weight" == names[id(p)] for p in decay["params"])


def test_routing_stats_by_hand():
    cfg = dataclasses.replace(preset_config("debug").model, num_experts=4)
    counts = torch.tensor([[4.0, 4.0, 0.0, 0.0], [8.0, 0.0, 0.0, 0.0]])
    stats = load_stats(counts, cfg.layers_per_pool)
    assert stats["load_LE"] == [[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]
    assert stats["dead_experts"] == 2  # experts 2 and 3 got nothing from either layer of the shared pool
    pool = torch.tensor([12.0, 4.0, 0.0, 0.0])
    assert stats["balance_cv"] == pytest.approx(float(pool.std(unbiased=False) / pool.mean()), abs=1e-5)


@pytest.mark.parametrize("mode, layers_sharing", [("pool", 4), ("grouped", 2), ("layerwise", 1)])
def test_shared_expert_learning_rate_is_scaled_by_the_layers_sharing_it(mode, layers_sharing):
    """train.shared_expert_lr_power p: a shared expert's learning rate is lr * s^-p, s the layers sharing it.
    AdamW's first step moves every weight by its learning rate (m / sqrt(v) = 1 for a constant gradient), so
    the update itself shows the scale."""
    import torch

    from unipool.model.model import build_model
    from unipool.presets import get_preset
    from unipool.train.loop import set_lr

    extra = {"pool": {"num_experts": 8}, "grouped": {"n_groups": 2, "num_experts": 4},
             "layerwise": {"num_experts": 4, "router": "softmax", "switch_loss_coef": 1e-2, "pool_loss_coef": 0.0}}
    model = build_model(get_preset("debug").replace(moe_mode=mode, n_layers=4, norm_router_c="one", **extra[mode]))
    groups = param_groups(model, weight_decay=0.0, shared_lr_power=0.5)
    assert len(groups) == (3 if layers_sharing > 1 else 2)  # no extra group where nothing is shared
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    set_lr(optimizer, 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = 1e-3 * (layers_sharing ** -0.5 if name.startswith("experts.") else 1.0)
        torch.testing.assert_close((before[name] - p.detach()).abs(), torch.full_like(p, expected), rtol=1e-4,
                                   atol=0, msg=name)
    # p = 0 (the default): the two groups as always
    assert len(param_groups(model, 0.01)) == 2


def test_resume_refuses_switching_the_shared_expert_lr_scaling():
    from unipool.config import preset_config, resume_incompatibilities

    saved = preset_config("debug")
    on = saved.replace(train=dataclasses.replace(saved.train, shared_expert_lr_power=0.5))
    assert any("shared_expert_lr_power" in d for d in resume_incompatibilities(saved, on))
    assert not resume_incompatibilities(on, on.replace(train=dataclasses.replace(on.train, shared_expert_lr_power=1.0)))


def test_init_from_applies_the_model_fields_the_command_line_names(corpus, data_dir, tmp_path, capsys):
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "src", "--train.steps", "2")) == 0
    source = json.loads((tmp_path / "src" / "config.json").read_text())["model"]
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "healed", "--train.steps", "2", "--train.init-from",
                               str(tmp_path / "src"), "--model.pool-loss-coef", "0.5",
                               "--set", "model.z_loss_coef=0.001")) == 0
    assert "model.pool_loss_coef 0.5, model.z_loss_coef 0.001" in capsys.readouterr().out
    healed = json.loads((tmp_path / "healed" / "config.json").read_text())["model"]
    assert (healed["pool_loss_coef"], healed["z_loss_coef"]) == (0.5, 0.001)
    assert {k: v for k, v in healed.items() if k not in ("pool_loss_coef", "z_loss_coef")} == \
        {k: v for k, v in source.items() if k not in ("pool_loss_coef", "z_loss_coef")}
    # a field that changes a weight's shape cannot come from the command line: the weights refuse it
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "wider", "--train.steps", "2", "--train.init-from",
                               str(tmp_path / "src"), "--model.num-experts", "4")) != 0
    assert "\n" not in capsys.readouterr().err.strip()


def test_a_start_that_stopped_before_its_first_checkpoint_can_start_again(corpus, data_dir, tmp_path, capsys):
    run = tmp_path / "r"
    (run).mkdir()
    (run / "config.json").write_text(json.dumps(preset_config("debug").to_dict()))
    (run / "metrics.jsonl").write_text('{"step": 1, "tokens": 1, "loss": 9.0}\n')
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "r", "--train.steps", "2", "--train.log-interval", "1")) == 0
    assert "stopped before its first checkpoint: starting it again" in capsys.readouterr().out
    assert [r["loss"] != 9.0 for r in read_metrics(run) if "loss" in r] == [True, True]
    # one that wrote a checkpoint is refused, as before
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "r", "--train.steps", "2")) != 0
    assert "already holds a run" in capsys.readouterr().err


def test_resuming_a_finished_run_keeps_the_speed_it_measured(corpus, data_dir, tmp_path):
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "done", "--train.steps", "2")) == 0
    before = json.loads((tmp_path / "done" / "summary.json").read_text())
    assert cli.main(["train", "--resume", str(tmp_path / "done"), "--train.progress", "false"]) == 0
    after = json.loads((tmp_path / "done" / "summary.json").read_text())
    assert before["tok_per_s"] > 0 and after["tok_per_s"] == before["tok_per_s"]
    assert after["train_time_s"] == before["train_time_s"] and after["val_loss"] == before["val_loss"]


def test_throughput_leaves_out_the_pauses_but_keeps_their_tokens(monkeypatch):
    from unipool.train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "time", lambda: now[0])
    speed = loop.Throughput()
    speed.tokens, now[0] = 1000, 101.0  # 1000 tokens in 1 s of training
    paused = now[0]
    now[0] = 105.0  # 4 s of evaluation
    speed.leave_out(paused)
    speed.tokens, now[0] = 2000, 106.0  # 1000 more in the next second
    assert speed.rate() == 1000.0


def test_a_data_parallel_mode_without_torchrun_says_it_runs_one_process(corpus, data_dir, tmp_path, capsys):
    assert cli.main(debug_args(corpus, data_dir, tmp_path, "solo", "--train.steps", "1",
                               "--train.distributed", "ddp")) == 0
    assert "note: train.distributed ddp without torchrun: one process, no data parallelism" in capsys.readouterr().out
