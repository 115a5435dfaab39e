import signal
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # for `import helpers`
torch.set_num_threads(min(2, torch.get_num_threads()))

# A suite started as a background job of a non-interactive shell (`pytest &` in a script) inherits
# SIGINT ignored, and so would every process it starts: the Ctrl-C tests failed that way. Python's own
# handler restores KeyboardInterrupt here, and exec resets it to the default in child processes.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def own_document_cache(tmp_path_factory, monkeypatch):
    """chat saves its documents' prefills by default: each test gets an empty document cache of its own
    (never the user's, and no test reopens another's save)."""
    monkeypatch.setenv("KVRETRIEVE_DOC_CACHE", str(tmp_path_factory.mktemp("doc-cache")))


@pytest.fixture(scope="session")
def smol_dir():
    """The default model (SmolLM2-135M-Instruct) as a converted HF directory in the user cache; tests
    that need it are skipped where it is not installed (the GPU machine runs only the cuda tests)."""
    from kvretrieve.errors import ModelLoadError
    from kvretrieve.models.loader import resolve_checkpoint

    try:
        return resolve_checkpoint(None)
    except ModelLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smol(smol_dir):
    """The default model in fp32 on the CPU, shared by tests that only read from it."""
    import kvretrieve

    return kvretrieve.load(smol_dir, device="cpu", dtype="float32", max_context=4096)


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
