"""Other tools' formats: Hugging Face transformers export / import, the HF MoE families the routing probe
supports (hf_moe), and the lm-evaluation-harness bridge."""
