"""`Run`, the owner of a run directory; frozen configs and their exec section; the preset table."""

import dataclasses
import json
from pydoc_data.topics import topics

import pytest
import torch
from helpers import make_run

from unipool import cli
from unipool.config import ExecConfig, RunConfig, TrainConfig, preset_config, run_config_from_dict
from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import build_model
from unipool.presets import PRESETS, get_preset
from unipool.run import Run, RunError
from unipool.weights import CheckpointError, save_model


def test_open_from_run_checkpoint_or_weights_file(tmp_path):
    root, model = make_run(tmp_path / "run")
    ckpt = root / "checkpoints" / "step_000010"
    for target in (root, ckpt, ckpt / "model.safetensors"):
        run = Run.open(target)
        assert (run.path, run.checkpoint, run.step) == (root, ckpt, 10)
        assert isinstance(run.config, RunConfig) and run.config.train.seq_len == 64
        assert run.model_config == model.config
        loaded = run.load_model()
        assert not loaded.training
        for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
            assert torch.equal(a, b), name
        assert run.tokenizer().vocab_size == model.config.vocab_size
    # a checkpoint outside any run directory: its weights carry their own config
    bare = tmp_path / "bare"
    save_model(model, bare, {"step": 3})
    run = Run.open(bare)
    assert (run.path, run.config, run.step, run.model_config) == (None, None, 3, model.config)
    with pytest.raises(RunError, match="not inside a run directory"):
        run.metrics_path  # noqa: B018


def test_create_is_the_writer_and_refuses_an_existing_run(tmp_path):
    cfg = preset_config("debug")
    run = Run.create(tmp_path / "r", cfg)
    assert run.checkpoint is None and Run.open(tmp_path / "r").config == cfg
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == cfg.to_dict()
    with pytest.raises(RunError, match="already holds a run"):
        Run.create(tmp_path / "r", cfg)
    longer = cfg.replace(train=dataclasses.replace(cfg.train, steps=40))
    Run.create(tmp_path / "r", longer, exist_ok=True)  # a resumed run records what it continues with
    assert Run.open(tmp_path / "r").config.train.steps == 40
    with pytest.raises(RunError, match="has no checkpoint yet"):
        Run.open(tmp_path / "r").latest_checkpoint()


def test_damaged_runs_are_one_line_errors(tmp_path):
    root, _ = make_run(tmp_path / "run")
    (root / "checkpoints" / "LATEST").write_text("step_000099\n")
    with pytest.raises(CheckpointError, match="points to step_000099"):
        Run.open(root)
    (root / "checkpoints" / "LATEST").write_text("step_000010\n")
    (root / "config.json").write_text('{"model": {"n_layers": -1}}')
    with pytest.raises(ConfigError, match="model.n_layers"):
        Run.open(root)
    with pytest.raises(RunError, match="no such run"):
        Run.open(tmp_path / "missing")


def test_metrics_keep_readable_lines_and_say_what_was_skipped(tmp_path):
    run = Run.create(tmp_path / "r", preset_config("debug"))
    run.metrics_path.write_text('{"step": 1, "tokens": 64, "loss": 5.0}\n{"step": 2, "tok')  # cut short
    records, notes = run.metrics()
    assert records == [{"step": 1, "tokens": 64, "loss": 5.0}] and "line(s) 2" in notes[0]
    assert run.summary() is None
    run.summary_path.write_text('{"val_loss": 4.5}')
    assert run.summary() == {"val_loss": 4.5}


def test_configs_are_frozen_and_changed_by_replace():
    cfg = get_preset("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.n_layers = 3
    assert cfg.replace(n_layers=4).n_layers == 4 and cfg.n_layers == 2
    run = preset_config("debug")
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.train.lr = 1.0
    with pytest.raises(ConfigError, match="model.n_layers"):
        cfg.replace(n_layers=0)  # validated whenever one is built


def test_every_preset_is_a_model_and_a_recipe():
    for name, preset in PRESETS.items():
        assert isinstance(preset.model, ModelConfig) and get_preset(name) is preset.model
        run = preset_config(name)
        assert run.model == preset.model and run.preset == name
        assert run.train == TrainConfig(**preset.recipe)
    assert preset_config("demo").train.steps == 720 and preset_config("demo").data.tokenizer == "bpe:4096" and preset_config("unipool-182m").train.lr == 5e-4


def test_older_configs_move_execution_fields_into_exec():
    # what config.json and meta.json held before the exec section existed
    old_model = {**get_preset("debug").to_dict(), "dispatch": "loop", "fused_pool_wgrad": True}
    assert ModelConfig.from_dict(old_model) == get_preset("debug")
    run = run_config_from_dict({"model": old_model, "train": {"steps": 5, "compile": True,
                                                             "activation_checkpointing": True}, "data": {}})
    assert run.exec == ExecConfig(dispatch="loop", fused_pool_wgrad=True, activation_checkpointing=True, compile=True)
    assert run.train.steps == 5


def test_a_run_saved_with_both_budgets_opens_as_it_trained(tmp_path):
    """Before naming one budget reset the other, `--preset X --train.tokens N` saved steps > 0 and tokens > 0,
    and steps won: such a run still opens (resume, eval, export), as the steps it trained."""
    root, _ = make_run(tmp_path / "run")
    path = root / "config.json"
    saved = json.loads(path.read_text())
    saved["train"].update(steps=10_000, tokens=2_000_000_000)
    path.write_text(json.dumps(saved))
    run = Run.open(root)
    assert (run.config.train.steps, run.config.train.tokens) == (10_000, 0)
    with pytest.raises(ConfigError, match="both set"):  # a config written by hand still may not name both
        run_config_from_dict({"train": {"steps": 5, "tokens": 100}})


def test_resume_may_change_execution_but_not_the_model(tmp_path, capsys):
    corpus = tmp_path / "topics.txt"
    corpus.write_text("\f".join(topics[k] for k in sorted(topics)[:30]))
    args = ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:300",
            "--data.data-dir", str(tmp_path / "data"), "--train.out-dir", str(tmp_path), "--train.run-name", "r",
            "--train.progress", "false", "--train.steps", "2", "--train.batch-size", "2", "--train.seq-len", "16",
            "--train.sample-tokens", "0", "--train.eval-tokens", "64"]
    assert cli.main(args) == 0
    run_dir = tmp_path / "r"
    assert cli.main(["train", "--resume", str(run_dir), "--train.steps", "3", "--exec.dispatch", "loop",
                     "--exec.activation-checkpointing", "true", "--train.progress", "false"]) == 0
    run = Run.open(run_dir)
    assert run.step == 3 and run.config.exec.dispatch == "loop" and run.config.exec.activation_checkpointing
    assert cli.main(["train", "--resume", str(run_dir), "--model.top-k", "2"]) == 2
    assert "the config differs in model.top_k" in capsys.readouterr().err


def test_model_execution_settings_do_not_change_the_math():
    cfg = get_preset("debug")
    torch.manual_seed(0)
    model = build_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    ref = model(ids).logits
    model.set_execution(dispatch="loop")
    assert all(pool.dispatch == "loop" for pool in model.experts)
    torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="dispatch"):
        model.set_execution(dispatch="fast")
