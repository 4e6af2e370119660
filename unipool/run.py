"""`Run`: the one owner of a run directory. Every command opens runs through it.

    RUN/config.json                    the RunConfig (model, train, data, exec); written by Run.create only
    RUN/tokenizer.json                 the tokenizer the run trains with
    RUN/metrics.jsonl                  one JSON record per line: training and validation metrics (MetricsWriter
                                       writes it, read_metrics reads it, parse_record is the line rule)
    RUN/tensorboard/                   the same scalars for TensorBoard, when train.tensorboard is on
    RUN/summary.json                   the final figures of a finished run
    RUN/checkpoints/step_XXXXXX/       model.safetensors + meta.json (+ optimizer and per-rank state)
    RUN/checkpoints/LATEST             the name of the newest complete checkpoint

`Run.open` accepts a run directory, a checkpoint directory or a model.safetensors file. A checkpoint
outside any run directory opens too: its meta.json carries the model config, and `config` is None.
The model config that decides the architecture is always the checkpoint's own (the weights' config).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from unipool.config import RunConfig, run_config_from_dict
from unipool.data.tokenizer import Tokenizer, atomic_write_text
from unipool.errors import DiskFullError, UnipoolError, is_disk_full, read_json
from unipool.model.config import ModelConfig
from unipool.model.model import Unipool
from unipool.weights import CheckpointError, add_weights, load_model, meta_model_config, read_meta, resolve_checkpoint

CONFIG = "config.json"


class RunError(UnipoolError):
    pass


def _run_dir_of(ckpt_dir: Path) -> Path | None:
    """RUN for RUN/checkpoints/step_X (a run whose config.json is missing still holds its checkpoints and
    tokenizer), or a checkpoint directory that is itself a run directory."""
    if ckpt_dir.parent.name == "checkpoints":
        return ckpt_dir.parent.parent
    for d in (ckpt_dir, ckpt_dir.parent):
        if (d / CONFIG).is_file():
            return d
    return None


def read_config(path: Path) -> RunConfig:
    """RUN/config.json as a RunConfig (the only parser of that file)."""
    raw = read_json(path, RunError)
    train = raw.get("train") if isinstance(raw, dict) else None
    if isinstance(train, dict) and (train.get("steps") or 0) > 0 and (train.get("tokens") or 0) > 0:
        # written before one budget reset the other: steps won then, so the run trained `steps`
        raw = {**raw, "train": {**train, "tokens": 0}}
    return run_config_from_dict(raw, str(path))


def parse_record(line: str) -> dict | None:
    """One metrics.jsonl line as a record, or None: a record is a JSON object with an integer `step` >= 0
    and a numeric `tokens` (the one line rule of the writer's truncation and of every reader)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(record, dict):
        return None
    step, tokens = record.get("step"), record.get("tokens")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    if not isinstance(tokens, (int, float)) or isinstance(tokens, bool):
        return None
    return record


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """The records of a metrics.jsonl, and notes on what could not be read (a line cut short by a
    crash or a full disk, a line that is not a record)."""
    if not path.is_file():
        return [], [f"no {path.name}"]
    records, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        record = parse_record(line)
        if record is None:
            bad.append(n)
        else:
            records.append(record)
    notes = [f"{path.name}: skipped unreadable line(s) {', '.join(map(str, bad[:5]))}"
             + ("..." if len(bad) > 5 else "")] if bad else []
    if not records:
        notes.append(f"{path.name} has no metrics")
    return records, notes


class MetricsWriter:
    """Appends records to RUN/metrics.jsonl (rank 0; `enabled=False` on the others), mirrored to TensorBoard
    (RUN/tensorboard) when asked for and installed. A resumed or rolled-back run first drops the records
    after its step (`truncate`): it redoes them."""

    def __init__(self, path: Path, enabled: bool = True, tensorboard: bool = False):
        self.path, self.enabled, self.tb = path, enabled, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(path.parent / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed (pip install 'unipool[tensorboard]'); logging to "
                      "metrics.jsonl only", file=sys.stderr)

    def truncate(self, step: int) -> None:
        """Drop the records after `step`, and any line a crash or a full disk cut short, with a warning."""
        if not self.enabled or not self.path.is_file():
            return
        kept, bad = [], 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            record = parse_record(line) if line.strip() else {"step": -1}
            if record is None:
                bad += 1
            elif 0 <= record["step"] <= step:
                kept.append(line)
        if bad:
            print(f"warning: {self.path}: dropped {bad} unreadable line(s) (cut short by a crash or a full disk?)",
                  file=sys.stderr)
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if is_disk_full(e):
                raise DiskFullError(f"No space left on device while writing {self.path}") from None
            raise
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "tokens"):
                    self.tb.add_scalar(k, v, record["step"])
            if "routing" in record:
                self.tb.add_scalar("dead_experts", record["routing"]["dead_experts"], record["step"])
                self.tb.add_scalar("balance_cv", record["routing"]["balance_cv"], record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Run:
    def __init__(self, path: Path | None, config: RunConfig | None, checkpoint: Path | None):
        self.path = path  # the run directory; None for a checkpoint outside any run
        self.config = config
        self.checkpoint = checkpoint  # the checkpoint opened (the latest, for a run directory)
        self._meta: dict | None = None

    # ---- opening and creating --------------------------------------------------------------------
    @staticmethod
    def holds_run(path: str | Path) -> bool:
        """Whether `path` is a run directory (it has a config.json)."""
        return (Path(path) / CONFIG).is_file()

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """A run directory, a checkpoint directory or a model.safetensors file."""
        p = Path(path)
        if not p.exists():
            raise RunError(f"no such run or checkpoint: {p}")
        if p.is_dir() and cls.holds_run(p) and not (p / "model.safetensors").is_file():
            run_dir = p
            try:
                ckpt = resolve_checkpoint(p)
            except CheckpointError:
                if (p / "checkpoints" / "LATEST").is_file():
                    raise  # a LATEST that points nowhere is damage, not a run without checkpoints
                ckpt = None
        else:
            ckpt = resolve_checkpoint(p)
            run_dir = _run_dir_of(ckpt)
        config = read_config(run_dir / CONFIG) if run_dir and cls.holds_run(run_dir) else None
        return cls(run_dir, config, ckpt)

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, tokenizer: Tokenizer | Path | None = None, *,
               exist_ok: bool = False) -> Run:
        """Write RUN/config.json and tokenizer.json (a Tokenizer, or a tokenizer.json copied byte for
        byte); `exist_ok` rewrites the config of an existing run (a resumed run records the settings it
        continues with)."""
        p = Path(path)
        if cls.holds_run(p) and not exist_ok:
            raise RunError(f"{p} already holds a run")
        p.mkdir(parents=True, exist_ok=True)
        atomic_write_text(p / CONFIG, json.dumps(config.to_dict(), indent=2) + "\n")
        if isinstance(tokenizer, Path):
            shutil.copyfile(tokenizer, p / "tokenizer.json")
        elif tokenizer is not None:
            tokenizer.save(p / "tokenizer.json")
        ckpts = p / "checkpoints"
        return cls(p, config, resolve_checkpoint(p) if (ckpts / "LATEST").is_file() else None)

    # ---- layout ------------------------------------------------------------------------------------
    @property
    def checkpoints_dir(self) -> Path:
        return self._dir() / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return self._dir() / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self._dir() / "summary.json"

    def _dir(self) -> Path:
        if self.path is None:
            raise RunError(f"{self.checkpoint} is not inside a run directory")
        return self.path

    def add_weights(self, model: Unipool, step: int, meta: dict | None = None,
                    dtype: torch.dtype | None = None) -> Path:
        """`model`'s weights as checkpoint `step` of this run, through the atomic commit (LATEST then names
        it); the run now opens at it. Training checkpoints add their optimizer and RNG state to the same
        commit (unipool.train.checkpoint)."""
        self.checkpoint = add_weights(self.checkpoints_dir, step, model, meta, dtype)
        self._meta = None
        return self.checkpoint

    # ---- contents ----------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path:
        if self.checkpoint is None:
            raise RunError(f"{self.path} has no checkpoint yet")
        return self.checkpoint

    def meta(self) -> dict:
        """The opened checkpoint's meta.json (read once: step, model config and dtype all come from it)."""
        if self._meta is None:
            self._meta = read_meta(self.latest_checkpoint())
        return self._meta

    @property
    def step(self) -> int | None:
        return self.meta().get("step") if self.checkpoint is not None else None

    @property
    def model_config(self) -> ModelConfig:
        """The architecture: the checkpoint's own config, else the run config's."""
        if self.checkpoint is not None:
            return meta_model_config(self.meta(), self.checkpoint)
        if self.config is None:
            raise RunError("neither a checkpoint nor a run config to read the model from")
        return self.config.model

    def load_model(self, device: str | torch.device = "cpu") -> Unipool:
        """The latest checkpoint's model, in eval mode."""
        model, _ = load_model(self.latest_checkpoint(), device)
        return model.eval()

    def tokenizer_path(self) -> Path:
        for d in (self.checkpoint, self.path):
            if d is not None and (d / "tokenizer.json").is_file():
                return d / "tokenizer.json"
        where = " or ".join(str(d) for d in (self.checkpoint, self.path) if d is not None)
        raise RunError(f"no tokenizer.json in {where}")

    def tokenizer(self) -> Tokenizer:
        return Tokenizer.load(self.tokenizer_path())

    def metrics_writer(self, enabled: bool = True, tensorboard: bool = False) -> MetricsWriter:
        return MetricsWriter(self.metrics_path, enabled, tensorboard)

    def metrics(self) -> tuple[list[dict], list[str]]:
        """metrics.jsonl's records, and notes on lines that could not be read."""
        return read_metrics(self.metrics_path)

    def summary(self) -> dict | None:
        """summary.json of a finished run (None before the run finishes)."""
        if not self.summary_path.is_file():
            return None
        return read_json(self.summary_path, RunError)

    @property
    def train_seq_len(self) -> int | None:
        return self.config.train.seq_len if self.config else None

    def data_dir(self) -> Path:
        """The prepared data directory the run trained on. A relative data_dir is relative to where
        training ran: tried there, then beside the run."""
        value = self.config.data.data_dir if self.config else ""
        if not value:
            where = self.path / CONFIG if self.path else f"{self.checkpoint} (not inside a run directory)"
            raise RunError(f"no prepared data directory found in {where}; pass --data")
        candidates = [Path(value)]
        if not Path(value).is_absolute():
            candidates += [self.path.parent / value, self.path.parent.parent / value]
        for path in candidates:
            if (path / "index.json").is_file():
                return path
        raise RunError(f"the run's data directory {value} is not there (or not prepared); pass --data")

    def __repr__(self) -> str:
        return f"Run({self.path or self.checkpoint})"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
