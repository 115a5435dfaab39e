"""Our decoder against transformers' own model on the same weights (fp32)."""
from __future__ import annotations

import pytest
import torch

from kvretrieve.backends.prefill_attention import PrefillAttention, attention_lse_reference
from kvretrieve.engine.engine import Engine
from kvretrieve.models.llama import ModelConfig

from helpers import ROPE_VARIANTS, dense_backend, tiny_decoder, tiny_hf_model

CPU = torch.device("cpu")


def load_ours(model_dir, capacity=128, chunk=4096, dtype=torch.float32, device="cpu"):
    dec = tiny_decoder(model_dir, device, dtype)
    return Engine(dec, dense_backend(dec, capacity), chunk)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("arch,rope,tie", [("llama", r, False) for r in ROPE_VARIANTS]
                         + [("llama", "default", True), ("qwen2", "default", False), ("qwen2", "yarn", True),
                            ("mistral", "default", False)])
def test_logits_match_transformers(tmp_path, arch, rope, tie):
    hf = tiny_hf_model(arch, rope, tie=tie)
    hf.save_pretrained(tmp_path)
    engine = load_ours(tmp_path)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, hf.config.vocab_size, (40,), generator=g)  # longer than max_pos=32
    with torch.no_grad():
        ref = hf(prompt[None], use_cache=True)
    x = engine.forward(prompt)
    ours = engine.model.logits(x)
    assert rel_err(ours, ref.logits[0]) <= 1e-4
    past = ref.past_key_values
    for step in range(8):  # decode: teacher-forced tokens so both sides see the same inputs
        tok = torch.randint(0, hf.config.vocab_size, (1,), generator=g)
        with torch.no_grad():
            ref = hf(tok[None], past_key_values=past, use_cache=True)
        past = ref.past_key_values
        ours = engine.step(tok[0])
        assert rel_err(ours, ref.logits[0, -1]) <= 1e-4, f"decode step {step}"


def test_sharded_checkpoint_loads_the_same(tmp_path):
    hf = tiny_hf_model("qwen2", "default")
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompt = torch.randint(0, hf.config.vocab_size, (12,), generator=torch.Generator().manual_seed(5))
    assert torch.equal(load_ours(tmp_path / "one").forward(prompt), load_ours(tmp_path / "sharded").forward(prompt))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_dense_engine_matches_cpu(tmp_path, dtype):
    hf = tiny_hf_model("llama", "llama3")
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, hf.config.vocab_size, (40,), generator=torch.Generator().manual_seed(6))
    cpu, gpu = load_ours(tmp_path), load_ours(tmp_path, dtype=dtype, device="cuda")
    a, b = cpu.model.logits(cpu.forward(prompt)), gpu.model.logits(gpu.forward(prompt.cuda())).cpu()
    for t in prompt[:8]:
        a = torch.cat([a, cpu.step(t)[None]])
        b = torch.cat([b, gpu.step(t.cuda())[None].cpu()])
    assert rel_err(b, a) <= (1e-4 if dtype == torch.float32 else 2e-2)


def test_chunked_prefill_equals_one_shot(tmp_path):
    hf = tiny_hf_model("llama", "llama3")
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, hf.config.vocab_size, (100,), generator=torch.Generator().manual_seed(2))
    one_shot = load_ours(tmp_path).forward(prompt)
    # projection/MLP chunks of 7 rows
    chunked = load_ours(tmp_path, chunk=7).forward(prompt)
    assert torch.allclose(chunked, one_shot, rtol=1e-5, atol=1e-5)
    # the same prompt as three segments (the masked, bottom-right causal path)
    engine = load_ours(tmp_path)
    engine.forward(prompt[:45])
    engine.forward(prompt[45:46])
    last = engine.forward(prompt[46:])
    assert torch.allclose(last, one_shot[46:], rtol=1e-5, atol=1e-5)


def test_truncate_then_refill_matches(tmp_path):
    hf = tiny_hf_model("qwen2", "default")
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, hf.config.vocab_size, (30,), generator=torch.Generator().manual_seed(3))
    engine = load_ours(tmp_path)
    full = engine.forward(prompt)
    engine.forward(torch.tensor([5, 6, 7]))  # something to throw away
    engine.truncate(20)
    again = engine.forward(prompt[20:])
    assert torch.allclose(again, full[20:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_start,T,S_extra,hq,hkv,piece", [(0, 33, 0, 8, 2, 16384), (17, 1, 0, 6, 3, 16384),
                                                            (9, 12, 0, 4, 4, 16384), (40, 7, 0, 8, 2, 16384),
                                                            (40, 7, 0, 8, 2, 16), (37, 9, 0, 8, 2, 8)])
def test_causal_attention_matches_naive(q_start, T, S_extra, hq, hkv, piece):
    """Also with the earlier tokens in several pieces (the last one shorter), merged by log-sum-exp."""
    g = torch.Generator().manual_seed(4)
    d = 16
    S = q_start + T
    q, k, v = (torch.randn(n, h, d, generator=g) for n, h in ((T, hq), (S, hkv), (S, hkv)))
    out = PrefillAttention(d ** -0.5, piece)(q, k, v, q_start)
    q, k, v = q.double(), k.double(), v.double()
    kr, vr = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
    scores = torch.einsum("thd,shd->hts", q, kr) * d ** -0.5
    visible = torch.arange(S)[None, :] <= (q_start + torch.arange(T))[:, None]
    ref = torch.einsum("hts,shd->thd", scores.masked_fill(~visible, float("-inf")).softmax(-1), vr)
    assert torch.allclose(out.double(), ref, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_fused_attention_with_lse_matches_reference(causal):
    """PrefillAttention.lse on CUDA in bf16 (cuDNN, or flash where cuDNN refuses), with token-major GQA
    inputs as the prefill passes them, against the fp32 reference: output and log-sum-exp."""
    g = torch.Generator().manual_seed(9)
    T, S = (300, 300) if causal else (200, 700)
    q, k, v = (torch.randn(n, h, 128, generator=g).bfloat16().cuda() for n, h in ((T, 32), (S, 8), (S, 8)))
    out, lse = PrefillAttention(128 ** -0.5).lse(q, k, v, causal)
    ref, ref_lse = attention_lse_reference(q.float(), k.float(), v.float(), causal, 128 ** -0.5)
    assert out.shape == ref.shape and lse.shape == ref_lse.shape
    assert rel_err(out.float(), ref) < 2e-2 and (lse.float() - ref_lse).abs().max() < 1e-2


def test_config_errors():
    from kvretrieve.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="unsupported architecture GPT2LMHeadModel"):
        ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ModelLoadError, match="lacks the field 'hidden_size'"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "num_attention_heads": 4})
    with pytest.raises(ModelLoadError, match="unsupported RoPE type 'longrope'"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                             "vocab_size": 10, "intermediate_size": 8, "num_hidden_layers": 1,
                             "rope_scaling": {"rope_type": "longrope"}})
