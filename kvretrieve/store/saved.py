"""The on-disk form of a saved prefill: a folder of safetensors parts and a JSON manifest.

    NAME.kvr/
      manifest.json        format version, what the state was made with (model, tokenizer, dtype,
                           layout), which part holds each tensor, and every file's size and the
                           CRC-32 of each PIECE_BYTES piece of it
      part-000.safetensors tensors, in parts of about PART_BYTES (a store segment need not be
      part-001.safetensors assembled from many files, and no file is too large to write at once)
      ...
      <extra files>        small files a caller adds (chat keeps its documents' text)

The folder is written under a temporary name and renamed into place when every file is in
(kvretrieve.files): Ctrl-C, SIGTERM, a full disk or a crash never leave one under the final name.
What a power cut or a damaged disk does to a finished one is caught by the checksums on open.
Tensors are read as views of a private (copy-on-write) memory map of their part: opening costs no
copy, pages come from the file as they are touched, and a store may keep such a view as its own
segment (Tensors.private): writing to it copies that page in memory, never into the file.
"""
from __future__ import annotations

import json
import mmap
import shutil
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from ..errors import SavedPrefillError
from ..files import publish_dir, sweep_stale_temporaries, temporary_dir, terminations_unwind
from ..memory import usable_cores

FORMAT_VERSION = 2  # 2: CRC-32 per piece (1 had a sha256 per file)
MANIFEST = "manifest.json"
PART_BYTES = 256 << 20
PIECE_BYTES = 64 << 20  # a multiple of every page size: pieces are mapped at their offset


class Tensors(Mapping):
    """Tensors by name, each read only when it is asked for (a saved 128K store is GiBs: loading a
    part at a time keeps one segment in flight, not a second copy of the store). private: each
    tensor is the reader's own (a copy-on-write mapping), which a store may keep instead of copying."""

    def __init__(self, names: list[str], read: Callable[[str], torch.Tensor], private: bool = False):
        self._names, self._read, self.private = set(names), read, private

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._names))

    def __len__(self) -> int:
        return len(self._names)


def under(tensors: Mapping[str, torch.Tensor], prefix: str) -> Tensors:
    """The tensors named PREFIX.NAME, by NAME (read lazily, whatever mapping holds them)."""
    cut = len(prefix) + 1
    return Tensors([n[cut:] for n in tensors if n.startswith(prefix + ".")], lambda n: tensors[prefix + "." + n],
                   isinstance(tensors, Tensors) and tensors.private)


def _crc32(path: Path, start: int, size: int) -> int:
    """CRC-32 of `size` bytes of the file from `start` (a multiple of the page size), read through a
    memory map: no copy, and zlib releases the GIL, so pieces are checked in parallel."""
    if size == 0:
        return zlib.crc32(b"")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, offset=start, access=mmap.ACCESS_READ) as m:
        return zlib.crc32(m)


