"""Tests for the fused decoder-layer kernels (rms_norm, apply_rope, silu_mul): references against
transformers' and plain torch formulas, Triton kernels against the references (under
TRITON_INTERPRET=1 in a subprocess on CPU, natively on CUDA at Llama-8B sizes), input checks."""

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import run_interpreted
import kvretrieve.kernels as K
from kvretrieve.kernels import reference as R

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ulps(a, b):
    """Largest distance of a from b in units in the last place of b's dtype at b's magnitude
    (infinite on a shape or dtype mismatch or a NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    fi = torch.finfo(b.dtype)
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    _, e = torch.frexp(b.abs().clamp(min=fi.tiny))  # subnormals share the spacing of the smallest normals
    d = (a - b).abs() / torch.ldexp(torch.full_like(b, fi.eps), e - 1)
    return float("inf") if d.isnan().any() else d.max().item()


def scaled(a, b):
    """max |a - b| in units of the dtype's eps times max |b|: robust where sums cancel."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return float("inf")
    if a.numel() == 0:
        return 0.0
    eps = torch.finfo(b.dtype).eps
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / (eps * b.abs().max().clamp(min=1e-30))).nan_to_num(nan=float("inf")).item()


# ---------------------------------------------------------------- inputs
def norm_case(dtype, T=3, n=96, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(T, n, generator=g) * 3).to(dtype)
    w = (1 + 0.3 * torch.randn(n, generator=g)).to(dtype)
    return x.to(device), w.to(device)


