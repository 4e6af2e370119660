import os
import tempfile
from pathlib import Path
from pydoc_data.topics import topics

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# pytest-xdist workers load exported models' remote code side by side: each worker gets its own modules cache
# (read by transformers at import, so set before any test imports it), so that two never copy into the same
# file at once.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("HF_MODULES_CACHE", str(Path(tempfile.gettempdir()) / "unipool-tests-hf-modules" /
                                                  os.environ["PYTEST_XDIST_WORKER"]))
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
