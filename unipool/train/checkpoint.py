"""Checkpoints: safetensors weights + JSON metadata, resolvable from a run directory.

Layout of a run directory:
    RUN/config.json                      resolved config {"model": ..., "train": ..., "data": ...}
    RUN/tokenizer.json                   the tokenizer (HF tokenizers format)
    RUN/checkpoints/step_000100/model.safetensors
    RUN/checkpoints/step_000100/meta.json  {"step": ..., "model": {...model config...}, ...}
    RUN/checkpoints/LATEST               name of the newest complete checkpoint directory

A training checkpoint adds, next to the weights (see `save_checkpoint`):
    optimizer.pt          the full (unsharded) optimizer state, written by rank 0
    state_rank{r}.pt      per rank: RNG states (python, numpy, torch, cuda), the data sampler's
                          position, and the model's routing buffers (each rank keeps its own)
All .pt files hold tensors and plain containers only and are read with torch.load(weights_only=True).
The learning-rate schedule is a pure function of the step, so the step is its whole state.

Writes are atomic: files go into checkpoints/.tmp_step_XXXXXX, are fsynced, the directory is renamed
to step_XXXXXX, and only then is LATEST replaced (write + fsync + os.replace). A crash at any point
leaves LATEST naming the previous complete checkpoint; a full disk does too, and says so.
A training checkpoint is written only when every weight and optimizer state is finite, so retention
(which keeps LATEST and the newest ones) can never prune the last finite checkpoint in favour of NaNs.

Reading trusts nothing: LATEST must name a directory inside RUN/checkpoints, meta.json fields are
type-checked, the config's tensor shapes are compared with the safetensors header before anything is
allocated, and a .pt state whose structure does not fit the model is one CheckpointError.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from unipool.errors import DiskFullError, UnipoolError, is_disk_full, read_json
from unipool.model.config import ConfigError, ModelConfig
from unipool.model.model import Unipool, build_model
from unipool.train import distributed as dist


class CheckpointError(UnipoolError):
    pass


class NonFiniteStateError(CheckpointError):
    """The model or optimizer holds NaN/inf: the checkpoint is not written."""


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


def latest_target(latest: Path) -> Path:
    """The checkpoint directory LATEST names. Only a plain name of a directory inside the same
    checkpoints/ is followed: an absolute path, `..` or a symlink out of the run is refused, so a
    checkpoint planted elsewhere is never loaded by eval or --resume."""
    root = latest.parent
    name = latest.read_text(encoding="utf-8", errors="replace").strip()
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


# ---- training checkpoints ------------------------------------------------------------------------

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


def save_torch(obj: object, path: Path) -> None:
    # Through a Python file object: a full disk then raises OSError(ENOSPC), where torch.save(path)'s
    # own writer reports only an opaque zip-writer error.
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def commit_checkpoint(root: Path, step: int, keep_last: int, keep_every: int = 0, protect: tuple[str, ...] = ()) -> Path:
    """Rank 0, after every rank wrote its files: publish the temporary directory, point LATEST at it,
    then apply retention. Each step is atomic; LATEST changes only once the checkpoint is complete."""
    tmp, final = tmp_checkpoint_dir(root, step), root / checkpoint_name(step)
    for f in tmp.iterdir():
        _fsync(f)
    _fsync(tmp)
    if final.exists():  # the same step saved again after resuming from an earlier checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    latest_tmp = root / "LATEST.tmp"
    latest_tmp.write_text(final.name + "\n")
    _fsync(latest_tmp)
    os.replace(latest_tmp, root / "LATEST")
    _fsync(root)
    prune_checkpoints(root, keep_last, keep_every, protect)
    return final


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    found = []
    for p in root.glob("step_*"):
        if p.is_dir() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return sorted(found)


def prune_checkpoints(root: Path, keep_last: int, keep_every: int = 0, protect: tuple[str, ...] = ()) -> None:
    """Keep the newest `keep_last` checkpoints, every step divisible by `keep_every`, LATEST's, and
    those named in `protect` (the training loop's last checkpoint before a non-finite step)."""
    ckpts = list_checkpoints(root)
    latest = (root / "LATEST").read_text().strip() if (root / "LATEST").is_file() else None
    keep = {p for _, p in ckpts[-keep_last:]}
    for step, p in ckpts:
        if p in keep or p.name == latest or p.name in protect or (keep_every > 0 and step % keep_every == 0):
            continue
        shutil.rmtree(p, ignore_errors=True)


def remove_stale_tmp(root: Path) -> None:
    for p in root.glob(".tmp_step_*"):
        shutil.rmtree(p, ignore_errors=True)


def load_torch(path: Path) -> dict:
    """torch.load(weights_only=True) with one-line errors for missing or corrupt files."""
    if not path.is_file():
        raise CheckpointError(f"missing {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- pickle/zip/EOF errors come in many types; all mean a corrupt file
        raise CheckpointError(f"corrupt {path}: {str(e).splitlines()[0][:200]}") from None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # an FSDP2 DTensor: this rank's shard


def nonfinite_state(model: Unipool, optimizer) -> list[str]:
    """Names of the parameters, floating buffers and optimizer states holding NaN or inf (this rank's
    shards; one host sync for all of them, the names are looked up only when something is wrong)."""
    names = {p: n for n, p in model.named_parameters()}
    tensors = [(n, p) for n, p in model.named_parameters()]
    tensors += [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
    for p, st in optimizer.state.items():
        tensors += [(f"optimizer.{names.get(p, '?')}.{k}", v) for k, v in st.items()
                    if isinstance(v, torch.Tensor) and v.is_floating_point()]
    tensors = [(n, _local(t).detach()) for n, t in tensors if _local(t).numel()]
    if not tensors:
        return []
    # min and max propagate NaN and show +-inf: one reduction pass without a boolean copy (~35x
    # faster than isfinite().all() on CPU: 18 vs 636 ms for 50M floats)
    extremes = torch.stack([torch.stack(torch.aminmax(t)).float() for _, t in tensors])
    if bool(torch.isfinite(extremes).all()):
        return []
    return [n for (n, _), ok in zip(tensors, torch.isfinite(extremes).all(1).tolist()) if not ok]


def nonfinite_anywhere(model: Unipool, optimizer) -> str | None:
    """None when every rank's state is finite, else ": name, ..." for this rank's bad tensors (empty
    on a rank whose own shards are finite). All ranks take part, so all get the same answer."""
    bad = nonfinite_state(model, optimizer)
    device = next(model.parameters()).device
    if dist.all_reduce_sum(torch.tensor(float(len(bad)), device=device)) == 0:
        return None
    return (f": {', '.join(bad[:3])}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")) if bad else ""


@contextmanager
def _disk_full_is_one_line(root: Path, step: int):
    """Turn a full disk during a checkpoint write into one line that says so; the half-written
    temporary directory is removed (it holds the space) and LATEST still names the previous one."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        shutil.rmtree(tmp_checkpoint_dir(root, step), ignore_errors=True)
        latest = root / "LATEST"
        kept = latest.read_text().strip() if latest.is_file() else "none"
        raise DiskFullError(f"No space left on device while saving checkpoint {checkpoint_name(step)} in {root} "
                            f"(the latest complete checkpoint, {kept}, is intact)") from None


def save_checkpoint(root: Path, step: int, tokens: int, model: Unipool, optimizer, sampler, mode: str,
                    info: dist.DistInfo, keep_last: int, keep_every: int = 0, protect: tuple[str, ...] = ()) -> Path:
    """Atomic training checkpoint under `root` (RUN/checkpoints): full weights and optimizer state
    from rank 0, and each rank's RNG, sampler position and routing buffers. `restore_checkpoint`
    reads back exactly this. Raises NonFiniteStateError, writing nothing, when any rank holds NaN/inf
    weights or optimizer state. Retention then keeps `protect` too (see prune_checkpoints)."""
    bad = nonfinite_anywhere(model, optimizer)
    if bad is not None:
        raise NonFiniteStateError(f"non-finite weights or optimizer state at step {step}{bad}; "
                                  f"checkpoint {checkpoint_name(step)} not written")
    with _disk_full_is_one_line(root, step):
        return _write_checkpoint(root, step, tokens, model, optimizer, sampler, mode, info, keep_last, keep_every,
                                 protect)


def _write_checkpoint(root: Path, step: int, tokens: int, model: Unipool, optimizer, sampler, mode: str,
                      info: dist.DistInfo, keep_last: int, keep_every: int, protect: tuple[str, ...]) -> Path:
    model_state, optim_state = dist.full_state_dicts(model, optimizer, mode)
    if info.is_main:
        begin_checkpoint(root, step)
    dist.barrier()
    tmp = tmp_checkpoint_dir(root, step)
    if info.is_main:
        meta = {"step": step, "tokens": tokens, "world_size": info.world_size, "dist_mode": mode}
        save_weights(model_state, model.config, tmp, meta)
        save_torch(optim_state, tmp / "optimizer.pt")
    persistent = model.state_dict().keys()  # routing statistics, not the RoPE tables
    buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers() if k in persistent}
    save_torch({"rng": rng_state(), "sampler": sampler.state_dict(), "buffers": buffers},
               tmp / f"state_rank{info.rank}.pt")
    dist.barrier()
    final = root / checkpoint_name(step)
    if info.is_main:
        final = commit_checkpoint(root, step, keep_last, keep_every, protect)
    dist.barrier()
    return final


def restore_checkpoint(ckpt_dir: Path, model: Unipool, optimizer, sampler, mode: str, info: dist.DistInfo) -> int:
    """The mirror of `save_checkpoint`: weights (into the unwrapped model, before wrapping), optimizer
    state (after wrapping), this rank's sampler position, routing buffers and RNG. Returns the step."""
    meta = read_meta(ckpt_dir)
    if "step" not in meta:
        raise CheckpointError(f"corrupt {ckpt_dir / 'meta.json'}: no step")
    if meta.get("world_size", 1) != info.world_size:
        raise CheckpointError(f"cannot resume {ckpt_dir}: written by {meta.get('world_size')} "
                              f"process(es), now {info.world_size}")
    optim_path, state_path = ckpt_dir / "optimizer.pt", ckpt_dir / f"state_rank{info.rank}.pt"
    optim_state, state = load_torch(optim_path), load_torch(state_path)
    if not isinstance(state, dict) or not {"rng", "sampler", "buffers"} <= state.keys():
        raise CheckpointError(f"corrupt {state_path}: expected rng, sampler and buffers")
    with _damage_is_one_line(optim_path):
        dist.load_optimizer_state(model, optimizer, optim_state, mode)
        for p, st in optimizer.state.items():  # a wrong shape would otherwise fail only in the next step
            for k, v in st.items():
                if k != "step" and (not isinstance(v, torch.Tensor) or v.shape != p.shape):
                    raise ValueError(f"state {k!r} does not fit a parameter of shape {list(p.shape)}")
    with _damage_is_one_line(state_path):
        sampler.load_state_dict(state["sampler"])
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in state["buffers"]:
                    buf.copy_(state["buffers"][name])
        set_rng_state(state["rng"])
    bad = nonfinite_anywhere(model, optimizer)
    if bad is not None:  # written by a version without the finiteness check, or damaged
        raise CheckpointError(f"{ckpt_dir} holds non-finite weights or optimizer state{bad}; write the name "
                              f"of an earlier checkpoint into {ckpt_dir.parent / 'LATEST'} to resume from it")
    return meta["step"]


@contextmanager
def _damage_is_one_line(path: Path):
    """A .pt file that loaded (weights_only) but whose structure does not fit: one line naming it."""
    try:
        yield
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise CheckpointError(f"corrupt {path}: {type(e).__name__} {detail}".rstrip()) from None


def rng_state() -> dict:
    """Every random generator the training loop touches, as tensors and plain containers."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
