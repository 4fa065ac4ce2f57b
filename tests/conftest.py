"""Shared fixtures: one miniature dataset (and tiny critic base) per test session, built as run_mini.sh builds it."""

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
WORLD_SMALL = ["--edit-train", "120", "--gen-train", "80", "--bench-exec", "30", "--bench-cons", "24", "--bench-gen", "24",
               "--rl-train", "8", "--rl-test", "4"]


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory):
    """A small miniature dataset, made as run_mini.sh makes it: <root>/data (candidates, SFT, bench, rl) by
    python -m toy world + curate.py --preset mini, and <root>/models/critic-base by python -m toy critic-base."""
    import curate
    import toy
    root = tmp_path_factory.mktemp("mini")
    data = root / "data"
    toy.main(["world", "--out", str(data)] + WORLD_SMALL)
    curate.main(curate.get_args(["--preset", "mini", "--out", str(data), "--edit-candidates",
                                 str(data / "edit/candidates.jsonl"), "--gen-candidates", str(data / "gen/candidates.jsonl")]))
    toy.main(["critic-base", "--data", str(data), "--out", str(root / "models/critic-base"), "--vision-steps", "5"])
    return data


@pytest.fixture(scope="session")
def critic_base(mini_data):
    return mini_data.parent / "models" / "critic-base"
