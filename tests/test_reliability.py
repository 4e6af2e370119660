"""Reliability: the divergence guard, crashes and a full disk during a checkpoint write, damaged
checkpoints and run files, and bad values on the command line. Every failure a user can cause must end
in one line (no traceback) and must never cost the last good checkpoint.

Already covered elsewhere, not repeated here: a simulated crash at each publishing step of a save
(tests/test_checkpoint.py::test_crash_during_save_keeps_previous_checkpoint), garbage or missing
checkpoint files (test_checkpoint.py::test_resume_from_damaged_checkpoint_is_one_line), an exact resume
after Ctrl-C (test_train.py::test_interrupt_then_resume_is_exact) and Run.metrics() skipping a line cut
short (test_run.py::test_metrics_keep_readable_lines_and_say_what_was_skipped).
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_run

from unipool import cli, weights
from unipool.model.config import ConfigError, ModelConfig
from unipool.run import Run
from unipool.train import checkpoint as ckpt
from unipool.train import distributed
from unipool.weights import CheckpointError, load_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data") / "prepared"


def args(corpus: Path, data_dir: Path, out: Path, name: str, *extra: str) -> list[str]:
    """A debug run: 6 steps of 4 x 32 tokens, a checkpoint every 2 steps, fp32 (exact on CPU)."""
    return ["train", "--preset", "debug", "--data.sources", str(corpus), "--data.tokenizer", "bpe:320",
            "--data.data-dir", str(data_dir), "--train.out-dir", str(out), "--train.run-name", name,
            "--train.progress", "false", "--set", "train.batch_size=4", "--set", "train.seq_len=32",
            "--train.sample-tokens", "0", "--train.eval-tokens", "128", "--train.steps", "6",
            "--train.log-interval", "1", "--train.eval-interval", "0", "--train.ckpt-interval", "2",
            "--train.precision", "fp32", *extra]


def losses(run_dir: Path) -> list[tuple[int, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines) if "loss" in r]


def steps_on_disk(run_dir: Path) -> list[int]:
    return [s for s, _ in weights.list_checkpoints(run_dir / "checkpoints")]


def all_finite(ckpt_dir: Path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in weights.load_weights(ckpt_dir).values())


def one_line_error(capsys) -> str:
    """The error line on stderr: the last line, after warnings only (no traceback, nothing else)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), lines
    assert all(line.startswith("warning: ") for line in lines[:-1]), lines
    return lines[-1]


@pytest.fixture(scope="module")
def straight(corpus, data_dir, tmp_path_factory) -> Path:
    """The reference: 6 steps without any fault."""
    out = tmp_path_factory.mktemp("straight")
    assert cli.main(args(corpus, data_dir, out, "r")) == 0
    return out / "r"


def poison_gradients_at(monkeypatch, bad_steps: set[int]) -> list[int]:
    """Fault injection: a NaN in one gradient on the given steps (1-based), just before the real
    clipping measures the norm. Returns the list of steps seen, for the test to check."""
    real, seen = distributed.clip_grad_norm, []

    def clip_grad_norm(model, max_norm):
        seen.append(len(seen) + 1)
        if len(seen) in bad_steps:
            next(model.parameters()).grad[0, 0] = math.nan
        return real(model, max_norm)

    monkeypatch.setattr(distributed, "clip_grad_norm", clip_grad_norm)
    return seen


# ---- the divergence guard ----------------------------------------------------------------------

def test_skip_drops_the_bad_update_and_goes_on(corpus, data_dir, straight, tmp_path, monkeypatch, capsys):
    poison_gradients_at(monkeypatch, {3})
    assert cli.main(args(corpus, data_dir, tmp_path, "r")) == 0
    err = capsys.readouterr().err
    assert "warning: step 3: gradient norm nan" in err and "update skipped (1 of at most 3 in a row)" in err
    run = tmp_path / "r"
    got, ref = losses(run), losses(straight)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert got[:3] == ref[:3] and got[3] != ref[3]  # identical until the skipped update, different after
    assert all(math.isfinite(loss) for _, loss in got)
    optim = ckpt.load_torch(run / "checkpoints" / "step_000006" / "optimizer.pt")
    assert int(optim["state"][0]["step"]) == 5  # 6 steps, one update skipped
    assert all(all_finite(p) for _, p in weights.list_checkpoints(run / "checkpoints"))


