import os

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
