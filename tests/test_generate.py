"""Sampling: greedy = step-by-step argmax, top-k/top-p filters on known distributions, seeds, EOS, CLI."""

import pytest
import torch
from helpers import make_run

from unipool.analysis.generate import filter_logits, generate, generate_ids
from unipool.cli import main
from unipool.data.tokenizer import Tokenizer

PROBS = torch.tensor([0.1, 0.5, 0.05, 0.3, 0.05])


def kept(logits):
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_top_p_keeps_the_minimal_nucleus():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_p=0.45)) == {1}  # 0.5 alone reaches 0.45
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3}  # 0.5 < 0.75 <= 0.8
    assert kept(filter_logits(logits, top_p=0.85)) == {1, 3, 0}  # 0.8 < 0.85 <= 0.9
    nucleus = kept(filter_logits(logits, top_p=0.92))  # 0.9 + one of the two 0.05 tokens reaches 0.95
    assert len(nucleus) == 4 and {0, 1, 3} < nucleus
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    # kept logits are unchanged; a (B, V) batch is filtered row by row
    assert torch.equal(filter_logits(logits, top_p=0.75)[[1, 3]], logits[[1, 3]])
    batch = torch.stack([logits, logits.flip(0)])  # the flipped row has 0.5 at 3 and 0.3 at 1
    out = filter_logits(batch, top_p=0.75)
    assert kept(out[0]) == {1, 3} and kept(out[1]) == {3, 1}
    out = filter_logits(torch.stack([logits, logits.roll(1)]), top_p=0.75)
    assert kept(out[1]) == {2, 4}


def test_top_k_then_top_p():
    logits = PROBS.log()
    assert kept(filter_logits(logits, top_k=2)) == {1, 3}
    assert kept(filter_logits(logits, top_k=1)) == {1}
    # after top-3 the renormalised mass is 0.5/0.9, 0.3/0.9, 0.1/0.9: the first two reach 0.88 < 0.9
    assert kept(filter_logits(logits, top_k=3, top_p=0.9)) == {0, 1, 3}
    assert kept(filter_logits(logits, top_k=3, top_p=0.85)) == {1, 3}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("gen") / "run")


def test_greedy_is_stepwise_argmax_with_window_crop(run):
    _, model = run
    max_len = model.config.max_seq_len
    prompt = torch.randint(0, model.config.vocab_size, (max_len + 5,)).tolist()  # longer than the window
    out = generate_ids(model, prompt, max_new_tokens=8, temperature=0.0)
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids[-max_len:]])).logits[0, -1].argmax()))
    assert out == ids[len(prompt):]
    # top-k = 1 sampling at any temperature is greedy too
    assert generate_ids(model, prompt, max_new_tokens=8, temperature=1.3, top_k=1, seed=5) == out


def test_samples_stay_in_the_filtered_support_and_seeds_reproduce(run):
    _, model = run
    prompt = [5, 17, 42]
    a = generate_ids(model, prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=11)
    assert a == generate_ids(model, prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=11)
    assert a != generate_ids(model, prompt, max_new_tokens=12, temperature=1.0, top_k=3, seed=12)
    ids = list(prompt)
    with torch.no_grad():
        for token in a:
            top3 = model(torch.tensor([ids])).logits[0, -1].topk(3).indices.tolist()
            assert token in top3
            ids.append(token)
    # nucleus sampling with a tiny p is greedy
    assert generate_ids(model, prompt, 6, temperature=1.0, top_p=1e-6, seed=3) == \
        generate_ids(model, prompt, 6, temperature=0.0)


def test_tiny_temperatures_are_greedy(run):
    # logits / 1e-40 overflow float32 and 1e-300 is 0 in float32: both must give the limit, greedy
    _, model = run
    greedy = generate_ids(model, [5, 17, 42], 6, temperature=0.0)
    for temperature in (1e-40, 1e-300):
        assert generate_ids(model, [5, 17, 42], 6, temperature=temperature, seed=0) == greedy


def test_stops_at_eos(run):
    _, model = run
    greedy = generate_ids(model, [1, 2, 3], max_new_tokens=6, temperature=0.0)
    eos = greedy[3]
    stopped = generate_ids(model, [1, 2, 3], max_new_tokens=6, temperature=0.0, eos_id=eos)
    assert stopped == greedy[:greedy.index(eos)]


def test_generate_text_and_cli(run, capsys):
    root, model = run
    tok = Tokenizer.load(root)
    text = generate(model, tok, "The import statement", max_new_tokens=10, temperature=0.0)
    ids = generate_ids(model, tok.encode("The import statement"), 10, temperature=0.0, eos_id=tok.eos_id)
    assert text == tok.decode(ids)
    assert main(["generate", str(root), "--prompt", "The import statement", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "The import statement" + text + "\n"
    # an empty prompt starts a new document after EOS
    assert generate(model, tok, "", 5, temperature=0.0) == tok.decode(
        generate_ids(model, [tok.eos_id], 5, temperature=0.0, eos_id=tok.eos_id))
    for flags, message in ((["--temperature", "-1"], "temperature"), (["--top-p", "1.5"], "top-p"),
                           (["--top-k", "0"], "top-k")):
        assert main(["generate", str(root), *flags]) == 2
        assert message in capsys.readouterr().err