def _checksums(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """Each file's CRC-32 per PIECE_BYTES piece, the pieces of all files spread over a thread per core.
    Why CRC-32, not sha256: the sums catch damage (a torn write, a bad disk), not tampering, and a 128K
    save of the 8B shape is 12 GB: sha256 ran ~0.6 GB/s a thread on the H200 host and took 2.7 s of
    a 3.7 s reopen on 16 threads (bench/results/probe_reopen_h200.json); zlib's CRC-32 runs ~4 GB/s."""
    pieces = [(n, start, min(PIECE_BYTES, size - start)) for n in names
              for size in [(folder / n).stat().st_size] for start in range(0, max(size, 1), PIECE_BYTES)]
    with ThreadPoolExecutor(max_workers=max(1, min(usable_cores(), len(pieces)))) as pool:
        sums = list(pool.map(lambda p: _crc32(folder / p[0], p[1], p[2]), pieces))
    out: dict[str, list[int]] = {n: [] for n in names}
    for (name, _, _), crc in zip(pieces, sums):
        out[name].append(crc)
    return out


def _parts(tensors: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    parts, size = [{}], 0
    for name, t in tensors.items():
        if size >= PART_BYTES:
            parts.append({})
            size = 0
        parts[-1][name] = t.detach().to("cpu").contiguous()
        size += parts[-1][name].nbytes
    return parts


def write_saved(path: Path, tensors: dict[str, torch.Tensor], manifest: dict,
                extra: dict[str, bytes] | None = None) -> int:
    """Write a saved prefill at `path` (replacing one there), atomically; returns its bytes."""
    path = Path(path)
    sweep_stale_temporaries(path.parent)
    try:
        tmp = temporary_dir(path.parent)
    except OSError as e:
        raise SavedPrefillError(f"cannot write a saved prefill in {path.parent} ({e.strerror}); choose a "
                                "writable folder") from None
    stopped = SavedPrefillError(f"saving {path} was stopped by a signal; nothing was left under that name")
    try:
        with terminations_unwind(stopped):
            where = {}
            for i, part in enumerate(_parts(tensors)):
                name = f"part-{i:03d}.safetensors"
                save_file(part, str(tmp / name))
                where |= dict.fromkeys(part, name)
            for name, data in (extra or {}).items():
                (tmp / name).write_bytes(data)
            sums = _checksums(tmp, sorted(p.name for p in tmp.iterdir()))
            files = {n: {"bytes": (tmp / n).stat().st_size, "crc32": s} for n, s in sums.items()}
            full = {"format_version": FORMAT_VERSION, **manifest, "tensors": where, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(full, indent=1))
            publish_dir(tmp, path)
    except OSError as e:
        raise SavedPrefillError(f"cannot write the saved prefill {path} ({e.strerror or e}); free some disk "
                                "space or choose another folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sum(f["bytes"] for f in files.values())


class SavedPrefill:
    """An opened saved prefill: its manifest, its extra files and its tensors (read on demand)."""

    def __init__(self, path: Path, verify: bool = True):
        """Refuses (SavedPrefillError) a missing folder, one that is no saved prefill or of another
        format version, and with verify a missing, truncated or changed file."""
        self.path = path = Path(path)
        again = "delete it and prefill the document again"
        if not path.exists():
            raise SavedPrefillError(f"no saved prefill at {path}; make one with `kvretrieve prefill` (Python: "
                                    "llm.save(path))")
        try:
            self.manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            what = "has no manifest.json" if isinstance(e, FileNotFoundError) else f"has a damaged manifest ({e})"
            raise SavedPrefillError(f"{path} is not a saved prefill: it {what}; {again}") from None
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise SavedPrefillError(f"{path} was saved in format version {version}, but this kvretrieve reads "
                                    f"version {FORMAT_VERSION}; {again}")
        if verify:
            self._verify(again)
        self._open: dict[str, object] = {}

    def _verify(self, again: str) -> None:
        files = self.manifest.get("files", {})
        for name, f in files.items():
            p = self.path / name
            if not p.is_file():
                raise SavedPrefillError(f"{self.path} is damaged: {name} is missing; {again}")
            if p.stat().st_size != f["bytes"]:
                raise SavedPrefillError(f"{self.path} is damaged: {name} has {p.stat().st_size:,} bytes, not "
                                        f"{f['bytes']:,} (cut short?); {again}")
        for name, s in _checksums(self.path, list(files)).items():
            if s != files[name]["crc32"]:
                raise SavedPrefillError(f"{self.path} is damaged: {name} does not match its checksum; {again}")

    def extra(self, name: str) -> bytes | None:
        p = self.path / name
        return p.read_bytes() if name in self.manifest.get("files", {}) and p.is_file() else None

    def tensors(self) -> Tensors:
        """Every saved tensor, read when asked for."""
        return Tensors(list(self.manifest.get("tensors", {})), self.tensor, private=True)

    def tensor(self, name: str) -> torch.Tensor:
        """A view of the tensor in a private memory map of its part (no copy is made)."""
        part = self.manifest["tensors"].get(name)
        if part is None:
            raise SavedPrefillError(f"{self.path} lacks the tensor {name!r}; it was saved by another version of "
                                    "kvretrieve: delete it and prefill the document again")
        if part not in self._open:
            self._open[part] = _map_part(self.path / part)
        data, header = self._open[part]
        spec = header[name]
        begin, end = spec["data_offsets"]
        dtype = _DTYPES[spec["dtype"]]
        raw = data[begin:end]
        if begin % dtype.itemsize:  # safetensors aligns tensors; a view of another dtype needs it
            raw = raw.clone()
        return raw.view(dtype).view(spec["shape"])


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _map_part(path: Path) -> tuple[torch.Tensor, dict]:
    """(the part's data as a uint8 tensor over a private memory map, its safetensors header). The
    format: an 8-byte little-endian header length, the JSON header (name -> dtype, shape, offsets from
    the end of the header), the data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    size = path.stat().st_size
    whole = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8)
    return whole[8 + n:], header
