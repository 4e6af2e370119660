"""What a finished run shows: the end screen, RUN/report.png, `unipool report`, and the next commands
the end screen suggests, run exactly as printed."""

import dataclasses
import glob
import shlex
from pathlib import Path

import pytest
from PIL import Image

from unipool import cli
from unipool.analysis.report import measure, report_data
from unipool.config import preset_config
from unipool.presets import PRESETS
from unipool.run import Run
from unipool.train.summary import end_screen


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """The arguments of a real (tiny) training run through the CLI, and where it writes."""
    root = tmp_path_factory.mktemp("first")
    args = ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:320",
            "--data.data-dir", str(root / "prepared"), "--train.out-dir", str(root / "runs"),
            "--train.progress", "false", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--train.eval-tokens", "256", "--train.steps", "6", "--train.log-interval", "2",
            "--train.eval-interval", "3", "--train.sample-tokens", "24"]
    return root, args


def _train(capsys, args, name):
    assert cli.main([*args, "--train.run-name", name]) == 0
    return capsys.readouterr().out


def _next_commands(screen: str) -> list[str]:
    """The commands listed under 'next:' (each line: command, then two or more spaces, then why)."""
    block = screen.split("\nnext:\n", 1)[1]
    return [line.strip().split("   ")[0].strip() for line in block.splitlines() if line.startswith("  unipool")]


def test_end_screen_report_and_next_commands(trained, capsys):
    root, args = trained
    out = _train(capsys, args, "first")
    run_dir = root / "runs" / "first"
    summary = Run.open(run_dir).summary()

    # The sample is printed as text (real line breaks, no Python escapes), indented under its heading.
    sample_lines = summary["sample"].strip("\n").splitlines()
    assert "\\n" not in out and "'ROMEO:" not in out
    assert all(f"    {line}" in out for line in sample_lines)
    assert f"validation loss   {summary['val_loss']:.3f}" in out
    assert f"unigram baseline  {summary['unigram_loss']:.3f}" in out
    assert f"run directory: {run_dir}" in out

    # The report exists, is a real picture, and is where the end screen says.
    report = run_dir / "report.png"
    assert f"report:        {report}" in out and summary["report"] == str(report)
    with Image.open(report) as im:
        assert im.format == "PNG" and im.size[0] >= 1000 and im.size[1] >= 700

    # Every suggested command runs as printed.
    commands = _next_commands(out)
    assert [c.split()[1] for c in commands] == ["routing", "generate"]
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "unipool"
        assert cli.main(argv[1:]) == 0, command
    printed = capsys.readouterr().out
    assert "distinct experts per token" in printed and "JULIET:" in printed

    # `unipool report RUN` draws the picture again from the run's files and newest checkpoint.
    report.unlink()
    assert cli.main(["report", str(run_dir)]) == 0
    assert report.is_file() and f"wrote {report}" in capsys.readouterr().out


def test_demo_end_screen_suggests_the_vanilla_baseline_and_compare(trained, capsys, tmp_path):
    """The demo's end screen names the vanilla run and a `compare` whose glob finds it once it exists."""
    root, args = trained
    _train(capsys, args, "demo-20990101-000000")
    _train(capsys, args, "demo-vanilla-20990101-000100")
    run_dir = root / "runs" / "demo-20990101-000000"
    config = preset_config("demo")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, out_dir=str(root / "runs")))
    screen = end_screen(config, Run.open(run_dir).summary())
    commands = _next_commands(screen)
    assert commands[2] == "unipool train --preset demo-vanilla"
    compare = shlex.split(commands[3])
    assert compare[:3] == ["unipool", "compare", str(run_dir)]
    expanded = [p for pattern in compare[3:] for p in sorted(glob.glob(pattern))]  # what the shell does
    assert [Path(p).name for p in expanded] == ["demo-vanilla-20990101-000100"]
    assert cli.main(["compare", str(run_dir), *expanded, "--out", str(tmp_path / "cmp")]) == 0
    assert "demo-vanilla-20990101-000100" in capsys.readouterr().out
    assert "demo-vanilla" in PRESETS


def test_report_data_matches_the_run(trained, capsys):
    """The numbers behind the picture: the run's own metrics and summary, routing on held-out tokens
    (every layer's usage row sums to 1 minus its zero-gate share) and each layer's sigma."""
    root, args = trained
    run_dir = root / "runs" / "first"
    if not run_dir.exists():
        _train(capsys, args, "first")
    run = Run.open(run_dir)
    model = run.load_model()
    from unipool.analysis.eval import eval_batches_for

    batches, _ = eval_batches_for(run, None, "val", 4, 32, 256)
    data = report_data(run, model, measure(model, batches, max_tokens=256))
    assert data["step"] == 6 and data["summary"]["val_loss"] == run.summary()["val_loss"]
    assert [r["step"] for r in data["records"] if "val_loss" in r] == [3, 6]
    stats = data["routing"]
    assert stats["tokens"] == 256
    for row, zero in zip(stats["usage_LE"], stats["per_layer"]["zero_gate_fraction"]):
        assert sum(row) == pytest.approx(1 - zero, abs=1e-6)
    assert data["router_scale"] == [float(layer.router.scale.detach()) for layer in model.layers]


def test_report_of_a_run_without_metrics_and_without_sigma(tmp_path):
    """A vanilla (softmax) run that logged nothing yet still gets its picture: the usage heatmap and, in
    place of sigma, the mean picked gate per layer; the loss panel says there is nothing to draw."""
    from helpers import TEXTS, make_run

    from unipool.analysis.report import write_report
    from unipool.data.dataset import window_batches

    run_dir, model = make_run(tmp_path / "vanilla", preset="debug-vanilla")
    run = Run.open(run_dir)
    tokens = run.tokenizer().encode(" ".join(TEXTS[:5]))
    measured = measure(model, window_batches(tokens, 4, 32), max_tokens=512)
    assert measured["router_scale"] is None and measured["routing"]["tokens"] == 512
    gates = measured["routing"]["per_layer"]["mean_gate_sum"]
    assert len(gates) == model.config.n_layers and all(0 < g <= 1 for g in gates)  # softmax top-1 probability
    path = write_report(run, model, window_batches(tokens, 4, 32), tmp_path / "r.png", max_tokens=512)
    with Image.open(path) as im:
        assert im.format == "PNG"
