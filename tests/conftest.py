"""Shared fixtures: one miniature dataset (and tiny critic base) per test session, built by curate.py."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    # train_reward.py and rl_edit.py silence this FSDP2 warning at import (they read .logits out of place), but
    # pytest restores the warning filters after collecting each module, so the tests say it again here.
    config.addinivalue_line("filterwarnings", "ignore:FSDP2-wrapped module .* returned a view tensor")


# small sizes: the whole fixture takes a few seconds
SMALL = ["--edit-train", "120", "--gen-train", "80", "--bench-exec", "30", "--bench-cons", "24", "--bench-gen", "24",
         "--rl-train", "8", "--rl-test", "4", "--critic-vision-steps", "5"]


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """A small curated miniature dataset: <root>/data (SFT, bench, rl) and <root>/models/critic-base."""
    import curate
    root = tmp_path_factory.mktemp("mini")
    curate.main(curate.get_args(["--out", str(root / "data")] + SMALL))
    return root / "data"


@pytest.fixture(scope="session")
def critic_base(mini_data):
    return mini_data.parent / "models" / "critic-base"
