"""Test-session set-up shared by every test module.

Without a GPU, the Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET must be set before triton is
imported, and emokern reads it at import, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True)
settings.load_profile("ci")

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use with ``pytest.mark.usefixtures("one_thread")``): generation on a shared
    2-core machine with two OpenMP threads spinning against other processes runs up to ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    """``(model, tokenizer, bank)``: the tiny random chat model of :mod:`emokern.testing.chat` and its random bank
    over real emotion names, shared by a module's experiment tests."""
    from emokern.testing.chat import tiny_chat_bank, tiny_chat_model

    model, tok = tiny_chat_model()
    return model, tok, tiny_chat_bank(model)
