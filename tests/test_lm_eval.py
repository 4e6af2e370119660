"""lm-evaluation-harness on a local multiple-choice task, offline: the harness's accuracy equals a direct
computation with our model, rolling log-likelihood and greedy generation match references, and the
stock HF backend on an export scores every choice as our wrapper does."""

import json
import pydoc_data.topics

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance

from unipool import cli
from unipool.data.tokenizer import train_bpe
from unipool.interop.lm_eval import LMEvalError, make_lm, run_lm_eval
from unipool.model.model import build_model
from unipool.presets import get_preset
from unipool.weights import add_weights

TASK = "unipool_tiny_mc"
ITEMS = [
    ("The sun rises in the", ["east", "west", "north", "south"], 0),
    ("Water freezes at zero degrees", ["Celsius", "Fahrenheit", "Kelvin", "Rankine"], 0),
    ("A week has seven", ["days", "months", "years", "hours"], 0),
    ("The opposite of hot is", ["cold", "warm", "loud", "tall"], 0),
    ("Bees make", ["honey", "milk", "silk", "wool"], 0),
    ("The largest ocean on Earth is the", ["Pacific", "Atlantic", "Indian", "Arctic"], 0),
    ("A triangle has three", ["sides", "wheels", "legs", "doors"], 0),
    ("In Python, a function is defined with the keyword", ["def", "func", "lambda", "class"], 0),
    ("The loop that repeats while a condition is true is the", ["while loop", "if block", "import", "return"], 0),
    ("Plants take in carbon dioxide and release", ["oxygen", "helium", "iron", "salt"], 0),
    ("The moon orbits the", ["Earth", "Sun", "Mars", "comet"], 0),
    ("Shakespeare wrote the play", ["Hamlet", "Faust", "Candide", "Ulysses"], 0),
    ("A year usually has twelve", ["months", "weeks", "days", "seasons"], 0),
    ("Ice is water in its", ["solid", "liquid", "gaseous", "plasma"], 0),
    ("The colour of a clear daytime sky is", ["blue", "green", "red", "black"], 0),
    ("Fish breathe through their", ["gills", "lungs", "skin", "fins"], 0),
    ("A raised exception can be caught with a try statement and an", ["except clause", "else clause",
                                                                      "import", "assert"], 0),
    ("The capital of Italy is", ["Rome", "Paris", "Madrid", "Berlin"], 0),
    ("Cows eat", ["grass", "stones", "metal", "plastic"], 0),
    ("To open a file for reading in Python you call", ["open", "read", "file", "load"], 0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    corpus = root / "topics.txt"
    corpus.write_text("\n\n".join(pydoc_data.topics.topics.values()))
    tok = train_bpe([corpus], 512)
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                            for q, c, a in ITEMS))
    (tasks / "mc.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / 'mc.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    model = build_model(get_preset("debug").replace(vocab_size=tok.vocab_size, top_k=2))
    with torch.no_grad():  # sharper predictions than the 0.02-std init: choices get clearly different scores
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model.eval(), tok, tasks


_DIRECT: dict = {}


def _loglik(model, tok, context, continuation):
    """Direct: sum of log p(continuation tokens | context) in one forward of context + continuation."""
    key = (id(model), context, continuation)
    if key not in _DIRECT:
        _DIRECT[key] = _loglik_uncached(model, tok, context, continuation)
    return _DIRECT[key]


def _loglik_uncached(model, tok, context, continuation):
    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), dim=-1)
    return sum(float(logp[i - 1, whole[i]]) for i in range(len(ctx), len(whole)))