def test_too_many_bad_steps_in_a_row_stop_in_one_line(corpus, data_dir, tmp_path, monkeypatch, capsys):
    poison_gradients_at(monkeypatch, {3, 4, 5})
    rc = cli.main(args(corpus, data_dir, tmp_path, "r", "--train.max-bad-steps", "2"))
    err = one_line_error(capsys)
    assert rc == 2 and "diverged at step 5" in err and "max_bad_steps=2" in err
    # a skipped step still counts (the schedule and the data move on), so step 4 was saved: finite weights
    assert "the latest checkpoint is step_000004" in err and f"--resume {tmp_path / 'r'}" in err
    assert steps_on_disk(tmp_path / "r") == [2, 4]
    assert not (tmp_path / "r" / "summary.json").exists()


def test_stop_ends_at_the_first_bad_step(corpus, data_dir, tmp_path, monkeypatch, capsys):
    seen = poison_gradients_at(monkeypatch, {3})
    rc = cli.main(args(corpus, data_dir, tmp_path, "r", "--train.on-nonfinite", "stop"))
    err = one_line_error(capsys)
    assert rc == 2 and "diverged at step 3: gradient norm nan" in err and "on_nonfinite=stop" in err
    assert seen == [1, 2, 3] and steps_on_disk(tmp_path / "r") == [2]


def test_rollback_replays_exactly_from_the_last_checkpoint(corpus, data_dir, straight, tmp_path, monkeypatch,
                                                           capsys):
    """A one-off fault at step 5 rolls back to step 4 (weights, optimizer, sampler, RNG); the replay
    then equals the run that never had the fault, loss for loss and weight for weight."""
    seen = poison_gradients_at(monkeypatch, {5})
    assert cli.main(args(corpus, data_dir, tmp_path, "r", "--train.on-nonfinite", "rollback")) == 0
    assert "rolling back to step_000004" in capsys.readouterr().err
    assert len(seen) == 7  # steps 1-5, then 5 and 6 again
    run = tmp_path / "r"
    assert losses(run) == losses(straight)
    a, _ = load_model(run)
    b, _ = load_model(straight)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_rollback_that_diverges_again_stops(corpus, data_dir, tmp_path, monkeypatch, capsys):
    poison_gradients_at(monkeypatch, {3, 4, 5, 6})  # every replay of step 3 fails again
    rc = cli.main(args(corpus, data_dir, tmp_path, "r", "--train.on-nonfinite", "rollback",
                       "--train.max-bad-steps", "2"))
    err = one_line_error(capsys)
    assert rc == 2 and "diverged at step 3" in err and "after 2 rollback(s)" in err
    assert steps_on_disk(tmp_path / "r") == [2]


def test_diverging_learning_rate_keeps_the_good_checkpoints(corpus, data_dir, straight, tmp_path, capsys):
    """The real thing, as it went wrong before the guard: resume a healthy run (checkpoints 2, 4, 6)
    at lr 1000 to step 40, a checkpoint every 10 steps, keep_last 1. It must end in one line, exit
    non-zero, write no NaN checkpoint, and keep step 6, the last checkpoint before the first bad step,
    as it was: the first bad step comes at 9, step 10 is finite again and saved (its weights are
    ruined but finite), and keep_last 1 alone would then delete step 6."""
    run = tmp_path / "r"
    shutil.copytree(straight, run)
    good = (run / "checkpoints" / "step_000006" / "model.safetensors").read_bytes()
    rc = cli.main(["train", "--resume", str(run), "--train.steps", "40", "--train.lr", "1000",
                   "--train.ckpt-interval", "10", "--train.keep-last", "1"])
    err = one_line_error(capsys)
    # NormRouter's sigma may cross zero before the first non-finite step; training then stops at that
    # log step with its own one line (train.telemetry.check_router_scales), also before any bad checkpoint.
    assert rc == 2 and (("training diverged at step" in err and "--train.lr LR" in err)
                        or "NormRouter sigma crossed zero" in err), err
    assert 6 in steps_on_disk(run)
    assert (run / "checkpoints" / "step_000006" / "model.safetensors").read_bytes() == good
    assert all(all_finite(p) for _, p in weights.list_checkpoints(run / "checkpoints"))


