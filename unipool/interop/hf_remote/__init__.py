"""Remote-code files copied into every exported Hugging Face directory (loaded with trust_remote_code=True).

They import only torch and transformers, never `unipool`, so an export works where unipool is not installed.
"""
