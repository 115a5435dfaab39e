"""kvretrieve: long-context LLM inference on one GPU with the KV cache in CPU memory."""
from importlib import import_module

__version__ = "0.1.0"
__all__ = ["load", "LLM", "GenerationResult", "RetrievalConfig", "RuntimeConfig", "SamplingParams",
           "KVRetrieveError", "__version__"]

# The public names are imported on first use (PEP 562): they pull in torch, which takes seconds,
# and `kvretrieve --help` or `import kvretrieve.errors` should not wait for it.
_HOME = {"load": ".api", "LLM": ".llm", "GenerationResult": ".llm", "RetrievalConfig": ".config",
         "RuntimeConfig": ".config", "SamplingParams": ".config", "KVRetrieveError": ".errors"}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'kvretrieve' has no attribute {name!r}")
    value = getattr(import_module(_HOME[name], __name__), name)
    globals()[name] = value  # later lookups find it without coming here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
