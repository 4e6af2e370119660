"""Zero-shot evaluation with lm-evaluation-harness (`lm_eval`).

Approach: `UnipoolLM` is a small lm_eval `TemplateLM` around an in-memory unipool model, so whatever
the caller did to the model (e.g. the routing probe switching routers to random routing) is what gets
evaluated; no export, no copy. It implements the three request types:
- loglikelihood: lm_eval's own context/continuation split (`TemplateLM._encode_pair`), then one forward
  per right-padded batch; the sum of the continuation's log-probabilities and whether it is greedy.
- loglikelihood_rolling: lm_eval's disjoint rolling windows of max_seq_len tokens, EOS as the prefix.
- generate_until: greedy decoding (full recompute per token, no KV cache) until a stop string or EOS.
Right padding is safe: attention is causal and only positions before the padding are read.

An exported model (`unipool export RUN --hf DIR`) also runs under the stock harness:
    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True --tasks arc_easy
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from unipool.data.tokenizer import TokenizerError, as_tokenizers, eos_token
from unipool.errors import UnipoolError, require
from unipool.model.model import Unipool
from unipool.run import Run, default_device


class LMEvalError(UnipoolError):
    """lm-evaluation-harness is missing, a task is unknown, or the model/tokenizer cannot be evaluated."""


def require_lm_eval():
    require("lm_eval", "eval", "lm-evaluation-harness (unipool lm-eval, probe --tasks)")


def _make_lm_class():
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class UnipoolLM(TemplateLM):
        """lm_eval model around an in-memory `Unipool` (see the module docstring). `tokenizer` is anything
        `unipool.data.tokenizer.as_tokenizers` takes; text is encoded without special tokens and decoded
        without them."""

        def __init__(self, model: Unipool, tokenizer, batch_size: int = 8, max_gen_toks: int = 128):
            super().__init__()
            try:
                self.tok = as_tokenizers(tokenizer)
            except TokenizerError as e:
                raise LMEvalError(str(e)) from None
            eos = eos_token(self.tok)
            if eos is None:
                raise LMEvalError("the tokenizer has no end-of-text token (<|endoftext|>, </s>, ...)")
            self.eos_id: int = self.tok.token_to_id(eos)
            # Ids past the embedding table would fail deep inside torch, after the tasks are loaded.
            n_tok, n_model = self.tok.get_vocab_size(), model.config.vocab_size
            if n_tok > n_model:
                raise LMEvalError(f"the tokenizer has {n_tok} tokens, more than the model's vocabulary of "
                                  f"{n_model}: wrong tokenizer for this model?")
            self.model = model
            self.batch_size, self.max_gen_toks = int(batch_size), int(max_gen_toks)
            self.max_length = model.config.max_seq_len
            self._device = next(model.parameters()).device

        @property
        def eot_token_id(self) -> int:
            return self.eos_id

        def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
            return self.tok.encode(string, add_special_tokens=False).ids

        def tok_decode(self, tokens, **kwargs) -> str:
            return self.tok.decode(list(tokens), skip_special_tokens=True)

        @torch.no_grad()
        def _logprobs(self, inputs: list[list[int]]) -> torch.Tensor:
            """Log-softmax over the vocabulary for right-padded inputs: (B, S, V) float32."""
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), width, dtype=torch.long)
            for row, ids in enumerate(inputs):
                batch[row, : len(ids)] = torch.tensor(ids)
            return F.log_softmax(self.model(batch.to(self._device)).logits.float(), dim=-1).cpu()

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
            # Longest first: batches of similar length, and an out-of-memory error shows up at once.
            order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
            results: list[tuple[float, bool] | None] = [None] * len(requests)
            for start in range(0, len(order), self.batch_size):
                chunk = order[start:start + self.batch_size]
                inputs, conts = [], []
                for i in chunk:
                    _, ctx, cont = requests[i]
                    if not cont:
                        raise LMEvalError("empty continuation in a loglikelihood request")
                    # Keep the last max_length tokens of context + continuation; predict the continuation.
                    whole = (ctx + cont)[-(self.max_length + 1):]
                    inputs.append(whole[:-1])
                    conts.append(cont[-len(whole) + 1:] if len(cont) >= len(whole) else cont)
                logp = self._logprobs(inputs)
                for row, i in enumerate(chunk):
                    n, cont = len(inputs[row]), torch.tensor(conts[row])
                    logp_CV = logp[row, n - len(cont): n]
                    answer = (float(logp_CV.gather(1, cont[:, None]).sum()), bool((logp_CV.argmax(-1) == cont).all()))
                    results[i] = answer
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            out = []
            for req in requests:
                (text,) = req.args
                windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                    self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.max_length, context_len=1)]
                scores = self._loglikelihood_tokens([(None, ctx, cont) for ctx, cont in windows])
                total = sum(s for s, _ in scores)
                self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
                out.append(total)
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out = []
            for req in requests:
                context, gen_kwargs = req.args
                until = gen_kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(gen_kwargs.get("max_gen_toks", self.max_gen_toks))
                ids = self.tok_encode(context) or [self.eot_token_id]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    window = (ids + new)[-self.max_length:]
                    nxt = int(self._logprobs([window])[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    new.append(nxt)
                    text = self.tok_decode(new)
                    if any(stop in text for stop in until):
                        break
                for stop in until:  # cut at the first stop string, as the harness expects
                    text = text.split(stop)[0]
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                out.append(text)
            return out

    return UnipoolLM


def make_lm(model: Unipool, tokenizer, batch_size: int = 8, max_gen_toks: int = 128):
    """An lm_eval `LM` around the in-memory model (usable with lm_eval.simple_evaluate directly)."""
    require_lm_eval()
    return _make_lm_class()(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)


def _resolve_model(model_or_run, tokenizer, device):
    if isinstance(model_or_run, Unipool):
        if tokenizer is None:
            raise LMEvalError("an in-memory model needs a tokenizer (a tokenizer.json path or a Tokenizer)")
        return model_or_run, tokenizer
    run = Run.open(model_or_run)
    model = run.load_model(device)
    if tokenizer is None:
        try:
            tokenizer = run.tokenizer_path()
        except UnipoolError:
            raise LMEvalError(f"no tokenizer.json found for {model_or_run}; pass one with --tokenizer") from None
    return model, tokenizer


def resolve_tasks(tasks, include_path=None):
    """(task names, lm_eval TaskManager that knows them) for a list or comma-separated string of names;
    LMEvalError naming any unknown task. Call it before a long computation that ends in lm-eval, so
    that a misspelled task fails first."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
    paths = [str(p) for p in include_path] if isinstance(include_path, (list, tuple)) else \
        ([str(include_path)] if include_path else None)
    # Indexing lm_eval's thousands of built-in task YAMLs takes tens of seconds: skip it when the local
    # include path already has every requested task.
    manager = TaskManager(include_path=paths, include_defaults=False) if paths else None
    if manager is None or not all(manager.match_tasks([t]) for t in tasks):
        manager = TaskManager(include_path=paths)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise LMEvalError(f"unknown lm_eval task(s): {', '.join(unknown)} (add --include-path for local YAML tasks)")
    return tasks, manager