def test_diverging_fresh_run_ends_in_one_line_without_a_sample(corpus, data_dir, tmp_path, capsys):
    rc = cli.main(args(corpus, data_dir, tmp_path, "r", "--train.lr", "1000", "--train.steps", "20",
                       "--train.sample-tokens", "8", "--train.ckpt-interval", "10"))
    err = one_line_error(capsys)
    assert rc == 2 and "training diverged at step" in err
    assert not (tmp_path / "r" / "summary.json").exists()
    assert all(all_finite(p) for _, p in weights.list_checkpoints(tmp_path / "r" / "checkpoints"))


def _debug_state(tmp_path):
    root, model = make_run(tmp_path / "run")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    out = model(x, x)
    (out.loss + out.aux_loss).backward()
    optimizer.step()

    class Sampler:  # the one call save_checkpoint makes on a WindowSampler
        def state_dict(self):
            return {"step": 1, "seed": 0}

    return root / "checkpoints", model, optimizer, Sampler()


def test_nonfinite_state_is_never_written_and_never_pruned_for(tmp_path):
    root, model, optimizer, sampler = _debug_state(tmp_path)
    for step in (11, 12):
        ckpt.save_checkpoint(root, step, 0, model, optimizer, sampler, "none", distributed.DistInfo(), keep_last=2)
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = math.inf
    for step in (13, 14):  # keep_last=2 would prune 11 and 12 if these counted
        with pytest.raises(ckpt.NonFiniteStateError, match=f"step {step}: layers.0.attention.wq.weight"):
            ckpt.save_checkpoint(root, step, 0, model, optimizer, sampler, "none", distributed.DistInfo(), keep_last=2)
    assert steps_on_disk(tmp_path / "run") == [11, 12] and (root / "LATEST").read_text().strip() == "step_000012"
    assert not list(root.glob(".tmp_*"))
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = 0.0
        next(iter(optimizer.state.values()))["exp_avg_sq"][0] = math.nan
    with pytest.raises(ckpt.NonFiniteStateError, match=r"optimizer\.\S+\.exp_avg_sq"):
        ckpt.save_checkpoint(root, 15, 0, model, optimizer, sampler, "none", distributed.DistInfo(), keep_last=2)


# ---- crashes and a full disk during a checkpoint write -----------------------------------------

KILLER = """
import sys, time
from pathlib import Path
import torch
from unipool import cli
from unipool.train import checkpoint as ckpt

marker, real = Path(sys.argv[1]), ckpt.save_torch

def save_torch(obj, path):  # the optimizer state of step 4 is on disk, its rank state is not yet
    real(obj, path)
    if path.name == "optimizer.pt" and path.parent.name == ".tmp_step_000004":
        marker.touch()
        time.sleep(120)

ckpt.save_torch = save_torch
torch.set_num_threads(1)  # as in this test process (conftest.py): the same threads, the same sums
sys.exit(cli.main(sys.argv[2:]))
"""


