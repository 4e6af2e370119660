"""Weight files and the checkpoint layout: safetensors weights + JSON metadata, committed atomically.

Layout of a checkpoints directory (RUN/checkpoints, see unipool.run):
    step_000100/model.safetensors   the full (unsharded) model state
    step_000100/meta.json           {"step": ..., "dtype": ..., "model": {...model config...}, ...}
    LATEST                          the name of the newest complete checkpoint directory

Writes are atomic: files go into .tmp_step_XXXXXX, are fsynced, the directory is renamed to step_XXXXXX,
and only then is LATEST replaced (write + fsync + os.replace). A crash at any point leaves LATEST naming
the previous complete checkpoint. `add_weights` is that commit for a bare model (imports, conversions,
test fixtures); a training checkpoint adds optimizer and per-rank state to the same commit
(unipool.train.checkpoint).

Reading trusts nothing: LATEST must name a directory inside the same checkpoints/ (`read_latest` is its
one reader), meta.json fields are type-checked, the config's tensor shapes are compared with the
safetensors header before anything is allocated.

This module sits below `unipool.run`, analysis, interop and training: it imports only the model core.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from unipool.errors import UnipoolError, read_json
from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import Unipool, build_model


class CheckpointError(UnipoolError):
    pass


# dtype names as checkpoints, exports and the command line spell them
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory, a checkpoint directory or a model.safetensors file -> the checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such run or checkpoint: {p}")
    if p.is_file():
        p = p.parent
    if (p / "model.safetensors").is_file():
        return p
    latest = p / "checkpoints" / "LATEST"
    if latest.is_file():
        ckpt = latest_target(latest)
        if (ckpt / "model.safetensors").is_file():
            return ckpt
        raise CheckpointError(f"{latest} points to {ckpt.name}, which has no model.safetensors")
    raise CheckpointError(f"{p} is neither a run directory with checkpoints nor a checkpoint directory")


def read_latest(root: Path) -> str | None:
    """The checkpoint name LATEST in `root` (a checkpoints directory) holds, or None without one: the one
    reader of LATEST (`latest_target` checks the name before anything follows it)."""
    latest = root / "LATEST"
    if not latest.is_file():
        return None
    return latest.read_text(encoding="utf-8", errors="replace").strip()


def latest_target(latest: Path) -> Path:
    """The checkpoint directory LATEST names. Only a plain name of a directory inside the same
    checkpoints/ is followed: an absolute path, `..` or a symlink out of the run is refused, so a
    checkpoint planted elsewhere is never loaded by eval or --resume."""
    root = latest.parent
    name = read_latest(root) or ""
    ckpt = root / name
    if (not name or name in (".", "..") or Path(name).name != name or "\\" in name
            or ckpt.resolve().parent != root.resolve()):
        raise CheckpointError(f"{latest} must name a checkpoint directory inside {root}, not {name[:100]!r}")
    return ckpt


# meta.json fields a reader relies on, and their types (other fields are free-form notes)
META_FIELDS = {"step": int, "tokens": int, "world_size": int, "dist_mode": str, "dtype": str, "model": dict}


def read_meta(ckpt_dir: Path) -> dict:
    """meta.json, with the fields readers use type-checked: a damaged file is one CheckpointError."""
    path = ckpt_dir / "meta.json"
    meta = read_json(path, CheckpointError)
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt {path}: expected a JSON object, got {type(meta).__name__}")
    for key, tp in META_FIELDS.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, tp) or isinstance(value, bool)):
            raise CheckpointError(f"corrupt {path}: {key} should be {tp.__name__}, got {value!r:.80}")
        if tp is int and key in meta and value < (1 if key == "world_size" else 0):
            raise CheckpointError(f"corrupt {path}: {key} out of range ({value})")
    return meta


def meta_model_config(meta: dict, ckpt_dir: Path) -> ModelConfig:
    """The model config a checkpoint's meta.json declares (one line naming the file if it is bad)."""
    if "model" not in meta:
        raise CheckpointError(f"{ckpt_dir / 'meta.json'} has no model config")
    try:
        return ModelConfig.from_dict(meta["model"])
    except ConfigError as e:
        raise CheckpointError(f"{ckpt_dir / 'meta.json'}: {e}") from None


def check_weight_shapes(cfg: ModelConfig, ckpt_dir: Path) -> None:
    """The tensors `cfg` implies against model.safetensors' header (names and shapes), before any
    memory is allocated: a meta.json declaring a huge embedding fails here, not in a 32 TB allocation."""
    from safetensors import SafetensorError, safe_open

    path = ckpt_dir / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        with safe_open(str(path), "pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt weights {path}: {e}") from None
    expected = {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt_dir}: the weights do not match meta.json's model config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, shape in expected.items():
        if stored[k] != shape:
            raise CheckpointError(f"{ckpt_dir}: the weights do not match meta.json's model config: {k} is "
                                  f"{list(stored[k])} in model.safetensors, {list(shape)} by the config")


