"""Every Triton kernel of kvretrieve.kernels, in every variant its launchers use, must lower to TTIR
for an H100 (CUDA sm90) -- checked on the CPU, without a GPU or a driver.

Why: CPU CI runs the kernels only under TRITON_INTERPRET=1, which executes them as Python and
accepts code the compiler rejects (a @triton.jit helper returning fp32 in one constexpr branch and
int8 in the other passed the interpreter and failed on the H100 with "Return type mismatch").

How: a subprocess without TRITON_INTERPRET (under it @triton.jit makes interpreter objects) calls
the public launchers on fake CUDA tensors (torch's FakeTensorMode: shapes, strides and dtypes, no
data), so they run their real checks and CUDA code paths, with JITFunction.run replaced by a
recorder. Each distinct launch (kernel, argument types, constexprs, options) is the variant the GPU
would compile; it is lowered with Triton's frontend and TTIR passes for a sm90 target, no driver
needed. Signatures thus come from real launches, not a hand-kept table: _launches only picks shapes,
dtypes and flags, and a kernel that nothing there launches fails the coverage test.
"""
import importlib
import json
import os
import pkgutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "i8", "int16": "i16",
          "int32": "i32", "int64": "i64", "uint8": "u8", "bool": "u1"}  # torch dtype name -> Triton's


