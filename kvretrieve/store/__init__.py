"""Where the full KV cache lives: the CPU store (pinned segments, int8 or the model's dtype) and the
cluster layout of indexes that store segments in cluster order."""
from .clusters import ClusterLayout
from .kv_store import KVStore

__all__ = ["KVStore", "ClusterLayout"]
