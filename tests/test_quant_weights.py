"""Weights kept quantized (issue 18, the model side): RuntimeConfig.weights int8 / int4 / auto.

- int8/int4 on the CPU quantize, then dequantize at load: the logits equal those of the same checkpoint
  whose weights were quantize()d and dequantize()d beforehand (the same numbers, dense math), and stay
  near the unquantized model within a bound derived from the weights' own rounding error;
- the Decoder holding QuantWeights (kept quantized on the CPU: the torch reference kernels) equals the
  dequantized one, and the Triton kernels under TRITON_INTERPRET=1 equal that reference path;
- a tiny GGUF holding Q4_K, Q8_0, Q6_K and F16 tensors loads with weights="auto" and its logits equal
  the dense conversion's bitwise (its K-quant scale products are fp16-exact, see tiny_gguf);
- memory checks count the quantized bytes; the CLI passes --weights through.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import kvretrieve
from helpers import dense_backend, edited_checkpoint, run_interpreted, saved_tiny_model
from kvretrieve.cli.options import as_flags
from kvretrieve.config import RuntimeConfig
from kvretrieve.engine.engine import Engine
from kvretrieve.errors import ConfigError, ResourceError
from kvretrieve.models import linear as L
from kvretrieve.models.linear import RowStack, WeightBuffer
from kvretrieve.models.llama import Decoder, ModelConfig
from kvretrieve.models.loader import CheckpointTensors, build_weights, read_hf_config
from kvretrieve.models.quant import QUANT_MODES, QuantWeight, dequantize, mode_group, quantize
from kvretrieve.models.quant_load import GGUFQuantTensors, file_plan, is_projection
from kvretrieve.models.shapes import SHAPES, random_weights, weight_bytes
from kvretrieve.resolve import check_weights_fit

CPU = torch.device("cpu")
T = gguf.GGMLQuantizationType


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def decoder(model_dir, mode="dense", keep=False, dtype=torch.float32, file=None) -> Decoder:
    cfg = ModelConfig.from_hf(read_hf_config(model_dir))
    return Decoder(cfg, build_weights(cfg, CheckpointTensors(model_dir), CPU, dtype, mode, file, keep_quantized=keep))


def logits(dec: Decoder, n_prompt=40, steps=4, chunk=4096) -> torch.Tensor:
    """Prefill of n_prompt tokens (all their logits), then `steps` decode steps (T = 1)."""
    prompt = torch.randint(0, dec.cfg.vocab_size, (n_prompt + steps,), generator=torch.Generator().manual_seed(3))
    prompt = prompt.to(dec.device)
    engine = Engine(dec, dense_backend(dec, 128), chunk)
    out = [dec.logits(engine.forward(prompt[:n_prompt]))]
    out += [engine.step(t)[None] for t in prompt[n_prompt:]]
    return torch.cat(out)


# hidden 128: int4 takes groups of 128 for q|k|v, o and gate|up, 32 for down (K = 96, the helper's ffn)
ARCHS = {"llama": dict(arch="llama", heads=4, head_dim=32), "qwen2-tied": dict(arch="qwen2", heads=4, head_dim=32,
                                                                                 tie=True)}


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    return saved_tiny_model(tmp_path_factory, **ARCHS[request.param])


def quant_dequant_copy(src: Path, out: Path, mode: str) -> Path:
    """src with every projection weight (and an untied lm_head) replaced by dequantize(quantize(w)), with
    the bits and group the int8/int4 modes use."""
    def edit(tensors):
        for name, w in tensors.items():
            if is_projection(name):
                g = mode_group(mode, w.shape[1])
                tensors[name] = dequantize(quantize(w, QUANT_MODES[mode][0], g)).contiguous()
    return edited_checkpoint(src, out, edit_tensors=edit)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cpu_quantized_load_equals_quant_dequant_checkpoint_and_stays_near_dense(tiny, tmp_path, mode):
    ours = logits(decoder(tiny, mode))
    qdq = decoder(quant_dequant_copy(tiny, tmp_path / "qdq", mode))
    # The same weights, the same dense math: equal (the tolerance only allows fp32 reassociation).
    assert rel_err(ours, logits(qdq)) <= 1e-6
    # Near the dense model. Each projection's relative weight error e (here int8 0.6%, int4 9.7%: 16 steps
    # over a group's range) enters every matmul as independent noise; 4 matmuls a layer, 2 layers and the
    # head put ~9 such errors in series, sqrt(9) = 3 times e in quadrature; 4 e leaves room for that
    # (measured here: 1.3 to 1.9 e).
    dense = decoder(tiny)
    pairs = [(getattr(a, f), getattr(b, f)) for a, b in zip(dense.w.layers, qdq.w.layers)
             for f in ("qkv", "o", "gate_up", "down")]
    e = (sum((a - b).norm() ** 2 for a, b in pairs) / sum(a.norm() ** 2 for a, _ in pairs)).sqrt().item()
    assert e < (0.01 if mode == "int8" else 0.15)
    assert rel_err(ours, logits(dense)) <= 4 * e


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_decoder_holding_quant_weights_equals_dequantized(tiny, mode):
    kept, deq = decoder(tiny, mode, keep=True), decoder(tiny, mode)
    lw = kept.w.layers[0]
    d = kept.cfg.hidden_size
    for w, k in ((lw.qkv, d), (lw.o, d), (lw.gate_up, d), (lw.down, kept.cfg.intermediate_size)):
        assert isinstance(w, QuantWeight) and w.bits == QUANT_MODES[mode][0]
        assert w.group == (k if mode == "int8" else mode_group("int4", k))
    assert isinstance(kept.w.embed, torch.Tensor)
    if kept.cfg.tie_embeddings:
        assert kept.w.lm_head is kept.w.embed  # tied: the dense embedding
    else:
        assert isinstance(kept.w.lm_head, QuantWeight)
    # chunk=7: prefill projects q, k, v through row slices of the quantized q|k|v, chunk by chunk
    assert rel_err(logits(kept, chunk=7), logits(deq)) <= 1e-5


def test_row_slices_and_row_stacks():
    g = torch.Generator().manual_seed(0)
    a, b = quantize(torch.randn(48, 64, generator=g), 4, 32), quantize(torch.randn(16, 64, generator=g), 8, 32)
    dense = torch.randn(8, 64, generator=g)
    stack = RowStack((a, b, dense))
    full = torch.cat([dequantize(a), dequantize(b), dense])
    assert stack.shape == (72, 64)
    assert torch.equal(dequantize(a.rows(5, 20)), dequantize(a)[5:20])
    assert a.rows(5, 20).codes.data_ptr() == a.codes[5].data_ptr()  # a view
    assert stack.rows(0, 48) is a and stack.rows(64, 72) is dense
    assert isinstance(stack.rows(48, 72), RowStack)
    assert torch.equal(dequantize(stack.rows(50, 60)), dequantize(b)[2:12])
    with pytest.raises(ValueError, match="cross the parts"):
        stack.rows(40, 56)
    x, bias = torch.randn(3, 64, generator=g), torch.randn(72, generator=g)
    assert torch.allclose(L.linear(x, stack, bias), x @ full.t() + bias, atol=1e-5)


def test_random_weights_quantized_layer_by_layer():
    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 128, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "vocab_size": 256, "intermediate_size": 96,
                               "num_hidden_layers": 2})
    w = random_weights(cfg, CPU, torch.float32, 0, "int4", keep_quantized=True)
    assert all(isinstance(getattr(lw, f), QuantWeight) for lw in w.layers for f in ("qkv", "o", "gate_up", "down"))
    assert isinstance(w.lm_head, QuantWeight) and isinstance(w.embed, torch.Tensor)
    deq = random_weights(cfg, CPU, torch.float32, 0, "int4")  # CPU default: dequantized
    assert isinstance(deq.layers[0].qkv, torch.Tensor)
    assert torch.equal(deq.layers[1].down, dequantize(w.layers[1].down))


def test_weight_bytes_and_memory_check():
    cfg = SHAPES["llama3-8b"]
    dense, int8, int4 = (weight_bytes(cfg, 2, m) for m in ("dense", "int8", "int4"))
    assert dense == 8_030_261_248 * 2  # Llama-3.1-8B's parameters in bf16 (no biases)
    assert int4 < 5 * 2**30 < int8 < 8 * 2**30
    cuda = torch.device("cuda")  # only arithmetic: no GPU is touched
    check_weights_fit(cfg, cuda, torch.bfloat16, 12, 0, "int4")
    with pytest.raises(ResourceError, match=r"weights alone need 15\.0 GiB.*weights='int4' \(4\.7 GiB\)") as e:
        check_weights_fit(cfg, cuda, torch.bfloat16, 12, 0, "dense")
    assert "--weights int4 (4.7 GiB)" in as_flags(str(e.value))  # what the CLI prints
    with pytest.raises(ResourceError, match="weights='int4'") as e:  # int4 and 40K tokens of dense KV fit 12 GiB
        check_weights_fit(cfg, cuda, torch.bfloat16, 12, 40960, "int8")
    assert "int8'" not in str(e.value)
    with pytest.raises(ResourceError) as e:  # nothing fits 4 GiB: no quantized mode is offered
        check_weights_fit(cfg, cuda, torch.bfloat16, 4, 0, "dense")
    assert "weights=" not in str(e.value)
    with pytest.raises(ConfigError, match="weights must be one of auto, dense, int8, int4"):
        RuntimeConfig(weights="int3")


# ---------------------------------------------------------------- GGUF
D, F, V, HEADS, KV_HEADS = 256, 96, 512, 4, 2
# Layer 0 as a Q4_K_M file has it (q|k in Q4_K, v in another kind), layer 1 with an F16 v (dense).
LAYER_KINDS = [{"attn_q": T.Q4_K, "attn_k": T.Q4_K, "attn_v": T.Q8_0, "attn_output": T.Q4_K, "ffn_gate": T.Q4_K,
                "ffn_up": T.Q4_K, "ffn_down": T.Q8_0},
               {"attn_q": T.Q8_0, "attn_k": T.Q8_0, "attn_v": T.F16, "attn_output": T.Q8_0, "ffn_gate": T.Q4_K,
                "ffn_up": T.Q4_K, "ffn_down": T.Q8_0}]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-to-unicode alphabet: a byte-level BPE vocabulary that needs no merges."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:  # the other bytes map to 256, 257, ...
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _raw(kind, rows: int, cols: int, rng) -> np.ndarray:
    """A [rows, cols] tensor of `kind`. K-quants get random bytes with d (and dmin) = +-2^-14 or 2^-13:
    d * sc and dmin * m (6- or 8-bit integers) are then exact in fp16, so to_quant_weight's rounding of
    those products is exact and the file's two paths agree bitwise."""
    if kind in (T.F32, T.F16):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16 if kind == T.F16 else np.float32)
    if kind == T.Q8_0:
        return gguf.quants.quantize((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32), T.Q8_0)
    block, size = gguf.constants.GGML_QUANT_SIZES[kind]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for at in {T.Q4_K: (0, 2), T.Q6_K: (208,)}[kind]:
        d = rng.choice([2.0 ** -14, 2.0 ** -13], (rows, cols // block, 1)) * rng.choice([-1, 1], (rows, cols // block, 1))
        b[..., at:at + 2] = d.astype(np.float16).view(np.uint8)
    return b.reshape(rows, -1)


def tiny_gguf(path: Path, arch="llama", layer_kinds=LAYER_KINDS, head=T.Q6_K, seed=0) -> Path:
    """A 2-layer GGUF kvretrieve loads (arch fields, a byte-level BPE tokenizer); head None: tied."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(len(layer_kinds))
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(F)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(_byte_tokens() + ["Ġt"] + [f"<x{i}>" for i in range(V - 257)])
    w.add_token_types([1] * 257 + [3] * (V - 257))
    w.add_token_merges(["Ġ t"])
    w.add_bos_token_id(257)
    w.add_eos_token_id(258)
    tensors = {"token_embd.weight": (T.F32, V, D), "output_norm.weight": (T.F32, 1, D)}
    if head is not None:
        tensors["output.weight"] = (head, V, D)
    shapes = {"attn_q": (HEADS * 64, D), "attn_k": (KV_HEADS * 64, D), "attn_v": (KV_HEADS * 64, D),
              "attn_output": (D, D), "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i, kinds in enumerate(layer_kinds):
        tensors |= {f"blk.{i}.{part}.weight": (kind, *shapes[part]) for part, kind in kinds.items()}
        tensors |= {f"blk.{i}.{n}.weight": (T.F32, 1, D) for n in ("attn_norm", "ffn_norm")}
        if arch == "qwen2":
            tensors |= {f"blk.{i}.{p}.bias": (T.F32, 1, shapes[p][0]) for p in ("attn_q", "attn_k", "attn_v")}
    for name, (kind, rows, cols) in tensors.items():
        raw = _raw(kind, rows, cols, rng)
        if name.endswith("norm.weight"):
            raw = 1 + raw * 2
        raw = raw[0] if rows == 1 else raw
        w.add_tensor(name, raw, raw_dtype=kind if kind not in (T.F32, T.F16) else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))


def load_cpu(path, **kw) -> Decoder:
    return kvretrieve.load(path, device="cpu", dtype="float32", max_context=128, retrieval=None, **kw).model


def same_weights(a: Decoder, b: Decoder) -> bool:
    pairs = [(getattr(x, f), getattr(y, f)) for x, y in zip(a.w.layers, b.w.layers) for f in x.__slots__]
    pairs += [(a.w.embed, b.w.embed), (a.w.lm_head, b.w.lm_head), (a.w.final_norm, b.w.final_norm)]
    return all((u is None and v is None) or torch.equal(u, v) for u, v in pairs)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_auto_on_cpu_equals_the_dense_conversion(tmp_path, cache, arch):
    path = tiny_gguf(tmp_path / "tiny.gguf", arch, head=T.Q6_K if arch == "llama" else None)
    auto, dense_model = load_cpu(path), load_cpu(path, weights="dense")
    # Q8_0 is exact, and the K-quant scale products are fp16-exact here (_raw): the weights are equal
    # bitwise, and so are the logits but for the CPU BLAS's summation order, which follows the weights'
    # alignment in memory (the dense ones are views into a memory-mapped file).
    assert same_weights(auto, dense_model)
    dense = logits(dense_model)
    assert rel_err(logits(auto), dense) <= 1e-6
    # Kept quantized (the reference kernels on the CPU): the same model up to fp32 reassociation.
    model_dir = next((tmp_path / "cache").iterdir())
    cfg = ModelConfig.from_hf(read_hf_config(model_dir))
    names, nbytes = file_plan(path, model_dir, torch.float32)
    kept = decoder(model_dir, "file", keep=True, file=GGUFQuantTensors(path, cfg, names))
    l0, l1 = kept.w.layers
    assert isinstance(l0.qkv, RowStack) and [(p.bits, p.group, p.shape[0]) for p in l0.qkv.parts] == \
        [(4, 32, (HEADS + KV_HEADS) * 64), (8, 32, KV_HEADS * 64)]  # q|k joined, v apart
    assert isinstance(l1.qkv, RowStack) and isinstance(l1.qkv.parts[1], torch.Tensor)  # the F16 v: dense
    assert (l0.gate_up.bits, l0.gate_up.group, l0.gate_up.shape) == (4, 32, (2 * F, D))
    assert (l0.down.bits, l1.o.bits) == (8, 8)
    if arch == "llama":
        assert (kept.w.lm_head.bits, kept.w.lm_head.group) == (8, 16)  # Q6_K
    else:
        assert kept.w.lm_head is kept.w.embed
    assert rel_err(logits(kept, chunk=7), dense) <= 1e-5
    quantized = [w for lw in kept.w.layers for w in (lw.qkv, lw.o, lw.gate_up, lw.down)] + [kept.w.lm_head]
    held = sum(p.nbytes() if isinstance(p, QuantWeight) else p.nbytes for w in quantized
               for p in (w.parts if isinstance(w, RowStack) else [w]) if p is not kept.w.embed)
    rest = kept.w.embed.nbytes + sum(t.nbytes for lw in kept.w.layers for t in (lw.attn_norm, lw.mlp_norm,
                                     lw.qkv_bias) if t is not None) + kept.w.final_norm.nbytes
    assert nbytes == held + rest  # the memory check counts what the load holds


def test_gguf_without_kept_kinds_never_opens_the_reader(tmp_path, cache, monkeypatch):
    """auto on a file whose kinds are all dense or unsupported (like the default model's Q4_1) reads
    the tensor-type record the conversion wrote: no second GGUFReader, whose vocabulary parsing costs seconds."""
    kinds = [{p: T.F16 for p in LAYER_KINDS[0]}] * 2
    path = tiny_gguf(tmp_path / "f16.gguf", layer_kinds=kinds, head=None)
    dense = load_cpu(path, weights="dense")
    record = next((tmp_path / "cache").iterdir()) / "gguf_tensors.json"
    assert json.loads(record.read_text())["model.layers.1.self_attn.v_proj.weight"] == ["F16", KV_HEADS * 64, D]

    def refuse(*a, **k):
        raise AssertionError("GGUFReader opened")
    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    assert same_weights(load_cpu(path), dense)
    record.unlink()  # a cache converted before the record existed: rebuilt once, by the reader
    monkeypatch.undo()
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))
    assert same_weights(load_cpu(path), dense) and record.is_file()


def test_cli_weights_option(tmp_path, cache):
    from click.testing import CliRunner

    from kvretrieve.cli import cli

    path = tiny_gguf(tmp_path / "tiny.gguf")
    opts = ["--model", str(path), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "2", "--raw"]
    for mode in ("int4", "auto"):
        result = CliRunner().invoke(cli, ["generate", "hi", *opts, "--weights", mode])
        assert result.exit_code == 0, result.output
    result = CliRunner().invoke(cli, ["generate", "hi", *opts, "--weights", "int3"])
    assert result.exit_code == 2 and "int3" in result.output
    for cmd in ("generate", "chat", "serve", "prefill", "profile"):
        assert "--weights [auto|dense|int8|int4]" in CliRunner().invoke(cli, [cmd, "--help"]).output


# ---------------------------------------------------------------- Triton under the interpreter
def _interp_cases() -> dict:
    """Triton (L._triton forced on: the launchers under TRITON_INTERPRET=1) against the reference path
    on the same Decoder: fp32 (T = 40: dequantize_into the reused buffer; T = 1: the GEMV) and bf16
    (T = 12: the tensor-core GEMM). Tolerance: fp32 1e-5 (only summation order differs); bf16 2e-2,
    the CPU/GPU bf16 bound of test_models (rounding each layer's outputs to bf16 compounds)."""
    work = Path(tempfile.mkdtemp())
    os.environ["KVRETRIEVE_CACHE"] = str(work / "cache")
    from helpers import tiny_hf_model

    hf = work / "hf"
    tiny_hf_model(**ARCHS["llama"]).save_pretrained(hf)
    gg = tiny_gguf(work / "tiny.gguf")
    kvretrieve.load(gg, device="cpu", dtype="float32", max_context=64, retrieval=None)  # converts it
    model_dir = next((work / "cache").iterdir())
    cfg = ModelConfig.from_hf(read_hf_config(model_dir))

    def compare(make, n_prompt, tol):
        def run():
            dec = make()
            L._triton = lambda x: False
            ref = logits(dec, n_prompt, steps=2)
            L._triton = lambda x: True
            got = logits(dec, n_prompt, steps=2)
            buf = dec.buffer.flat
            again = logits(dec, n_prompt, steps=1)  # the buffer is reused, not reallocated
            L._triton = lambda x: False
            reused = float(buf is not None and dec.buffer.flat is buf) if n_prompt > 16 else 1.0
            return [("logits", rel_err(got, ref), tol), ("buffer-reused", 1.0 - reused, 0.0),
                    ("repeat", rel_err(again, got[:n_prompt + 1]), tol)]
        return run

    cases = {}
    for mode in ("int8", "int4"):
        cases[f"{mode}-fp32-T40"] = compare(lambda m=mode: decoder(hf, m, keep=True), 40, 1e-5)
        cases[f"{mode}-bf16-T12"] = compare(lambda m=mode: decoder(hf, m, keep=True, dtype=torch.bfloat16), 12, 2e-2)
    file = GGUFQuantTensors(gg, cfg, file_plan(gg, model_dir, torch.float32)[0])
    cases["gguf-fp32-T40"] = compare(lambda: decoder(model_dir, "file", True, torch.float32, file), 40, 1e-5)

    def chunked_head():
        g = torch.Generator().manual_seed(2)
        w, x = quantize(torch.randn(100, 64, generator=g), 4, 32), torch.randn(20, 64, generator=g)
        bias, buf = torch.randn(100, generator=g), WeightBuffer(30 * 64, CPU, torch.float32)  # 4 chunks of rows
        L._triton = lambda x: True
        got = L.linear(x, w, bias, buf)
        L._triton = lambda x: False
        return [("chunks", rel_err(got, L.linear(x, w, bias)), 1e-6), ("size", float(buf.flat.numel() != 30 * 64), 0)]

    cases["chunked-lm-head"] = chunked_head
    return cases


CASES = ["int8-fp32-T40", "int8-bf16-T12", "int4-fp32-T40", "int4-bf16-T12", "gguf-fp32-T40", "chunked-lm-head"]


def interp_main():
    """Entry point of the TRITON_INTERPRET=1 subprocess: prints one JSON line of results."""
    res = {}
    for name, fn in _interp_cases().items():
        try:
            res[name] = fn()
        except BaseException as e:  # noqa: BLE001 - reported, the test shows it
            res[name] = [("exception: " + repr(e)[:300], float("inf"), 0.0)]
    print("RESULTS " + json.dumps(res))


@pytest.fixture(scope="module")
def interp_results():
    from kvretrieve import kernels

    if not kernels.HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreted("test_quant_weights")


@pytest.mark.parametrize("name", CASES)
def test_triton_interpreter_decoder_matches_reference(interp_results, name):
    assert set(interp_results) == set(CASES)
    for label, e, limit in interp_results[name]:
        assert e <= limit, f"{name}/{label}: error {e} > {limit}"


# ---------------------------------------------------------------- CUDA (run on a GPU)
@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cuda_quantized_decoder_matches_cpu(tiny, mode):
    """On CUDA the weights stay QuantWeights (Triton kernels; prefill through the buffer) and agree
    with the CPU's dequantized fp32 model within the bf16 bound of test_models."""
    cfg = ModelConfig.from_hf(read_hf_config(tiny))
    gpu = Decoder(cfg, build_weights(cfg, CheckpointTensors(tiny), torch.device("cuda"), torch.bfloat16, mode))
    assert isinstance(gpu.w.layers[0].gate_up, QuantWeight) and gpu.w.layers[0].gate_up.device.type == "cuda"
    cpu = decoder(tiny, mode)
    assert rel_err(logits(gpu).cpu(), logits(cpu)) <= 2e-2
    assert gpu.buffer.flat is not None and gpu.buffer.flat.numel() == max(
        w.shape[0] * w.shape[1] for w in (gpu.w.layers[0].qkv, gpu.w.layers[0].gate_up, gpu.w.layers[0].down))


@pytest.mark.cuda
def test_cuda_gguf_auto_keeps_the_file_kinds(tmp_path, cache):
    path = tiny_gguf(tmp_path / "tiny.gguf")
    cpu = logits(load_cpu(path))
    llm = kvretrieve.load(path, device="cuda", dtype="float32", max_context=128, retrieval=None)
    assert isinstance(llm.model.w.layers[0].qkv, RowStack) and isinstance(llm.model.w.lm_head, QuantWeight)
    assert rel_err(logits(llm.model).cpu(), cpu) <= 1e-4


@pytest.mark.cuda
def test_cuda_8b_shape_int4_loads_under_12_gib():
    """The 8B shape at int4 under gpu_mem_gb=12: quantized as drawn, its bf16 weights never all exist."""
    from kvretrieve.api import load_decoder

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    try:
        dec, _, _ = load_decoder(None, RuntimeConfig(device="cuda", gpu_mem_gb=12, weights="int4"), dense_kv=False,
                                 shape="llama3-8b")
        assert isinstance(dec.w.layers[0].qkv, QuantWeight) and isinstance(dec.w.lm_head, QuantWeight)
        held = torch.cuda.memory_allocated() - before
        assert abs(held - weight_bytes(dec.cfg, 2, "int4")) < 64 << 20
        assert torch.cuda.max_memory_allocated() - before < held + (3 << 30)
    finally:  # the cap is per process: later tests get the whole card back
        dec = None
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
