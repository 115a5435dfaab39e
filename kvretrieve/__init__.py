"""kvretrieve: long-context LLM inference on one GPU with the KV cache in CPU memory."""
from .api import load
from .config import RetrievalConfig, RuntimeConfig, SamplingParams
from .errors import KVRetrieveError
from .llm import LLM, GenerationResult

__version__ = "0.1.0"
__all__ = ["load", "LLM", "GenerationResult", "RetrievalConfig", "RuntimeConfig", "SamplingParams",
           "KVRetrieveError", "__version__"]
