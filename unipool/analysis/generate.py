"""`unipool generate`: sample text from a run or checkpoint.

Sampling: logits / temperature, then top-k, then top-p (nucleus) filtering, then one multinomial
draw from a seeded generator; temperature 0 (or below ~1e-38) is greedy argmax. There is no KV
cache: every step recomputes the forward pass over the last max_seq_len tokens, which is simple and
fast enough for the model sizes this library trains on one machine. Generation stops at EOS (not returned).
An empty prompt starts from EOS, which is the document separator the model saw in training.
"""

from __future__ import annotations

import argparse
import math

import torch

from unipool.errors import UnipoolError
from unipool.model.model import Unipool
from unipool.run import Run, default_device


class GenerateError(UnipoolError):
    pass


def filter_logits(logits_V: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf every logit outside the top-k, then outside the nucleus of probability top_p.

    The nucleus is the smallest set of most likely tokens whose probabilities sum to >= top_p
    (the most likely token is always kept)."""
    logits_V = logits_V.clone()
    if top_k is not None and top_k < logits_V.shape[-1]:
        kth = torch.topk(logits_V, top_k).values[..., -1:]
        logits_V[logits_V < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_V, order_V = torch.sort(logits_V, descending=True)
        probs_V = torch.softmax(sorted_V.float(), dim=-1)
        # A token is dropped when the tokens ranked above it already reach top_p.
        drop_V = (probs_V.cumsum(-1) - probs_V) >= top_p
        drop_V[..., 0] = False
        drop_V = torch.zeros_like(drop_V).scatter(-1, order_V, drop_V)  # back to vocabulary order
        logits_V = logits_V.masked_fill(drop_V, float("-inf"))
    return logits_V


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerateError(f"top-k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerateError(f"top-p must be in (0, 1], got {top_p}")


@torch.no_grad()
def generate_ids(model: Unipool, prompt_ids: list[int], max_new_tokens: int = 100, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_id: int | None = None) -> list[int]:
    """New token ids after `prompt_ids` (at most max_new_tokens; stops before EOS)."""
    check_sampling(temperature, top_k, top_p)
    if not prompt_ids:
        raise GenerateError("empty prompt")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    was_training = model.training
    model.eval()
    ids = list(prompt_ids)
    new: list[int] = []
    try:
        for _ in range(max_new_tokens):
            window = torch.tensor([ids[-model.config.max_seq_len:]], device=device)
            logits_V = model(window).logits[0, -1].float()
            if not bool(torch.isfinite(logits_V).all()):
                raise GenerateError("the model's logits are not finite (NaN/inf weights: a diverged checkpoint?)")
            # A temperature below float32's smallest normal number is its limit 0, greedy (below ~1e-45
            # it rounds to 0 and the division gives NaN). Above it, shifting the top logit to 0 first keeps
            # the division finite there; -inf elsewhere is a valid zero probability.
            if temperature < torch.finfo(torch.float32).tiny:
                next_id = int(logits_V.argmax())
            else:
                logits_V = filter_logits((logits_V - logits_V.max()) / temperature, top_k, top_p)
                next_id = int(torch.multinomial(torch.softmax(logits_V, -1), 1, generator=generator))
            if next_id == eos_id:
                break
            ids.append(next_id)
            new.append(next_id)
    finally:
        model.train(was_training)
    return new


def generate(model: Unipool, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None) -> str:
    """The continuation of `prompt` (without the prompt itself) as text."""
    prompt_ids = tokenizer.encode(prompt) if prompt else []
    if not prompt_ids:
        prompt_ids = [tokenizer.eos_id]
    if max(prompt_ids) >= model.config.vocab_size:
        raise GenerateError(f"the tokenizer produced id {max(prompt_ids)}, outside the model's vocabulary "
                            f"of {model.config.vocab_size}: wrong tokenizer for this model?")
    new = generate_ids(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_id)
    return tokenizer.decode(new)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN_OR_CKPT", help="run directory, checkpoint directory or model.safetensors")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the nucleus of this probability mass")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one each run)")
    p.add_argument("--num-samples", type=int, default=1, help="samples to draw (seeds seed, seed+1, ...)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")


def cmd_generate(args: argparse.Namespace) -> int:
    check_sampling(args.temperature, args.top_k, args.top_p)
    if args.max_new_tokens < 0 or args.num_samples < 1:
        raise GenerateError("--max-new-tokens must be >= 0 and --num-samples >= 1")
    run = Run.open(args.run)
    model = run.load_model(args.device or default_device())
    tokenizer = run.tokenizer()
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature,
                        args.top_k, args.top_p, seed)
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + text)
    return 0
