"""Bounded fuzzing (hypothesis) of the entry points a user reaches: CLI options, prompts of random bytes
and unicode, and damaged config.json, safetensors and GGUF files. The contract: a user error
(KVRetrieveError, or a CLI usage error with exit 2), never an internal error or a hang. Each test runs
a fixed number of cases with a per-case deadline; the totals are printed (pytest -s) for the notes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kvretrieve
from kvretrieve import RetrievalConfig, RuntimeConfig, SamplingParams
from kvretrieve.errors import KVRetrieveError

from helpers import save_with_tokenizer, tiny_hf_model

CASES = settings(max_examples=40, deadline=20_000, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
INTERNAL = "internal error"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir) -> Path:
    """A small random model with the default model's tokenizer: loads in well under a second."""
    out = tmp_path_factory.mktemp("fuzz") / "tiny"
    return save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=8192, seed=5), out, smol_dir)


@pytest.fixture(scope="module")
def llm(tiny):
    return kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=2048)


def cli(*args: str):
    from click.testing import CliRunner

    from kvretrieve.cli import cli as command

    return CliRunner().invoke(command, list(args))


values = st.one_of(st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=12), st.sampled_from(["0", "-1", "1e-300", "nan", "inf", "8K", "1M", "", " "]))
options = st.sampled_from(["--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--stop",
                           "--max-context", "--budget", "--block-size", "--sink", "--window", "--rank",
                           "--reselect-every", "--prefill-chunk", "--retrieval", "--store-dtype", "--dtype",
                           "--device", "--cache-blocks"])


@CASES
@given(st.lists(st.tuples(options, values), min_size=1, max_size=3))
def test_cli_options(tiny, opts):
    args = ["generate", "hi", "--model", str(tiny), "--device", "cpu", "--max-new-tokens", "2"]
    for name, value in opts:
        args += [name, str(value)]
    result = cli(*args)
    assert INTERNAL not in result.output and result.exit_code in (0, 1, 2), (args, result.output[-500:])


@CASES
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("utf-8", "surrogateescape"))))
def test_prompts(llm, prompt):
    try:
        llm.generate(prompt, max_new_tokens=2)
    except KVRetrieveError:
        pass  # e.g. an empty prompt: a message, not a crash


CONFIG_FIELDS = {
    SamplingParams: ["temperature", "top_k", "top_p", "seed", "max_new_tokens", "repeat_penalty", "repeat_last_n",
                     "stop"],
    RetrievalConfig: ["budget_tokens", "block_size", "sink_tokens", "window_tokens", "rank", "reselect_every",
                      "estimate_tokens", "estimate_rest", "cache_blocks", "index", "store_dtype"],
    RuntimeConfig: ["max_context", "prefill_chunk", "gpu_mem_gb", "device", "dtype"],
}


@pytest.mark.parametrize("cls", list(CONFIG_FIELDS), ids=lambda c: c.__name__)
@CASES
@given(data=st.data())
def test_config_values(cls, data):
    try:
        cls(**data.draw(st.dictionaries(st.sampled_from(CONFIG_FIELDS[cls]), values)))
    except KVRetrieveError:
        pass


def damaged(tiny: Path, tmp: Path, name: str, cut: float, flip: int | None) -> Path:
    out = tmp / "damaged"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(tiny, out)
    data = (out / name).read_bytes()
    data = data[:int(len(data) * cut)]
    if flip is not None and data:
        i = flip % len(data)
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    (out / name).write_bytes(data)
    return out


@CASES
@given(st.sampled_from(["config.json", "model.safetensors"]), st.floats(0, 1), st.one_of(st.none(), st.integers(0)))
def test_damaged_checkpoint_files(tiny, tmp_path_factory, name, cut, flip):
    path = damaged(tiny, tmp_path_factory.mktemp("d"), name, cut, flip)
    try:
        kvretrieve.load(path, device="cpu", dtype="float32", max_context=256).generate("hi", max_new_tokens=1)
    except KVRetrieveError:
        pass


@settings(CASES, max_examples=20)  # each example loads a GGUF (1-2 s): the suite's time, not its reach, is the limit
@given(st.floats(0, 1), st.one_of(st.none(), st.integers(0)))
def test_damaged_gguf(tmp_path_factory, monkeypatch, cut, flip):
    from kvretrieve.models.loader import default_model_path

    tmp = tmp_path_factory.mktemp("g")
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp / "cache"))
    src = default_model_path()
    with src.open("rb") as f:  # the header and the first tensors: a cut file is refused before the data
        data = f.read(max(1, int((4 << 20) * cut)))
    if flip is not None:
        i = flip % len(data)
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
    (tmp / "m.gguf").write_bytes(data)
    try:
        kvretrieve.load(tmp / "m.gguf", device="cpu", dtype="float32", max_context=256)
    except KVRetrieveError:
        pass


def test_config_json_fields(tiny, tmp_path):
    """Every top-level field of config.json dropped, nulled or given a wrong type, one at a time."""
    cfg = json.loads((tiny / "config.json").read_text())
    n = 0
    for key in list(cfg):
        for bad in (..., None, "x", -1, 0, [1], {"a": 1}):
            out = tmp_path / f"c{n}"
            shutil.copytree(tiny, out)
            broken = {k: v for k, v in cfg.items() if k != key} if bad is ... else cfg | {key: bad}
            (out / "config.json").write_text(json.dumps(broken))
            try:
                kvretrieve.load(out, device="cpu", dtype="float32", max_context=256).generate("hi", max_new_tokens=1)
            except KVRetrieveError:
                pass
            shutil.rmtree(out)
            n += 1
    print(f"config.json cases: {n}")
