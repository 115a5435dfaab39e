"""The document cache: saved prefills of chat's documents, found again by what made them.

`kvretrieve chat --document F` prefills the documents once; the state is saved under
$KVRETRIEVE_DOC_CACHE (default CACHE_ROOT/documents)/KEY.kvr, KEY a hash of the model's fingerprint, the tokenizer's, the KV layout
(dtype, attention mode, retrieval layout) and the token ids (persist.document_key), so the next chat
over the same documents with the same model and options reopens it instead of prefilling. Each use
touches the folder; past the size cap the least recently used saves go first.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, SavedPrefillError
from .files import TMP_PREFIX, cache_root, free_disk_bytes, sweep_stale_temporaries

DEFAULT_CAP_SHARE, DEFAULT_CAP_MAX = 0.25, 64 << 30  # of the free disk, and at most


@dataclass(frozen=True)
class Entry:
    path: Path
    bytes: int
    last_used: float
    tokens: int
    source: str
    manifest: dict = field(default_factory=dict, compare=False, repr=False)


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two id lists share from their start."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


class DocumentCache:
    def __init__(self, root: Path | None = None, cap_gb: float | None = None):
        """root: default $KVRETRIEVE_DOC_CACHE, else CACHE_ROOT/documents; cap_gb: the most the saves may take (default: a quarter of
        the free disk space, counting what the cache holds as free, at most 64 GiB)."""
        env = os.environ.get("KVRETRIEVE_DOC_CACHE")
        self.root = Path(root) if root is not None else Path(env) if env else cache_root() / "documents"
        if cap_gb is not None and not cap_gb > 0:
            raise ConfigError(f"doc_cache_gb must be > 0, got {cap_gb}; or turn the document cache off")
        self.cap = int(cap_gb * (1 << 30)) if cap_gb is not None else None

    def cap_bytes(self) -> int:
        if self.cap is not None:
            return self.cap
        free = free_disk_bytes(self.root) + sum(e.bytes for e in self.entries())
        return int(min(DEFAULT_CAP_MAX, DEFAULT_CAP_SHARE * free))

    def path_for(self, key: str) -> Path:
        return self.root / f"{key}.kvr"

    def touch(self, path: Path) -> None:
        """Mark a save as just used (its folder's mtime orders eviction)."""
        try:
            os.utime(path)
        except OSError:  # a read-only cache still serves what it holds
            pass

    def entries(self) -> list[Entry]:
        """Every complete save, most recently used first."""
        out = []
        try:
            folders = [p for p in self.root.iterdir() if p.suffix == ".kvr" and not p.name.startswith(TMP_PREFIX)]
        except OSError:
            return []
        for p in folders:
            try:
                m = json.loads((p / "manifest.json").read_text())
                out.append(Entry(p, _size(p), p.stat().st_mtime, int(m.get("tokens", 0)), str(m.get("source", "?")), m))
            except (OSError, ValueError):
                out.append(Entry(p, _size(p) if p.is_dir() else 0, 0.0, 0, "(damaged)"))
        return sorted(out, key=lambda e: -e.last_used)

    def longest_prefix(self, ident: dict, ids: list[int], longer_than: int = 0) -> tuple[Entry, int] | None:
        """The save made with `ident` (persist.identity: model, tokenizer, KV layout) that shares the
        longest start with `ids`, and how many tokens, if more than `longer_than`. A save may end past
        the shared part (its last token may merge with the text that follows, e.g. "\n\n"): reopening
        it and cutting it back is still cheaper than a prefill. The save is checked when reopened."""
        from .store.saved import SavedPrefill

        best, best_n = None, longer_than
        for e in self.entries():
            if e.tokens <= best_n or any(e.manifest.get(k) != v for k, v in ident.items()):
                continue
            try:
                saved = SavedPrefill(e.path, verify=False).tensor("ids").tolist()
            except (OSError, ValueError, KeyError, RuntimeError, SavedPrefillError):
                continue  # damaged: passed over here, replaced when its document is prefilled again
            n = shared_prefix(saved, ids)
            if n > best_n:
                best, best_n = e, n
        return (best, best_n) if best is not None else None

    def evict(self, keep: Path | None = None) -> list[Path]:
        """Remove the least recently used saves until the rest fit the cap (never `keep`); returns them."""
        sweep_stale_temporaries(self.root)
        entries, cap, gone = self.entries(), self.cap_bytes(), []
        total = sum(e.bytes for e in entries)
        for e in reversed(entries):
            if total <= cap:
                break
            if e.path != keep:
                shutil.rmtree(e.path, ignore_errors=True)
                total -= e.bytes
                gone.append(e.path)
        return gone

    def clear(self) -> tuple[int, int]:
        """Remove every save (and stale temporaries); returns (saves, bytes) removed."""
        entries = self.entries()
        for e in entries:
            shutil.rmtree(e.path, ignore_errors=True)
        sweep_stale_temporaries(self.root)
        return len(entries), sum(e.bytes for e in entries)


def age(seconds: float) -> str:
    s = max(0, time.time() - seconds)
    return f"{s / 86400:.0f} d" if s >= 86400 else f"{s / 3600:.0f} h" if s >= 3600 else f"{s / 60:.0f} min"
