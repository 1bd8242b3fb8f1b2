import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("TFBD_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
    """The real data under $TFBD_DATA; tests that need it skip visibly when it is absent."""
    if not (DATA / "cifar10").is_dir():
        pytest.skip(f"real data not found at {DATA} (set $TFBD_DATA)")
    return DATA


@pytest.fixture(scope="session")
def lossless(data_dir):
    """512 lossless CIFAR-10 images and labels."""
    from tfbackdoor import data

    return data.load_arrays("cifar10:lossless", limit=512, seed=1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
