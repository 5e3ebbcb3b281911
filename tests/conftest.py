import os

import pytest
import torch

# Tests run on 2 cores; more threads than cores only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tmp_model_dir(tmp_path):
    return tmp_path / "model"


_exit_status = 0


def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def pytest_unconfigure(config):
    # One full run under heavy load ended in SIGSEGV during interpreter teardown, after every test
    # had passed or failed and the summary was printed (a native thread still running at exit is
    # the suspect; not yet isolated). Leave with pytest's own status instead of tearing down.
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