def main_dtype(tensors) -> torch.dtype:
    """The floating-point dtype that holds most of the elements (float32 if there is none)."""
    numel: dict[torch.dtype, int] = {}
    for t in tensors:
        if t.is_floating_point():
            numel[t.dtype] = numel.get(t.dtype, 0) + t.numel()
    return max(numel, key=numel.get) if numel else torch.float32


def save_model(model: Unipool, ckpt_dir: str | Path, meta: dict | None = None,
               dtype: torch.dtype | None = None) -> None:
    """Weights as safetensors and the model config in meta.json (not atomic: see save_checkpoint)."""
    save_weights(model.state_dict(), model.config, ckpt_dir, meta, dtype)


def save_weights(state: dict[str, torch.Tensor], cfg: ModelConfig, ckpt_dir: str | Path,
                 meta: dict | None = None, dtype: torch.dtype | None = None) -> None:
    """A full (unsharded) model state dict as model.safetensors, and meta.json with the model config and
    the dtype the weights are stored in (`dtype`: cast floating-point weights to it first)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    stored = main_dtype(state.values())
    save_file(state, str(ckpt_dir / "model.safetensors"))
    meta = {**(meta or {}), "dtype": str(stored).removeprefix("torch."), "model": cfg.to_dict()}
    (ckpt_dir / "meta.json").write_text(json.dumps(meta, indent=2))


def load_weights(ckpt_dir: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """model.safetensors of a checkpoint directory (the one reader of checkpoint weights)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = ckpt_dir / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"corrupt weights {path}: {e}") from None


def load_state(model: Unipool, state: dict[str, torch.Tensor], where: str | Path,
               optional: tuple[str, ...] = (), error: type[UnipoolError] = CheckpointError) -> None:
    """Strict load: every tensor of the model present with its shape, nothing unknown (keys in
    `optional` may be missing). One line names what does not match."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise error(f"{where}: weights do not match the config: {str(e).splitlines()[-1].strip()}") from None
    missing = [k for k in missing if k not in optional]
    if missing or unexpected:
        raise error(f"{where}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Unipool, dict]:
    """Load a model from a run directory, checkpoint directory or model.safetensors file."""
    ckpt_dir = resolve_checkpoint(path)
    meta = read_meta(ckpt_dir)
    cfg = meta_model_config(meta, ckpt_dir)
    check_weight_shapes(cfg, ckpt_dir)
    model = build_model(cfg, device, init=False)
    load_state(model, load_weights(ckpt_dir, device), ckpt_dir)
    return model, meta


# ---- the atomic commit ----------------------------------------------------------------------------

def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tmp_checkpoint_dir(root: Path, step: int) -> Path:
    return root / f".tmp_{checkpoint_name(step)}"


def begin_checkpoint(root: Path, step: int) -> Path:
    """Rank 0: a fresh temporary directory for checkpoint `step` (a leftover from a crash is removed)."""
    tmp = tmp_checkpoint_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_checkpoint(root: Path, step: int, keep_last: int | None, keep_every: int = 0,
                      protect: tuple[str, ...] = ()) -> Path:
    """Rank 0, after every rank wrote its files: publish the temporary directory, point LATEST at it,
    then apply retention (none for keep_last=None). Each step is atomic; LATEST changes only once the
    checkpoint is complete."""
    tmp, final = tmp_checkpoint_dir(root, step), root / checkpoint_name(step)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again after resuming from an earlier checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    write_latest(root, final.name)
    if keep_last is not None:
        prune_checkpoints(root, keep_last, keep_every, protect)
    return final


def write_latest(root: Path, name: str) -> None:
    """Point LATEST at checkpoint `name` (write + fsync + os.replace: the one writer of LATEST). Besides the
    commit, for a deliberate rewind to an earlier checkpoint that is still there."""
    if not (root / name / "model.safetensors").is_file():
        raise CheckpointError(f"cannot point {root / 'LATEST'} at {name}: no such checkpoint")
    latest_tmp = root / "LATEST.tmp"
    latest_tmp.write_text(name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    _fsync(root)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int, keep_every: int = 0, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` checkpoints, every step divisible by `keep_every`, LATEST's, and
    those named in `protect` (the training loop's last checkpoint before a non-finite step). Checkpoints
    after LATEST's step belong to a branch someone rewound LATEST away from: neither counted nor removed
    (the run writes over each when it reaches that step again)."""
    ckpts = list_checkpoints(root)
    latest = read_latest(root)
    latest_step = next((step for step, p in ckpts if p.name == latest), None)
    if latest_step is not None:
        ckpts = [(step, p) for step, p in ckpts if step <= latest_step]
    keep = {p for _, p in ckpts[-keep_last:]}
    for step, p in ckpts:
        if p in keep or p.name == latest or p.name in protect or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(root: Path) -> None:
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)


def add_weights(root: Path, step: int, model: Unipool, meta: dict | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """`model`'s weights as checkpoint `step` under `root` (a checkpoints directory), through the atomic
    commit: LATEST names it once it is complete. No retention: nothing else is removed."""
    tmp = begin_checkpoint(root, step)
    save_model(model, tmp, {"step": step, **(meta or {})}, dtype)
    return commit_checkpoint(root, step, keep_last=None)