def rope_case(dtype, T=3, H=7, d=16, seed=1, device="cpu"):
    """x a strided [T, H, d] view of a wider q|k|v buffer, as Decoder.project_qkv passes it; cos/sin
    from real angles."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, H * d + 2 * d, generator=g).to(dtype).to(device)
    ang = torch.rand(T, d // 2, generator=g) * 100
    ang = torch.cat((ang, ang), dim=-1)
    return qkv[:, :H * d].view(T, H, d), ang.cos().to(dtype).to(device), ang.sin().to(dtype).to(device)


def mlp_case(dtype, T=3, m=1500, seed=2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, 2 * m, generator=g) * 4).to(dtype).to(device)


# ---------------------------------------------------------------- references (in-process)
@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 5])
def test_rms_norm_reference_equals_transformers(dt, T):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, w = norm_case(DTYPES[dt], T=T)
    hf = LlamaRMSNorm(x.shape[1], eps=1e-5).to(x.dtype)
    with torch.no_grad():
        hf.weight.copy_(w)
        want = hf(x)
    got = R.rms_norm(x, w, 1e-5)
    assert got.dtype == x.dtype and torch.equal(got, want)
    exact = w.double() * x.double() * torch.rsqrt(x.double().pow(2).mean(-1, keepdim=True) + 1e-5)
    assert ulps(got, exact.to(x.dtype)) <= 2  # two roundings to the dtype


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 5])
def test_apply_rope_reference_equals_transformers(dt, T):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    x, cos, sin = rope_case(DTYPES[dt], T=T)
    got = R.apply_rope(x, cos, sin)
    q = x.transpose(0, 1)[None]  # transformers' [B, H, T, d] layout
    want = apply_rotary_pos_emb(q, q, cos[None], sin[None], unsqueeze_dim=1)[0][0].transpose(0, 1)
    assert got.shape == x.shape and torch.equal(got, want)
    # rotation by the angle: pair (i, i + d/2) is the complex number x_i + j x_{i+d/2}
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.exp(
        1j * torch.atan2(sin[:, :half].double(), cos[:, :half].double()))[:, None]
    assert scaled(got, torch.cat((z.real, z.imag), -1).to(x.dtype)) <= 4


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("T", [0, 1, 5])
def test_silu_mul_reference_equals_torch_formula(dt, T):
    gu = mlp_case(DTYPES[dt], T=T)
    gate, up = gu.chunk(2, dim=-1)
    got = R.silu_mul(gu)
    assert got.shape == (T, gu.shape[1] // 2) and torch.equal(got, F.silu(gate) * up)
    exact = gate.double() * torch.sigmoid(gate.double()) * up.double()
    assert ulps(got, exact.to(gu.dtype)) <= 2


def test_references_accept_strided_inputs():
    x, w = norm_case(torch.float32, T=4, n=32)
    wide = torch.zeros(8, 64)
    wide[::2, ::2] = x
    assert torch.equal(R.rms_norm(wide[::2, ::2], w, 1e-6), R.rms_norm(x, w, 1e-6))
    x, cos, sin = rope_case(torch.float32)
    assert not x.is_contiguous() and torch.equal(R.apply_rope(x, cos, sin), R.apply_rope(x.contiguous(), cos, sin))
    gu = mlp_case(torch.float32, m=20)
    assert ulps(R.silu_mul(gu.t().contiguous().t()), R.silu_mul(gu)) <= 4  # torch may vectorise strided rows apart


def test_dispatch_on_cpu_matches_plain_formulas():
    """The public functions on CPU tensors (what the model calls) against float64 formulas written out
    here, within a few units in the last place of bf16."""
    x, w = norm_case(torch.bfloat16)
    xd = x.double()
    norm = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16).double() * w.double()
    assert ulps(K.rms_norm(x, w, 1e-6), norm.to(torch.bfloat16)) <= 2
    xr, cos, sin = rope_case(torch.bfloat16)
    a, b = xr.double().chunk(2, dim=-1)
    rot = xr.double() * cos.double()[:, None] + torch.cat((-b, a), -1) * sin.double()[:, None]
    assert scaled(K.apply_rope(xr, cos, sin), rot.to(torch.bfloat16)) <= 4
    gu = mlp_case(torch.bfloat16)
    gate, up = gu.double().chunk(2, dim=-1)
    assert scaled(K.silu_mul(gu), (gate * torch.sigmoid(gate) * up).to(torch.bfloat16)) <= 4
    from kvretrieve.models import llama

    assert llama.rms_norm is K.rms_norm and llama.apply_rope is K.apply_rope  # the model's names are the dispatchers


# ---------------------------------------------------------------- bad input
BAD = [
    ("rms_norm", lambda: K.rms_norm(torch.randn(2, 3, 8), torch.ones(8), 1e-6), r"x must be \[T, n\]"),
    ("rms_norm", lambda: K.rms_norm(torch.randn(2, 8), torch.ones(7), 1e-6), "weight must be"),
    ("rms_norm", lambda: K.rms_norm(torch.randn(2, 8), torch.ones(8).half(), 1e-6), "x's dtype"),
    ("rms_norm", lambda: K.rms_norm(torch.randn(2, 8).int(), torch.ones(8), 1e-6), "x must be a float32"),
    ("rms_norm", lambda: K.rms_norm(torch.randn(2, 8), torch.ones(8), -1.0), "eps"),
    ("apply_rope", lambda: K.apply_rope(torch.randn(2, 8), torch.ones(2, 8), torch.ones(2, 8)), r"\[T, H, d\]"),
    ("apply_rope", lambda: K.apply_rope(torch.randn(2, 3, 7), torch.ones(2, 7), torch.ones(2, 7)), "even d"),
    ("apply_rope", lambda: K.apply_rope(torch.randn(2, 3, 8), torch.ones(1, 8), torch.ones(2, 8)), "cos must be"),
    ("apply_rope", lambda: K.apply_rope(torch.randn(2, 3, 8), torch.ones(2, 8), torch.ones(2, 8).bfloat16()),
     "sin must be"),
    ("silu_mul", lambda: K.silu_mul(torch.randn(2, 7)), r"\[T, 2m\]"),
    ("silu_mul", lambda: K.silu_mul(torch.randn(8)), r"\[T, 2m\]"),
    ("silu_mul", lambda: K.silu_mul(torch.arange(8).view(2, 4)), "gate_up must be a float32"),
]


@pytest.mark.parametrize("i", range(len(BAD)))
def test_bad_input_raises_value_error_naming_the_problem(i):
    op, call, match = BAD[i]
    with pytest.raises(ValueError, match=match) as info:
        call()
    assert str(info.value).startswith(op + ":")


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
def test_triton_launchers_reject_cpu_tensors_without_interpreter(monkeypatch):
    from kvretrieve.kernels import fused

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for call in (lambda: fused.rms_norm(*norm_case(torch.float32), 1e-6), lambda: fused.apply_rope(*rope_case(torch.float32)),
                 lambda: fused.silu_mul(mlp_case(torch.float32))):
        with pytest.raises(ValueError, match="CUDA"):
            call()


# ---------------------------------------------------------------- Triton vs reference
def _cases(device="cpu", big=False):
    """name -> zero-arg function returning [(label, error, tolerance)]; run where Triton can launch.

    Tolerances in ulps. RoPE is exact (products and sums round as in torch, no FMA contraction).
    RMSNorm sums in another order than torch, and SiLU uses another exp (on GPUs Triton's fp32 exp
    is the hardware approximation, up to ~16 ulps from expf): fp32 results differ by a few ulps.
    In fp16/bf16 that rarely flips a rounding, by one ulp; when it flips the rounding of the
    normalised row or of silu(gate), the product with the weight or with up moves by up to two
    ulps of its own magnitude. The interpreter (CPU) rounds fp32 -> bf16 by truncation, not to
    nearest, so bf16 there gets a looser bound: four ulps after two truncations, and for RoPE, whose
    sums can cancel, two eps of the tensor's largest value.
    """
    from kvretrieve.kernels import fused

    native = device != "cpu"
    n, H, Hkv, d, m, Ts = (4096, 32, 8, 128, 14336, (1, 37)) if big else (96, 7, 2, 16, 1500, (1, 3))
    cases = {}
    for dn, dt in DTYPES.items():
        trunc = dt == torch.bfloat16 and not native
        tol = 8 if dt == torch.float32 else 4 if trunc else 2
        silu_tol = 32 if dt == torch.float32 else tol
        for T in Ts:
            x, w = norm_case(dt, T=T, n=n, device=device)
            cases[f"rms-norm-{dn}-T{T}"] = lambda a=(x, w, 1e-5), t=tol: [
                ("out", ulps(fused.rms_norm(*a), R.rms_norm(*a)), t)]
            for heads in (H, Hkv, H + Hkv):  # q, k, and q|k in one launch as the decoder does
                a = rope_case(dt, T=T, H=heads, d=d, device=device)
                cases[f"rope-{dn}-T{T}-H{heads}"] = lambda a=a, tr=trunc: [
                    ("out", scaled(fused.apply_rope(*a), R.apply_rope(*a)), 2) if tr else
                    ("out", ulps(fused.apply_rope(*a), R.apply_rope(*a)), 0)]
            gu = mlp_case(dt, T=T, m=m, device=device)
            cases[f"silu-mul-{dn}-T{T}"] = lambda a=gu, t=silu_tol: [
                ("out", ulps(fused.silu_mul(a), R.silu_mul(a)), t)]

    def strided_and_empty():
        x, w = norm_case(torch.float32, T=4, n=n, device=device)
        wide = torch.zeros(8, 2 * n, device=device)
        wide[::2, ::2] = x
        xr, cos, sin = rope_case(torch.float32, T=5, H=Hkv, d=d, device=device)
        gu = mlp_case(torch.float32, T=4, m=m, device=device)
        gt = gu.t().contiguous().t()  # column-major
        res = [("rms-strided", ulps(fused.rms_norm(wide[::2, ::2], w, 1e-5), fused.rms_norm(x, w, 1e-5)), 0),
               # cos/sin of one position broadcast over T rows (stride 0), as a batched step passes them
               ("rope-broadcast-tables", ulps(fused.apply_rope(xr, cos[:1].expand(5, -1), sin[:1].expand(5, -1)),
                                              R.apply_rope(xr, cos[:1].expand(5, -1), sin[:1].expand(5, -1))), 0),
               ("silu-column-major", ulps(fused.silu_mul(gt), fused.silu_mul(gu)), 0)]
        shapes = [fused.rms_norm(x[:0], w, 1e-5).shape, fused.apply_rope(xr[:0], cos[:0], sin[:0]).shape,
                  fused.silu_mul(gu[:0]).shape]
        res.append(("empty-shapes", float(shapes != [(0, n), (0, Hkv, d), (0, m)]), 0))
        return res

    cases["strided-and-empty"] = strided_and_empty
    return cases


def interp_main():
    """Entry point of the TRITON_INTERPRET=1 subprocess: prints one JSON line of results."""
    res = {}
    for name, fn in _cases().items():
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - report, the parent test shows it
            res[name] = [("exception: " + repr(e), float("inf"), 0.0)]
    print("RESULTS " + json.dumps(res))


@pytest.fixture(scope="module")
def interp_results():
    if not K.HAS_TRITON:
        pytest.skip("triton not installed")
    return run_interpreted("test_fused_kernels")


_CASE_NAMES = list(_cases().keys()) if K.HAS_TRITON else []


@pytest.mark.parametrize("name", _CASE_NAMES)
def test_triton_interpreter_matches_reference(interp_results, name):
    for label, e, tol in interp_results[name]:
        assert e <= tol, f"{name}/{label}: error {e} > {tol}"


_CUDA = torch.cuda.is_available() and K.HAS_TRITON
_CUDA_NAMES = list(_cases(big=True).keys()) if K.HAS_TRITON else []


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA, reason="needs CUDA and triton")
@pytest.mark.parametrize("name", _CUDA_NAMES)
def test_triton_cuda_matches_reference_llama8b_sizes(name):
    for label, e, tol in _cases(device="cuda", big=True)[name]():
        assert e <= tol, f"{name}/{label}: error {e} > {tol}"


@pytest.mark.cuda
@pytest.mark.skipif(not _CUDA, reason="needs CUDA and triton")
def test_decoder_on_cuda_same_with_kernels_and_references(tmp_path, monkeypatch):
    """The decoder wired to the Triton kernels (prefill and decode) against the same decoder with
    the fused ops on their references, in bf16: only the kernels' rare one-ulp differences remain."""
    from helpers import tiny_hf_model
    from test_models import load_ours, rel_err

    tiny_hf_model("llama", "llama3").save_pretrained(tmp_path)
    prompt = torch.randint(0, 512, (40,), generator=torch.Generator().manual_seed(3))
    logits = []
    for use_kernels in (True, False):
        if not use_kernels:
            monkeypatch.setattr(K, "_tfused", R)  # the dispatchers look their implementation up per call
        engine = load_ours(tmp_path, dtype=torch.bfloat16, device="cuda")
        out = [engine.model.logits(engine.forward(prompt.cuda()))]
        out += [engine.step(torch.tensor(t, device="cuda")) for t in (5, 17, 300)]
        logits.append(torch.cat([o.reshape(-1) for o in out]))
    assert rel_err(logits[0], logits[1]) <= 2e-2