def test_kill_9_during_a_checkpoint_write_then_resume_is_exact(corpus, data_dir, straight, tmp_path):
    """A real SIGKILL in the middle of writing step 4: LATEST still names step 2, the resumed run
    cleans the half-written directory and its losses and weights equal the run never killed."""
    script, marker = tmp_path / "killer.py", tmp_path / "writing"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(marker), *args(corpus, data_dir, tmp_path, "r")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the run never reached the checkpoint write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
        proc.stderr.close()
    run = tmp_path / "r"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert (run / "checkpoints" / ".tmp_step_000004" / "optimizer.pt").is_file()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert not list((run / "checkpoints").glob(".tmp_*"))
    assert losses(run) == losses(straight)
    a, _ = load_model(run)
    b, _ = load_model(straight)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture
def small_disk(tmp_path):
    """A real 24 MB file system (tmpfs; needs root on Linux; a debug checkpoint is ~3.5 MB), skipped
    where it cannot be mounted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("fails_in", ["weights", "optimizer"])
def test_full_disk_says_so_and_keeps_the_previous_checkpoint(corpus, data_dir, straight, small_disk, capsys,
                                                             fails_in):
    """A checkpoint that does not fit: "No space left on device" in one line, LATEST intact and
    loadable, no temporary directory left behind; with space freed the run resumes. The disk fills
    in the safetensors writer (which reports it in its own exception) or in torch.save."""
    run = small_disk / "r"
    shutil.copytree(straight, run, ignore=shutil.ignore_patterns("step_000004", "step_000006"))
    (run / "checkpoints" / "LATEST").write_text("step_000002\n")
    room = 512 * 1024  # for metrics and config, not for the weights
    if fails_in == "optimizer":
        room += (run / "checkpoints" / "step_000002" / "model.safetensors").stat().st_size
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(small_disk).free - room))
    rc = cli.main(["train", "--resume", str(run)])
    err = one_line_error(capsys)
    assert rc == 2 and "No space left on device" in err and "step_000002" in err and "is intact" in err
    assert (run / "checkpoints" / "LATEST").read_text().strip() == "step_000002"
    assert steps_on_disk(run) == [2] and not list((run / "checkpoints").glob(".tmp_*"))
    assert load_model(run)[1]["step"] == 2
    filler.unlink()
    assert cli.main(["train", "--resume", str(run)]) == 0
    assert steps_on_disk(run)[-1] == 6


def test_full_disk_anywhere_else_is_one_line(corpus, data_dir, small_disk, capsys):
    """Outside checkpoints (a new run's config.json, the end-of-run files): the same one line, no traceback."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * shutil.disk_usage(small_disk).free)  # nothing left at all
    for name in ("new", "again"):
        rc = cli.main(args(corpus, data_dir, small_disk, name))
        err = one_line_error(capsys)
        assert rc == 2 and "No space left on device" in err and "--resume" in err, err
    filler.unlink()  # space again: the same command now trains
    assert cli.main(args(corpus, data_dir, small_disk, "new")) == 0, capsys.readouterr().err


# ---- damaged checkpoints and run files -----------------------------------------------------------

def _edit_meta(**changes):
    def damage(d: Path):
        meta = json.loads((d / "meta.json").read_text())
        for k, v in changes.items():
            if v is None:
                del meta[k]
            elif k == "model":
                meta["model"].update(v)
            else:
                meta[k] = v
        (d / "meta.json").write_text(json.dumps(meta))
    return damage


def _edit_pt(name, edit):
    def damage(d: Path):
        obj = torch.load(d / name, weights_only=True)
        torch.save(edit(obj), d / name)
    return damage


@pytest.mark.parametrize("damage, expected", [
    (_edit_meta(step="six"), "step should be int"),
    (_edit_meta(step=None), "no step"),
    (_edit_meta(world_size=0), "world_size out of range"),
    (lambda d: (d / "meta.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda d: (d / "meta.json").write_bytes(b"\xff\xfe\x00"), "corrupt"),
    (_edit_pt("optimizer.pt", lambda o: {"bogus": 1}), "optimizer.pt"),
    (_edit_pt("optimizer.pt", lambda o: {**o, "state": {k: {**v, "exp_avg": v["exp_avg"][:1]}
                                                         for k, v in o["state"].items()}}), "does not fit"),
    (_edit_pt("state_rank0.pt", lambda o: {k: v for k, v in o.items() if k != "sampler"}), "expected rng, sampler"),
    (_edit_pt("state_rank0.pt", lambda o: {**o, "rng": {"python": 3}}), "state_rank0.pt"),
    (_edit_pt("state_rank0.pt", lambda o: {**o, "sampler": {"step": "x"}}), "state_rank0.pt"),
    (_edit_pt("optimizer.pt", lambda o: {**o, "state": {k: {**v, "exp_avg": v["exp_avg"] * math.nan}
                                                         for k, v in o["state"].items()}}), "non-finite"),
], ids=["step-type", "step-missing", "world-size", "not-object", "binary", "optimizer-keys", "optimizer-shapes",
        "state-keys", "rng-type", "sampler-type", "nan-state"])
def test_damaged_fields_are_one_line_on_resume(straight, tmp_path, capsys, damage, expected):
    run = tmp_path / "r"
    shutil.copytree(straight, run)
    damage(run / "checkpoints" / "step_000006")
    rc = cli.main(["train", "--resume", str(run), "--train.steps", "7"])
    err = one_line_error(capsys)
    assert rc == 2 and expected in err, err


def test_meta_declaring_a_huge_model_is_refused_before_allocating(tmp_path, capsys):
    root, _ = make_run(tmp_path / "run")
    d = root / "checkpoints" / "step_000010"
    _edit_meta(model={"vocab_size": 10**12})(d)
    with pytest.raises(CheckpointError, match=r"tok_embeddings.weight is \[\d+, 64\] in model.safetensors"):
        load_model(root)
    assert cli.main(["generate", str(root), "--max-new-tokens", "2"]) == 2
    assert "do not match meta.json" in one_line_error(capsys)
    _edit_meta(model={"n_layers": 40})(d)
    with pytest.raises(CheckpointError, match="missing"):
        load_model(root)
    _edit_meta(model={"n_layers": 2, "d_model": "64"})(d)
    with pytest.raises(CheckpointError, match="meta.json: model.d_model: expected int"):
        Run.open(root).model_config


def test_latest_must_name_a_checkpoint_inside_the_run(tmp_path, capsys):
    root, _ = make_run(tmp_path / "run")
    planted = tmp_path / "elsewhere" / "step_000099"
    shutil.copytree(root / "checkpoints" / "step_000010", planted)
    (root / "checkpoints" / "evil").symlink_to(planted)
    for target in (str(planted), "../../elsewhere/step_000099", "..", "evil", "step_000010/../../x"):
        (root / "checkpoints" / "LATEST").write_text(target + "\n")
        with pytest.raises(CheckpointError, match="must name a checkpoint directory inside"):
            Run.open(root)
    (root / "checkpoints" / "LATEST").write_text(str(planted))
    assert cli.main(["generate", str(root), "--max-new-tokens", "2"]) == 2
    assert "must name a checkpoint directory inside" in one_line_error(capsys)
    (root / "checkpoints" / "LATEST").write_text("step_000010\n")
    assert Run.open(root).checkpoint == root / "checkpoints" / "step_000010"


def test_partial_metrics_line_is_dropped_on_resume(straight, tmp_path, capsys):
    run = tmp_path / "r"
    shutil.copytree(straight, run)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "tokens": 8')  # what a power cut or a full disk leaves
    assert cli.main(["train", "--resume", str(run), "--train.steps", "7"]) == 0
    assert "dropped 1 unreadable line(s)" in capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]


# ---- bad values: one line each -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return make_run(tmp_path_factory.mktemp("tiny") / "run")[0]


TRAIN_CASES = [
    (["--train.lr", "Infinity"], "train.lr: must be a finite number"),
    (["--train.lr", "NaN"], "train.lr: must be a finite number"),
    (["--set", "train.min_lr=-Infinity"], "train.min_lr"),
    (["--train.eps", "NaN"], "train.eps"),
    (["--train.grad-clip", "Infinity"], "train.grad_clip: must be a finite number"),
    (["--train.beta2", "1.5"], "train.beta2: must be in [0, 1)"),
    (["--train.on-nonfinite", "ignore"], "train.on_nonfinite: must be one of"),
    (["--train.max-bad-steps", "0"], "train.max_bad_steps: must be a positive integer"),
    (["--model.norm-eps", "-1"], "model.norm_eps: must be positive"),
    (["--model.norm-eps", "NaN"], "model.norm_eps: must be a finite number"),
    (["--model.rope-base", "Infinity"], "model.rope_base: must be a finite number"),
    (["--model.init-std", "-0.02"], "model.init_std"),
    (["--model.pool-loss-coef", "NaN"], "model.pool_loss_coef"),
    (["--set", "model.norm_router_c=Infinity"], "model.norm_router_c"),
    (["--data.val-fraction", "NaN"], "data.val_fraction"),
]


@pytest.mark.parametrize("extra, expected", TRAIN_CASES, ids=[" ".join(e) for e, _ in TRAIN_CASES])
def test_bad_train_values_are_one_line(tmp_path, capsys, extra, expected):
    rc = cli.main(["train", "--preset", "debug", "--train.out-dir", str(tmp_path), *extra])
    err = one_line_error(capsys)
    assert rc == 2 and expected in err, err
    assert not any(tmp_path.iterdir())


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "below"):
        rc = cli.main(["train", "--preset", "debug", "--train.out-dir", str(out)])
        err = one_line_error(capsys)
        assert rc == 2 and "train.out_dir" in err and "is a file" in err, err


GENERATE_CASES = [
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "-1"], "temperature must be"),
    (["--temperature", "inf"], "temperature must be"),
    (["--top-k", "0"], "top-k must be >= 1"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "nan"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
]