def _launches(cuda, kv_store):
    """(label, "module.launcher", args) per launch: each float dtype, the two model shapes the runtime
    targets (SmolLM2-135M: Hkv 3, G 3, d 64; Llama-3-8B: Hkv 8, G 4, d 128) and every constexpr flag."""
    from kvretrieve.config import KVGeometry
    from kvretrieve.kernels.rows import DECODE, LOWRANK, LRU, MASS, RowTensors

    import torch

    i32, i64 = torch.int32, torch.int64
    out = []
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        n = str(dt).split(".")[1]
        for hkv, g, d, hidden, inter in ((3, 3, 64, 576, 1536), (8, 4, 128, 4096, 14336)):
            pool, hq = (hkv, 64, 16, d), hkv * g
            out.append((f"{n} d{d}", "sparse_decode.sparse_decode", (cuda(hq, d, dt=dt), cuda(*pool, dt=dt),
                        cuda(*pool, dt=dt), cuda(hkv, 40, dt=i32), cuda(1, dt=i32), d ** -0.5)))
            # a batch of 3 rows, each its own [L=2, ...] pool and tables, read by address (kernels/rows.py)
            rows = RowTensors(DECODE, tuple(tuple(cuda(*shape, dt=t) for _ in range(3)) for shape, t in (
                ((2, *pool), dt), ((2, *pool), dt), ((2, hkv, 40), i32), ((1,), i32))), cuda(3, 4, dt=i64))
            out.append((f"{n} d{d}", "sparse_decode.sparse_decode_rows", (cuda(3, hq, d, dt=dt), rows, 1, d ** -0.5)))
            out.append((f"{n} d{d}", "merge.merge_attention", (cuda(hq, d, dt=dt), cuda(hq), cuda(hq, d, dt=dt),
                                                                cuda(hq))))
            out.append((f"{n} d{d}", "fused.rms_norm", (cuda(3, hidden, dt=dt), cuda(hidden, dt=dt), 1e-5)))
            q = cuda(3, hq, d, dt=dt, stride=((hq + 2 * hkv) * d, d, 1))  # a view of the fused qkv output
            out.append((f"{n} d{d}", "fused.apply_rope", (q, cuda(3, d, dt=dt), cuda(3, d, dt=dt))))
            out.append((f"{n} d{d}", "fused.silu_mul", (cuda(3, 2 * inter, dt=dt),)))
        for qdt in dict.fromkeys((dt, torch.float32)):  # fp32 queries against a 16-bit stream take the hi/lo split
            q, lbl = cuda(12, 64, dt=qdt), f"{n} stream, q {qdt}"
            out.append((lbl, "scoring.lowrank_block_scores", (q, cuda(4, 64, 32, dt=qdt), cuda(4, 64, dt=qdt),
                                                              cuda(4, 4096, 32, dt=dt), 200, 16)))
            scoring = RowTensors(LOWRANK, tuple(tuple(cuda(*shape, dt=t) for _ in range(3)) for shape, t in (
                ((2, 4, 64, 32), qdt), ((2, 4, 64), qdt), ((2, 4, 4096, 32), dt))), cuda(3, 3, dt=i64))
            out.append((lbl, "scoring.lowrank_block_scores_rows", (cuda(3, 12, 64, dt=qdt), scoring, 1, 200, 16)))
            out.append((lbl, "mass.lowrank_block_mass", (q, cuda(4, 64, 32, dt=qdt), cuda(4, 4096, 32, dt=dt),
                                                         cuda(4, 256, 64, dt=dt), 200, 16, 0.125)))
            by_mass = RowTensors(MASS, tuple(tuple(cuda(*shape, dt=t) for _ in range(3)) for shape, t in (
                ((2, 4, 64, 32), qdt), ((2, 4, 4096, 32), dt), ((2, 4, 256, 64), dt))), cuda(3, 3, dt=i64))
            out.append((lbl, "mass.lowrank_block_mass_rows", (cuda(3, 12, 64, dt=qdt), by_mass, 1, 200, 16, 0.125)))
            for hkv, d, bs, rv in ((4, 64, 16, 16), (2, 128, 4, 8)):  # the rests (index/summary.py)
                into = (cuda(12, d, dt=qdt), cuda(12)) if bs == 4 else None  # merged into an attended part, or not
                out.append((lbl + f" d{d} bs{bs}", "rest.lowrank_rest", (
                    cuda(12, d, dt=qdt), cuda(hkv, d, 32, dt=qdt), cuda(hkv, 4096, 32, dt=dt), cuda(hkv, 1024, d, dt=dt),
                    cuda(hkv, d, rv, dt=dt), cuda(hkv, 4096, rv, dt=dt), cuda(hkv, 1024, d, dt=dt),
                    cuda(hkv, 200, dt=torch.bool), bs, 0.125, into)))
                out.append((lbl + f" d{d}", "rest.block_rest", (cuda(12, d, dt=qdt), cuda(hkv, 1024, d, dt=dt),
                                                               cuda(hkv, 1024, d, dt=dt), cuda(hkv, 800, dt=torch.bool),
                                                               bs, 0.125, into)))
            for bs in (16, 1):  # the exact index (keys) and ivf (a centroid per block)
                out.append((lbl, "scoring.max_dot_block_scores", (q, cuda(4, 4096, 64, dt=dt), 4096 // bs, bs)))
            out.append((lbl, "scoring.bounds_block_scores", (q, cuda(4, 256, 64, dt=dt), cuda(4, 256, 64, dt=dt),
                                                             200)))
        for quant in (False, True):  # a real (CPU) store; pools and tables are fake CUDA tensors
            store = kv_store(KVGeometry(2, 2, 64, 16, 64, torch.device("cpu"), dt), quantize=quant, segment_blocks=16)
            store.ensure(64)
            pool, lbl = (2, 8, 16, 64), f"{n} quantize={quant}"
            out.append((lbl, "fetch.fetch_blocks", (store, 1, cuda(2, 5, dt=i64), cuda(2, 5, dt=torch.bool),
                                                    cuda(2, 5, dt=i32), cuda(*pool, dt=dt), cuda(*pool, dt=dt))))
            out.append((lbl, "fetch.store_blocks", (store, 17, 3, cuda(2, *pool, dt=dt), cuda(2, *pool, dt=dt))))
    for counts in (None, cuda(2, dt=i64)):
        out.append((f"counts={counts is not None}", "lru.lru_lookup", (cuda(3, 10, dt=i64), cuda(3, 41, dt=i32),
                    cuda(3, 25, dt=i32), cuda(3, 25, dt=i32), cuda(1, dt=i32), counts)))
    pools = RowTensors(LRU, tuple(tuple(cuda(*shape, dt=t) for _ in range(3)) for shape, t in (
        ((2, 3, 41), i32), ((2, 3, 25), i32), ((2, 3, 25), i32), ((1,), i32), ((2,), i64))), cuda(3, 5, dt=i64))
    out.append(("rows", "lru.lru_lookup_rows", (cuda(3, 3, 10, dt=i64), pools, 1)))
    for n in (300, 8704):  # one slice; several slices, then a pass over their survivors (HAS_IDX)
        out.append((f"n={n}", "topk.topk_indices", (cuda(8, n), 128)))
    from kvretrieve.models.quant import QuantWeight

    for bits, group in ((8, 32), (8, 4096), (4, 32), (4, 128)):  # weights kept quantized (kernels.qlinear)
        codes = cuda(512, 4096 if bits == 8 else 2048, dt=torch.int8 if bits == 8 else torch.uint8)
        scales = [cuda(512, 4096 // group, dt=torch.float16) for _ in range(2)]
        w = QuantWeight(bits, codes, scales[0], scales[1] if bits == 4 else None, group)
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            for t, bias in ((1, True), (1, False), (8, True), (40, True)):  # GEMV, tensor cores (+ K splits), prefill
                out.append((f"int{bits} g{group} {dt} T={t}", "qlinear.quant_linear",
                            (cuda(t, 4096, dt=dt), w, cuda(512, dt=dt) if bias else None)))
    return out


def _signature(fn, args, kwargs):
    """(signature, constexprs, launch options) of one launch, as JITFunction.run would derive them."""
    bound = fn.signature.bind(*args, **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    bound.apply_defaults()
    sig, consts = {}, {}
    for p, (name, v) in zip(fn.params, bound.arguments.items()):
        if p.is_constexpr or v is None:
            sig[name] = "constexpr"
        elif hasattr(v, "data_ptr"):  # tensors and pointer wrappers (fetch._HostPointer)
            sig[name] = "*" + DTYPES[str(v.dtype).replace("torch.", "")]
        elif isinstance(v, bool):
            sig[name] = "u1"
        elif isinstance(v, int):  # the launcher turns ints equal to 1 into constants, so must we
            one = v == 1 and not p.do_not_specialize
            sig[name] = "constexpr" if one else "i32" if -2**31 <= v < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"no signature rule for argument {name}={v!r}")
        if sig[name] == "constexpr":
            consts[(p.num,)] = v
    return sig, consts, {k: v for k, v in kwargs.items() if k not in fn.arg_names}


def main():
    """Subprocess entry: prints one JSON line (RESULTS ...), or SKIP and a reason."""
    try:
        import torch
        import triton
        import triton._C.libtriton as lt
        from torch._subclasses.fake_tensor import FakeTensorMode
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction

        target = GPUTarget("cuda", 90, 32)
        backend = make_backend(target)

        def lower(fn, sig, consts, options):
            opts = backend.parse_options(options)
            ctx = lt.ir.context()
            lt.ir.load_dialects(ctx)
            backend.load_dialects(ctx)
            mod = ASTSource(fn, sig, consts).make_ir(target, opts, backend.get_codegen_implementation(opts),
                                                    backend.get_module_map(), ctx)
            backend.make_ttir(mod, {}, opts, 90)  # inlining, canonicalisation, verification

        fake = FakeTensorMode(allow_non_fake_inputs=True)

        def cuda(*shape, dt=torch.float32, stride=None):  # a fake CUDA tensor (the stores stay real)
            with fake:
                return torch.empty_strided(shape, stride or torch.empty(shape, device="meta").stride(), dtype=dt,
                                           device="cuda")

        @triton.jit
        def probe(x_ptr, n, B: triton.language.constexpr):
            triton.language.store(x_ptr + triton.language.arange(0, B), n)

        lower(probe, *_signature(probe, (cuda(16, dt=torch.int32), 5), {"B": 16}))  # every API used below
    except Exception as e:  # noqa: BLE001 - private Triton/torch APIs differ between versions: skip
        print(f"SKIP cannot lower Triton kernels offline with this triton/torch: {e!r}"[:500])
        return
    from kvretrieve.store import KVStore

    res = {"kernels": [], "errors": []}
    pkg = importlib.import_module("kvretrieve.kernels")
    for info in pkgutil.iter_modules(pkg.__path__):
        try:
            mod = importlib.import_module(f"kvretrieve.kernels.{info.name}")
        except Exception as e:  # noqa: BLE001 - e.g. a half-written kernel module
            res["errors"].append(f"kvretrieve.kernels.{info.name} does not import: {e!r}")
            continue
        for name, obj in vars(mod).items():
            while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):  # autotune/heuristics wrappers
                obj = obj.fn
            if isinstance(obj, JITFunction) and obj.module == mod.__name__ and name.startswith("_") \
                    and name.endswith("_kernel"):
                res["kernels"].append(f"{mod.__name__}.{name}")

    launches = []
    JITFunction.run = lambda self, *args, grid=None, warmup=False, **kw: launches.append((self, args, kw))
    for label, launcher, args in _launches(cuda, KVStore):
        label, n = f"{launcher} {label}", len(launches)
        try:
            module, func = launcher.split(".")
            with fake:
                getattr(importlib.import_module(f"kvretrieve.kernels.{module}"), func)(*args)
        except Exception as e:  # noqa: BLE001 - reported by the coverage test
            res["errors"].append(f"launch {label} raised {e!r}")
        launches[n:] = [(label, *x) for x in launches[n:]]

    seen, failures = set(), {}  # failures: (kernel, compiler message) -> launches that hit it
    for label, fn, args, kwargs in launches:
        name, consts = f"{fn.module}.{fn.fn.__name__}", {}
        try:
            sig, consts, options = _signature(fn, args, kwargs)
            if repr((name, sig, consts, options)) not in seen:
                seen.add(repr((name, sig, consts, options)))
                lower(fn, sig, consts, options)
        except Exception as e:  # noqa: BLE001 - the compiler's message is the point of the test
            # A CompilationError shows the call site; the helper at fault and why are in its causes.
            msgs = []
            while e is not None:
                msgs += [str(e)] if not any(str(e) in m for m in msgs) else []
                e = e.__cause__
            flags = {fn.arg_names[i[0]]: v for i, v in consts.items() if fn.params[i[0]].is_constexpr}
            failures.setdefault((name, "\n".join(msgs)), []).append(f"  {label}, constexprs {flags}")
    res["launched"] = sorted({f"{fn.module}.{fn.fn.__name__}" for _, fn, _, _ in launches})
    res["variants"] = len(seen)
    res["failures"] = ["\n".join([f"{name} does not lower for sm90 in launches:", *where, msg])
                       for (name, msg), where in failures.items()]
    print("RESULTS " + json.dumps(res, default=repr))


@pytest.fixture(scope="module")
def lowered():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True, text=True,
                          timeout=600)
    skips = [ln[5:] for ln in proc.stdout.splitlines() if ln.startswith("SKIP ")]
    if skips:
        pytest.skip(skips[0])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULTS "):])


def test_every_kernel_variant_lowers_for_sm90(lowered):
    if lowered["failures"]:
        pytest.fail("\n\n".join(lowered["failures"]), pytrace=False)


def test_every_kernel_is_launched(lowered):
    missing = sorted(set(lowered["kernels"]) - set(lowered["launched"]))
    errors = lowered["errors"] + [f"{k} is never launched: add a launch of its public launcher to _launches in "
                                  f"tests/test_triton_lowering.py" for k in missing]
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


if __name__ == "__main__":
    main()
