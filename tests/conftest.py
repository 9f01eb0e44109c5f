"""Make the repository importable when pytest runs from a checkout without `pip install -e .`,
and the fixtures the train.py tests share."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """A small UTF-8 corpus (3000 lines "i squared is i*i."), written once per session; read only."""
    path = tmp_path_factory.mktemp("data") / "squares.txt"
    path.write_text("".join(f"{i} squared is {i * i}.\n" for i in range(3000)), encoding="utf-8")
    return str(path)