@pytest.mark.parametrize("extra, expected", GENERATE_CASES, ids=[" ".join(e) for e, _ in GENERATE_CASES])
def test_bad_sampling_values_are_one_line(tiny_run, capsys, extra, expected):
    rc = cli.main(["generate", str(tiny_run), "--max-new-tokens", "2", *extra])
    err = one_line_error(capsys)
    assert rc == 2 and expected in err, err


EVAL_CASES = [
    (["eval", "--seq-len", "0"], "--seq-len must be between 1"),  # was ignored (0 read as the default)
    (["eval", "--seq-len", "100000"], "--seq-len must be between 1"),
    (["eval", "--batch-size", "0"], "--batch-size must be positive"),
    (["eval", "--max-tokens", "0"], "--max-tokens must be positive"),
    (["routing", "--seq-len", "0"], "--seq-len must be between 1"),
]


@pytest.mark.parametrize("extra, expected", EVAL_CASES, ids=[" ".join(e) for e, _ in EVAL_CASES])
def test_bad_eval_values_are_one_line(tiny_run, capsys, extra, expected):
    rc = cli.main([extra[0], str(tiny_run), *extra[1:]])
    err = one_line_error(capsys)
    assert rc == 2 and expected in err, err


def test_a_diverged_model_samples_in_one_line(tmp_path, capsys):
    root, model = make_run(tmp_path / "run")
    with torch.no_grad():
        model.norm.weight.fill_(math.nan)
    Run.open(root).add_weights(model, 10)
    assert cli.main(["generate", str(root), "--max-new-tokens", "2"]) == 2
    assert "logits are not finite" in one_line_error(capsys)


def test_model_config_types_are_checked():
    with pytest.raises(ConfigError, match="model.rope_base: expected float"):
        ModelConfig.from_dict({"rope_base": "big"})
    assert ModelConfig.from_dict({"rope_base": 10000}).rope_base == 10000  # an int is a fine float
