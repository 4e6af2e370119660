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


# Tiny Hugging Face models: the MoE families import and convert read, and the dense ones upcycling reads.
HF_TINY = dict(vocab_size=320, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.1, pad_token_id=0,
               bos_token_id=1, eos_token_id=2)
HF_FAMILIES = {  # name: (config class, model class, the family's own fields)
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=32, num_local_experts=4,
                                                            num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    "olmoe-normtopk": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=32, num_experts=6,
                                                               num_experts_per_tok=3, norm_topk_prob=True)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=32, num_experts=4,
                                                                num_experts_per_tok=2, head_dim=32)),
    "qwen3_moe-normtopk": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=32, num_experts=4,
                                                                         num_experts_per_tok=2,
                                                                         norm_topk_prob=True)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(intermediate_size=48)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(intermediate_size=48, head_dim=32)),
}


def hf_config(family, **overrides):
    """A tiny transformers config of `family` (a key of HF_FAMILIES), with `overrides` on top."""
    import transformers

    config_cls, _, extra = HF_FAMILIES[family]
    return getattr(transformers, config_cls)(**{**HF_TINY, **extra, **overrides})


def tiny_hf(family, **overrides):
    """A randomly initialised tiny transformers model of `family`, in eval mode."""
    import transformers

    return getattr(transformers, HF_FAMILIES[family][1])(hf_config(family, **overrides)).eval()

