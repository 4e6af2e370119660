"""Shared test helpers: real English text and a run directory as `unipool train` writes it."""

from pydoc_data.topics import topics

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from unipool.config import apply_dict, preset_config
from unipool.model.model import build_model
from unipool.presets import get_preset
from unipool.run import Run

TEXTS = [topics[k] for k in sorted(topics)]


def make_run(root, preset="debug", vocab_size=512, data_dir=""):
    """A run directory as `unipool train` writes it: config, tokenizer, one checkpoint."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    cfg = get_preset(preset).replace(vocab_size=tok.get_vocab_size())
    model = build_model(cfg)
    config = apply_dict(preset_config(preset), {"model": cfg.to_dict(), "train": {"seq_len": 64, "batch_size": 4},
                                                "data": {"tokenizer": "bpe:512", "data_dir": data_dir}})
    Run.create(root, config).add_weights(model, 10)
    return root, model