def test_harness_accuracy_equals_direct_computation(setup):
    model, tok, tasks = setup
    res = run_lm_eval(model, tok, TASK, include_path=tasks, batch_size=7, log_samples=True)
    acc = res["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["n-samples"][TASK]["effective"] == len(ITEMS)

    correct = 0
    for q, choices, answer in ITEMS:
        scores = [_loglik(model, tok, q, " " + c) for c in choices]
        correct += int(max(range(len(choices)), key=scores.__getitem__) == answer)
    assert acc == pytest.approx(correct / len(ITEMS))
    # and every per-choice log-likelihood the harness saw is the direct one
    for sample in res["samples"][TASK]:
        q, choices = sample["doc"]["question"], sample["doc"]["choices"]
        for (ll, _), c in zip(sample["filtered_resps"], choices):
            assert float(ll) == pytest.approx(_loglik(model, tok, q, " " + c), abs=1e-4)


def test_rolling_loglikelihood_and_generation_match_references(setup):
    model, tok, _ = setup
    lm = make_lm(model, tok, batch_size=4)
    short = "Assignment statements are used to (re)bind names to values."
    ids = tok.encode(short)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([[tok.eos_id] + ids[:-1]])).logits[0], dim=-1)
    expected = float(logp.gather(1, torch.tensor(ids)[:, None]).sum())

    # A text longer than max_seq_len (128) is scored in disjoint windows of 128 predicted tokens, each
    # conditioned on the 128 tokens before it.
    long_text = pydoc_data.topics.topics["assignment"][:1500]
    long_ids = tok.encode(long_text)
    assert len(long_ids) > 2 * 128
    expected_long, n = 0.0, 128
    for start in range(0, len(long_ids), n):
        pred = long_ids[start:start + n]
        inp = ([tok.eos_id] + long_ids)[max(0, start + len(pred) - n):start + len(pred)]
        with torch.no_grad():
            lp = F.log_softmax(model(torch.tensor([inp])).logits[0], dim=-1)[-len(pred):]
        expected_long += float(lp.gather(1, torch.tensor(pred)[:, None]).sum())

    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([short, long_text])]
    got_short, got_long = lm.loglikelihood_rolling(reqs)
    assert got_short == pytest.approx(expected, abs=1e-4)
    assert got_long == pytest.approx(expected_long, abs=1e-3)

    # generate_until: greedy, cut at the stop string
    context = "The for statement is used to iterate over"
    ref = tok.encode(context)
    for _ in range(10):
        with torch.no_grad():
            ref.append(int(model(torch.tensor([ref])).logits[0, -1].argmax()))
    ref_text = tok.decode(ref[len(tok.encode(context)):])
    (text,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [], "max_gen_toks": 10}), 0)])
    assert text == ref_text.split("<|endoftext|>")[0]
    stop = text[len(text) // 2:][:2]
    if stop:
        (cut,) = lm.generate_until([Instance("generate_until", {}, (context, {"until": [stop], "max_gen_toks": 10}), 0)])
        assert cut == text.split(stop)[0]


def test_hf_backend_on_an_export_scores_like_our_wrapper(setup, tmp_path):
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from unipool.interop.hf import export_hf

    model, tok, tasks = setup
    export_hf(model, tok, tmp_path / "hf")
    # what `lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True` builds
    hflm = HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, dtype="float32", batch_size=4, device="cpu")
    res = run_lm_eval(hflm, None, TASK, include_path=tasks, limit=8, log_samples=True)
    assert len(res["samples"][TASK]) == 8
    for sample in res["samples"][TASK]:
        q, choices = sample["doc"]["question"], sample["doc"]["choices"]
        for (ll, _), c in zip(sample["filtered_resps"], choices):
            assert float(ll) == pytest.approx(_loglik(model, tok, q, " " + c), abs=1e-4)


def test_cli_lm_eval_writes_json(setup, tmp_path, capsys):
    model, tok, tasks = setup
    run = tmp_path / "run"
    add_weights(run / "checkpoints", 1, model)
    tok.save(run / "tokenizer.json")
    out = tmp_path / "res.json"
    assert cli.main(["lm-eval", str(run), "--tasks", TASK, "--include-path", str(tasks), "--limit", "5",
                     "--batch-size", "3", "--output", str(out)]) == 0
    assert TASK in capsys.readouterr().out
    acc = json.loads(out.read_text())["results"][TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0

    with pytest.raises(LMEvalError, match="needs a tokenizer"):
        run_lm_eval(model, None, TASK, include_path=tasks)


def test_hf_backend_on_an_export_generates_like_our_wrapper(setup, tmp_path):
    # generate_until batches contexts of different lengths (left-padded) and decodes with the KV cache:
    # the stock HF backend on an export must produce our wrapper's text item for item.
    pytest.importorskip("transformers")
    from lm_eval.models.huggingface import HFLM

    from unipool.interop.hf import export_hf

    model, tok, _ = setup
    export_hf(model, tok, tmp_path / "hf")
    hflm = HFLM(pretrained=str(tmp_path / "hf"), trust_remote_code=True, dtype="float32", batch_size=5, device="cpu")
    ours = make_lm(model, tok, batch_size=5)
    reqs = [Instance("generate_until", {}, (q, {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}), i)
            for i, (q, _, _) in enumerate(ITEMS[:10])]
    assert hflm.generate_until(reqs) == ours.generate_until(reqs)


def test_tokenizer_forms_and_errors(setup, tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    model, tok, _ = setup
    path = tok.save(tmp_path)
    text = "Bees make honey"
    for form in (tok, tok.tok, path, tmp_path, str(path)):  # whatever data.tokenizer.as_tokenizers takes
        lm = make_lm(model, form)
        assert lm.eot_token_id == tok.eos_id and lm.tok_encode(text) == tok.encode(text)
        assert lm.tok_decode(tok.encode(text + "<|endoftext|>")) == text  # special tokens dropped
    with pytest.raises(LMEvalError, match="no tokenizer file"):
        make_lm(model, tmp_path / "missing.json")
    with pytest.raises(LMEvalError, match="no end-of-text token"):
        make_lm(model, HFTokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    # ids past the model's embedding table: refused up front, not an IndexError deep inside torch
    small = build_model(get_preset("debug").replace(vocab_size=256))
    with pytest.raises(LMEvalError, match=f"tokenizer has {tok.vocab_size} tokens, .* vocabulary of 256: wrong"):
        make_lm(small, tok)