def run_lm_eval(model_or_run, tokenizer=None, tasks=("arc_easy",), include_path=None, limit=None,
                batch_size: int = 8, num_fewshot: int | None = None, device: str = "cpu",
                log_samples: bool = False, max_gen_toks: int = 128, bootstrap_iters: int = 1000,
                seed: int = 1234, task_manager=None) -> dict:
    """Evaluate on lm_eval tasks and return lm_eval's result dict, e.g. res["results"]["arc_easy"]["acc,none"]
    (and res["samples"] with log_samples=True).

    `model_or_run` is an in-memory `Unipool` (evaluated as it is, in eval mode; its training flag is restored
    afterwards), a run / checkpoint path, or any ready lm_eval `LM` (e.g. lm_eval's HFLM on an export).
    `tasks` is a list or a comma-separated string; `include_path` adds local task YAML directories.
    `task_manager`: the manager `resolve_tasks` returned for these tasks, to skip resolving them again.
    This is lm_eval's `simple_evaluate` minus its environment report (collect_env costs seconds per call,
    which adds up over the many evaluations of a routing probe). It seeds python, numpy and torch and the
    few-shot sampler all with `seed` (1234 by default; `simple_evaluate`'s own defaults are 0 for python
    and 1234 for the others).
    """
    require_lm_eval()
    import random

    import numpy as np
    from lm_eval.api.model import LM
    from lm_eval.evaluator import evaluate

    if task_manager is None:
        tasks, manager = resolve_tasks(tasks, include_path)
    else:
        tasks = [t.strip() for t in tasks.split(",") if t.strip()] if isinstance(tasks, str) else list(tasks)
        manager = task_manager

    if isinstance(model_or_run, LM):
        lm, model = model_or_run, None
    else:
        model, tokenizer = _resolve_model(model_or_run, tokenizer, device)
        lm = make_lm(model, tokenizer, batch_size=batch_size, max_gen_toks=max_gen_toks)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = manager.load(tasks)
    for task in loaded["tasks"].values():
        if num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=num_fewshot)
        elif task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=seed)

    was_training = model.training if model is not None else False
    if model is not None:
        model.eval()
    try:
        res = evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    finally:
        if model is not None:
            model.train(was_training)
    res["config"] = {"model": type(lm).__name__, "limit": limit, "batch_size": batch_size,
                     "num_fewshot": num_fewshot, "seed": seed, "bootstrap_iters": bootstrap_iters}
    return res


def add_lm_eval_args(parser) -> None:
    parser.add_argument("run", help="run directory, checkpoint directory or model.safetensors")
    parser.add_argument("--tasks", required=True, help="comma-separated lm_eval tasks, e.g. arc_easy,piqa")
    parser.add_argument("--include-path", default=None, help="directory of extra (local) lm_eval task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="evaluate only the first N examples per task")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    parser.add_argument("--output", default=None, metavar="FILE.json", help="write the results as JSON")


def cmd_lm_eval(args) -> int:
    require_lm_eval()
    from lm_eval.utils import make_table

    limit = args.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    res = run_lm_eval(args.run, args.tokenizer, args.tasks, include_path=args.include_path, limit=limit,
                      batch_size=args.batch_size, num_fewshot=args.num_fewshot,
                      device=args.device or default_device())
    print(make_table(res))
    if args.output:
        keep = {k: res[k] for k in ("results", "versions", "n-shot", "n-samples", "higher_is_better") if k in res}
        Path(args.output).write_text(json.dumps({"run": str(args.run), **keep}, indent=2, default=str) + "\n")
        print(f"wrote {args.output}")
    return 0
