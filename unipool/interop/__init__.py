"""Other tools' formats: Hugging Face transformers export / import and the lm-evaluation-harness bridge."""
