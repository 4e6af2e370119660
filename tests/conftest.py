import os
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The test models are tiny: one thread beats two (thread overhead), and far more so on a busy machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Real English text (Python's own help topics), scenes separated by form feeds like the default corpus."""
    path = tmp_path_factory.mktemp("corpus") / "topics.txt"
    path.write_text("\f".join(topics[k] for k in sorted(topics)[:60]))
    return path
