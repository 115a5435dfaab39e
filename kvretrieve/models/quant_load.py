"""RuntimeConfig.weights made concrete, and the projection weights each mode gives a Decoder (issue 18).

Modes, after resolve_weights:
  dense  the model dtype (what every load did before);
  int8   per output channel (group = K), symmetric round-to-nearest of the checkpoint's values;
  int4   groups of 128 input features (see quant.mode_group), asymmetric round-to-nearest;
  file   a GGUF file's own Q8_0, Q4_0, Q4_K and Q6_K projection tensors as they are (gguf_quant:
         exact, up to one fp16 rounding of the K-quants' scale products), any other tensor dense.
Only the projections (q, k, v, o, gate, up, down and an untied lm_head) are quantized: the embedding
is a lookup that reads one row a token, so keeping it dense costs memory but no time; norms and
biases are vectors. A tied lm_head is the embedding and stays dense.

On CUDA the quantized matrices stay quantized on the device (kernels.quant_linear reads them). On the
CPU they are dequantized to the model dtype at load: the CPU keeps its dense matmuls, on weights that
carry the same rounding as on the GPU (int8/int4 quantize first), which is what tests and quality
checks on the CPU need.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import ModelLoadError
from .gguf import unpermute, hf_name, tensor_types
from .linear import RowStack
from .llama import ModelConfig
from .quant import QUANT_MODES, QuantWeight, concat_rows, dequantize, mode_group, quant_nbytes, quantize

# GGUF kinds kept as they are -> (bits, group) of their QuantWeight (models/gguf_quant.py).
FILE_LAYOUT = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_K": (4, 32), "Q6_K": (8, 16)}
_PROJECTIONS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "gate_proj.weight",
                "up_proj.weight", "down_proj.weight")
# Elements quantized at once: quantize()'s fp32 temporaries of a 128K-vocabulary lm_head would take
# several GB together; 16M elements keep them near 200 MB.
QUANT_CHUNK = 1 << 24


def resolve_weights(weights: str, gguf: bool) -> str:
    """RuntimeConfig.weights -> dense, int8, int4 or file: auto keeps a GGUF file's quantization and
    loads anything else (HF checkpoints, random shapes) dense."""
    if weights != "auto":
        return weights
    return "file" if gguf else "dense"


def is_projection(name: str) -> bool:
    return name == "lm_head.weight" or (name.startswith("model.layers.") and name.endswith(_PROJECTIONS))


def quantized(rows: Callable[[int, int], torch.Tensor], n: int, k: int, mode: str):
    """A [n, k] matrix under mode int8 or int4, from rows(a, b) (its dense rows a .. b-1, on the device
    where it is quantized), QUANT_CHUNK elements at a time; dense where quant.mode_group gives no group."""
    group = mode_group(mode, k)
    if group is None:
        return rows(0, n)
    step = max(1, QUANT_CHUNK // k)
    parts = [quantize(rows(a, min(n, a + step)), QUANT_MODES[mode][0], group) for a in range(0, n, step)]
    return parts[0] if len(parts) == 1 else concat_rows(parts)


def place(w, device: torch.device, dtype: torch.dtype, keep_quantized: bool):
    """A weight as the Decoder holds it: on the device, and dense unless keep_quantized."""
    if not isinstance(w, QuantWeight):
        return w
    w = w.to(device)
    return w if keep_quantized else dequantize(w, dtype)


def _alike(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return (a.bits, a.group, a.shape[1]) == (b.bits, b.group, b.shape[1])


def stack(pieces: list):
    """Row-stacked parts (q|k|v, gate|up) as one weight: each run of alike neighbours joined into one
    Tensor or QuantWeight (one launch for all its rows), a RowStack (models/linear.py) of the runs where
    they differ (Q4_K_M: q|k in Q4_K, v in Q6_K)."""
    runs = [[pieces[0]]]
    for p in pieces[1:]:
        if _alike(runs[-1][-1], p):
            runs[-1].append(p)
        else:
            runs.append([p])
    joined = [run[0] if len(run) == 1 else torch.cat(run) if isinstance(run[0], torch.Tensor) else concat_rows(run)
              for run in runs]
    return joined[0] if len(joined) == 1 else RowStack(tuple(joined))


class GGUFQuantTensors(Mapping):
    """HF name -> QuantWeight (on the CPU) of each projection a GGUF file keeps in a FILE_LAYOUT kind,
    read from the memory-mapped file when asked (one tensor in host memory at a time). Llama files
    store q/k rows interleaved per head for llama.cpp's rotary layout: their rows are put back in HF's
    order, as gguf.convert does for the dense weights (whole rows move: exact)."""

    def __init__(self, gguf_path: Path, cfg: ModelConfig, names: set[str]):
        import gguf

        try:
            reader = gguf.GGUFReader(str(gguf_path))
        except Exception as e:  # the reader raises assorted errors on damaged files
            raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {e}; the file is corrupt or truncated: "
                                 "download it again") from None
        self.path, self.cfg = gguf_path, cfg
        self._tensors = {hf_name(t.name): t for t in reader.tensors if hf_name(t.name) in names}

    def __getitem__(self, name: str) -> QuantWeight:
        from .gguf_quant import to_quant_weight

        t = self._tensors[name]
        n, k = (int(x) for x in reversed(t.shape))
        w = to_quant_weight(t.data, t.tensor_type, (n, k))  # ValueError: a scale beyond fp16 (caller: dense)
        if not all(torch.isfinite(u).all() for u in (w.scales, w.mins) if u is not None):
            raise ModelLoadError(f"tensor {t.name} of {self.path} holds NaN or infinite scales; the file is "
                                 "damaged: download it again")
        heads = {"q_proj": self.cfg.num_heads, "k_proj": self.cfg.num_kv_heads}.get(name.split(".")[-2])
        if self.cfg.arch == "llama" and heads:
            w = w.take_rows(torch.from_numpy(unpermute(np.arange(n), heads)))
        return w

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def file_plan(gguf_path: Path, model_dir: Path, dtype: torch.dtype) -> tuple[set[str], int]:
    """Mode file, before any weight is read: (the HF names of the projections kept quantized, empty for
    a file that keeps none such as SmolLM2's Q4_1; the device bytes of all weights), from the
    tensor-type record alone (gguf.tensor_types: no GGUFReader)."""
    types = tensor_types(gguf_path, model_dir)  # a tied lm_head has no tensor: the embedding counts once
    kept = {name for name, (kind, _, _) in types.items() if kind in FILE_LAYOUT and is_projection(name)}
    nbytes = 0
    for name, (kind, n, k) in types.items():
        nbytes += quant_nbytes(n, k, *FILE_LAYOUT[kind]) if name in kept else n * k * dtype.itemsize
    return kept, nbytes


class WeightMaker:
    """The projection weights of one load under a resolved mode: matrix(parts) reads the parts (one
    matrix, or q|k|v and gate|up stacked by rows) and returns the weight the Decoder holds.

    get(name, shape) reads a dense tensor on the device in the model dtype (loader._TensorReader.get:
    checked and watched for non-finite values). file: GGUFQuantTensors (mode file) or None."""

    def __init__(self, get, mode: str, device: torch.device, dtype: torch.dtype, file: Mapping | None = None,
                 keep_quantized: bool | None = None):
        self.get, self.mode, self.device, self.dtype, self.file = get, mode, device, dtype, file or {}
        self.keep = device.type == "cuda" if keep_quantized is None else keep_quantized

    def matrix(self, parts: list[tuple[str, tuple[int, int]]]):
        if self.mode in QUANT_MODES:  # stacked dense first: quantization is per row, so this is per part
            dense = stack([self.get(name, shape) for name, shape in parts])
            k = dense.shape[1]
            return place(quantized(lambda a, b: dense[a:b], dense.shape[0], k, self.mode), self.device,
                         self.dtype, self.keep)
        return stack([self._file_part(name, shape) for name, shape in parts])

    def _file_part(self, name: str, shape: tuple[int, int]):
        if name not in self.file:
            return self.get(name, shape)
        try:
            w = self.file[name]
        except ValueError:  # a K-quant scale product beyond fp16's range: the dense weight from the cache
            return self.get(name, shape)
        if w.shape != shape:
            raise ModelLoadError(f"tensor {name} has shape {w.shape} in {self.file.path}, expected {shape} from "
                                 "its metadata; the file is damaged: download it again")
        return place(w, self.device, self.dtype, self.keep)
