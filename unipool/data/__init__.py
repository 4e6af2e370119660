"""Text in: source readers, tokenizers, prepared token shards and the samplers over them."""
