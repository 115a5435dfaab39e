"""The GPU block pool: sink slots, the window ring and an LRU region for retrieved blocks."""
from .block_pool import BlockPool

__all__ = ["BlockPool"]
