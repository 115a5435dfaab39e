"""Hardening (issue 7): the bad input test_cli.py does not cover, and Ctrl-C in `kvretrieve chat`.

Bad input runs the CLI on a tiny random Llama (SmolLM2's tokenizer and chat template) and damaged
copies of it: every case must give one `error:` line naming problem and fix, exit code 1 (2 for
click's usage errors) and no traceback. Interruption runs `python -m kvretrieve chat` as a real
process on a pseudo-terminal and sends it SIGINT while it generates and while it prefills.
"""
from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch

from helpers import save_with_tokenizer, tiny_hf_model
import kvretrieve
from kvretrieve.api import check_weights_fit
from kvretrieve.config import RetrievalConfig
from kvretrieve.errors import ResourceError
from kvretrieve.models.llama import ModelConfig
from kvretrieve.models.loader import read_hf_config
from test_cli import DOC, REPO, assert_user_error, run

TINY_OPTS = ["--dtype", "float32", "--device", "cpu", "--max-context", "4K", "--max-new-tokens", "2"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, smol_dir):
    """A 2-layer random Llama with the default model's tokenizer and chat template (so vocab 49152)."""
    out = tmp_path_factory.mktemp("tiny-chat")
    return save_with_tokenizer(tiny_hf_model(vocab=49152, max_pos=65536, seed=3), out, smol_dir)


def variant(tmp_path: Path, src: Path, name: str = "m", config: dict | None = None, **files) -> Path:
    """A copy of checkpoint `src` (symlinks, so it is cheap) with some files replaced: files maps a file
    name (dots as '__') to bytes, text, or None to leave it out; config edits config.json (... deletes)."""
    out = tmp_path / name
    out.mkdir()
    replaced = {k.replace("__", "."): v for k, v in files.items()}
    for f in src.iterdir():
        if f.name not in replaced and not (config is not None and f.name == "config.json"):
            (out / f.name).symlink_to(f)
    for fname, content in replaced.items():
        if content is not None:
            (out / fname).write_bytes(content.encode() if isinstance(content, str) else content)
    if config is not None:
        cfg = json.loads((src / "config.json").read_text())
        for key, value in config.items():
            if value is ...:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        (out / "config.json").write_text(json.dumps(cfg))
    return out


def generate(model: Path, *extra, prompt="hi", input=None, env=None):
    from click.testing import CliRunner

    from kvretrieve.cli import cli

    return CliRunner().invoke(cli, ["generate", prompt, "--model", str(model), *TINY_OPTS, *extra], input=input,
                              env=env)


# ---- damaged checkpoints ---------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"", b"\x00" * 7, os.urandom(5000), (10**12).to_bytes(8, "little") + b"{}",
                                     (10).to_bytes(8, "little") + b"{not json}"],
                         ids=["empty", "short", "garbage", "huge-header", "bad-header-json"])
def test_damaged_safetensors(tmp_path, tiny, content):
    model = variant(tmp_path, tiny, model__safetensors=content)
    assert_user_error(generate(model), "model.safetensors", "corrupt or truncated", "re-download")


def test_damaged_checkpoint_layout(tmp_path, tiny):
    cases = [
        (dict(model__safetensors__index__json="{"), ("index.json is damaged", "re-download")),
        (dict(model__safetensors__index__json=json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}})),
         ("shards missing", "model-00001-of-00002.safetensors", "download them")),
        (dict(model__safetensors=None, pytorch_model__bin=b"pickle"), ("no .safetensors weights",)),
    ]
    for i, (files, fragments) in enumerate(cases):
        assert_user_error(generate(variant(tmp_path, tiny, f"m{i}", **files)), *fragments)


@pytest.mark.parametrize("edit,fragments", [
    (dict(hidden_size="big"), ("hidden_size must be a positive integer", "re-download")),
    (dict(hidden_size=None), ("hidden_size must be a positive integer, got None",)),
    (dict(vocab_size=...), ("lacks the field 'vocab_size'",)),
    (dict(num_attention_heads=0), ("num_attention_heads must be a positive integer",)),
    (dict(num_hidden_layers=-1), ("num_hidden_layers must be a positive integer",)),
    (dict(max_position_embeddings="8K"), ("max_position_embeddings must be a positive integer",)),
    (dict(rms_norm_eps="tiny"), ("rms_norm_eps must be a positive number",)),
    (dict(num_key_value_heads=3), ("not a multiple of num_key_value_heads",)),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0}), ("unsupported RoPE type 'longrope'",)),
    (dict(mlp_bias=True), ("mlp_bias",)),
    (dict(architectures=...), ("unsupported architecture (none given)", "LlamaForCausalLM")),
    (dict(intermediate_size=128), ("has shape", "config.json does not belong to these weights")),
    (dict(num_hidden_layers=3), ("lacks tensor model.layers.2.",)),
], ids=lambda v: "-".join(map(str, v)) if isinstance(v, dict) else None)
def test_bad_config_values(tmp_path, tiny, edit, fragments):
    assert_user_error(generate(variant(tmp_path, tiny, config=edit)), *fragments)


@pytest.mark.parametrize("content,fragments", [
    ("{oops", ("config.json is not valid JSON", "re-download")),
    ("[1, 2]", ("config.json does not hold a JSON object",)),
    (b"\xff\xfe{\x00}\x00", ("config.json is not valid JSON",)),
], ids=["not-json", "list", "utf16"])
def test_unreadable_config(tmp_path, tiny, content, fragments):
    assert_user_error(generate(variant(tmp_path, tiny, config__json=content)), *fragments)


def test_tokenizer_and_template_problems(tmp_path, tiny):
    tok = (tiny / "tokenizer.json").read_bytes()
    cases = [
        (dict(tokenizer__json=tok[:1000]), ("tokenizer.json", "corrupt", "re-download")),
        (dict(tokenizer__json="{}"), ("tokenizer.json", "corrupt")),
        (dict(tokenizer_config__json="{"), ("tokenizer_config.json is not valid JSON",)),
        (dict(generation_config__json="[]"), ("generation_config.json does not hold a JSON object",)),
        (dict(generation_config__json=json.dumps({"eos_token_id": "<eos>"})), ("eos_token_id", "token id")),
        (dict(chat_template__jinja="{% for %}"), ("chat template does not parse",)),
        (dict(chat_template__jinja="{{ messages[5].content }}"), ("chat template fails on these messages", "--raw")),
        (dict(chat_template__jinja="{{ raise_exception('system messages only') }}"),
         ("chat template refused the messages: system messages only",)),
        (dict(chat_template__jinja=b"\xff\xfe{{ x }}"), ("chat_template.jinja is not UTF-8",)),
    ]
    for i, (files, fragments) in enumerate(cases):
        assert_user_error(generate(variant(tmp_path, tiny, f"m{i}", **files)), *fragments)


def test_tokenizer_of_another_model(tmp_path, tiny):
    """A vocabulary larger than the embedding is refused at load; an added token beyond it (ids the
    embedding lacks) is refused when a prompt produces it, instead of an IndexError in the model."""
    small = save_with_tokenizer(tiny_hf_model(vocab=512, seed=1), tmp_path / "small", tiny)
    assert_user_error(generate(small), "49,152 tokens but the model embeds only 512", "tokenizer")

    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({**{f"w{i}": i for i in range(500)}, "[UNK]": 500}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.add_special_tokens([f"<x{i}>" for i in range(12)])  # ids 501..512; the model embeds 0..511
    (small / "tokenizer.json").unlink()
    words.save(str(small / "tokenizer.json"))
    assert generate(small, "--raw", prompt="w1 w2 <x10>").exit_code == 0
    assert_user_error(generate(small, "--raw", prompt="w1 w2 <x11>"), "token id 512", "embeds only 512")


# ---- GGUF and model paths --------------------------------------------------------------------------

def _gguf(path: Path, arch: str, tensors: dict[str, np.ndarray], **fields) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    for key, value in fields.items():
        w.add_uint32(key.replace("__", "."), value)
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_damaged_gguf(tmp_path, monkeypatch):
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))
    embd = {"token_embd.weight": np.zeros((16, 8), np.float32)}
    (tmp_path / "empty.gguf").write_bytes(b"")
    (tmp_path / "garbage.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "v99.gguf").write_bytes(b"GGUF" + (99).to_bytes(4, "little") + bytes(16))
    (tmp_path / "noarch.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(16))
    cases = {
        "empty.gguf": ("corrupt or truncated", "download it again"),
        "garbage.gguf": ("GGUF magic invalid", "corrupt"),
        "v99.gguf": ("version 99", "corrupt"),
        "noarch.gguf": ("names no architecture",),
        _gguf(tmp_path / "fields.gguf", "llama", embd).name: ("lacks llama.attention.head_count", "incomplete"),
        _gguf(tmp_path / "odd.gguf", "llama", {"weird.weight": np.zeros((4, 4), np.float32)},
              llama__attention__head_count=1, llama__embedding_length=8, llama__feed_forward_length=8, llama__block_count=1, llama__context_length=64,
              llama__attention__layer_norm_rms_epsilon=1).name: ("unexpected tensor weird.weight", "llama and qwen2"),
        _gguf(tmp_path / "gpt2.gguf", "gpt2", embd).name: ("unsupported GGUF architecture 'gpt2'", "llama, qwen2"),
    }
    for name, fragments in cases.items():
        assert_user_error(run("generate", "hi", "--model", str(tmp_path / name)), name, *fragments)
    assert not any((tmp_path / "cache").iterdir())  # no half-written conversion is left behind

    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "empty.gguf"))  # a file, not a directory
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "garbage.gguf")),
                      "cannot create the conversion cache", "KVRETRIEVE_CACHE")


def test_model_path_is_not_a_checkpoint(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00")
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "weights.bin")), "not a .gguf file")
    (tmp_path / "two").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / name).write_bytes(b"")
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "two")), "2 .gguf files", "pass one of them")


# ---- documents, prompts and stdin ------------------------------------------------------------------

def test_more_document_problems(tmp_path, tiny):
    (tmp_path / "zero.txt").write_bytes(b"")
    (tmp_path / "utf16.txt").write_bytes("The keeper lit the lamp.".encode("utf-16"))
    os.mkfifo(tmp_path / "fifo")
    cases = {tmp_path / "zero.txt": ("empty",), tmp_path / "utf16.txt": ("UTF-16", "iconv -f utf-16"),
             tmp_path / "fifo": ("not a regular file",), Path("/dev/null"): ("not a regular file",)}
    for path, fragments in cases.items():
        assert_user_error(run("chat", "-d", str(path), "--model", str(tiny), *TINY_OPTS, input="hi\n"),
                          str(path), *fragments)


def test_stdin_not_utf8(tiny):
    assert_user_error(generate(tiny, prompt="-", input=b"caf\xe9 au lait"), "stdin is not UTF-8", "iconv")
    assert_user_error(run("chat", "--model", str(tiny), *TINY_OPTS, input=b"caf\xe9?\n"), "stdin is not UTF-8")


def test_prompt_or_turn_longer_than_context(tiny):
    assert_user_error(generate(tiny, "--raw", "--max-context", "64", prompt="-", input="word " * 100),
                      "context holds 64", "--max-context")
    result = run("chat", "-d", str(DOC), "--model", str(tiny), *TINY_OPTS, "--max-context", "400",
                 input="Who kept the lighthouse?\n" + "word " * 200 + "\n")
    assert_user_error(result, "this turn needs", "context holds 400", "/reset", "--max-context")


# ---- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragments", [
    (["--retrieval", "lowrank", "--window", "-1"], ("--window must be >= 0",)),
    (["--retrieval", "lowrank", "--sink", "-1"], ("--sink must be >= 0",)),
    (["--retrieval", "lowrank", "--budget", "0"], ("--budget (0) must be at least one block",)),
    (["--retrieval", "bounds", "--block-size", "12"], ("--block-size must be a power of two",)),
    (["--retrieval", "lowrank", "--rank", "0"], ("--rank must be >= 1",)),
    (["--retrieval", "lowrank", "--reselect-every", "0"], ("--reselect-every must be >= 1",)),
    (["--retrieval", "lowrank", "--rank", "64"], ("--rank 64 is above the model's head_dim 16", "rank <= 16")),
    (["--retrieval", "lowrank", "--rank", "8", "--rest-rank", "64"], ("--rest-rank 64 is above the model's head_dim 16",)),
    (["--retrieval", "ivf", "--rest-rank", "8"], ("--rest-rank (8) estimates the rest from a lowrank index",)),
    (["--retrieval", "lowrank", "--rank", "8", "--budget", "64", "--block-size", "16", "--cache-blocks", "2"],
     ("--cache-blocks (2) must hold at least the budget (4 blocks)",)),
    (["--max-context", "0"], ("--max-context must be >= 16",)),
    (["--max-context", "20M"], ("--max-context must be >= 16 and <= 16,777,216 tokens", "float32")),
    (["--max-new-tokens", "-1"], ("--max-new-tokens must be >= 0",)),
    (["--top-p", "0"], ("--top-p must be in (0, 1]",)),
    (["--top-k", "-1"], ("--top-k must be >= 0",)),
    (["--temperature", "inf"], ("--temperature must be >= 0 (0 = greedy) and finite",)),
    (["--stop", ""], ("stop strings must be non-empty",)),
    (["--device", "tpu"], ("device must be auto, cpu, cuda or cuda:N",)),
    (["--device", "cuda:x"], ("device must be auto, cpu, cuda or cuda:N",)),
    (["--gpu-mem-gb", "0"], ("--gpu-mem-gb must be > 0",)),
    (["--gpu-mem-gb", "-2"], ("--gpu-mem-gb must be > 0",)),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_invalid_option_values(tiny, args, fragments):
    assert_user_error(generate(tiny, *args), *fragments)


def test_the_rest_rank_default_and_flag_reach_the_backend(tiny):
    """--rest-rank left out keeps the layout's default (token by token, rank 16, for lowrank up to 40K);
    --rest-rank 0 asks for the per-block estimate; the attention line says which ran."""
    default = generate(tiny, "--retrieval", "lowrank", "--rank", "8")
    per_block = generate(tiny, "--retrieval", "lowrank", "--rank", "8", "--rest-rank", "0")
    assert default.exit_code == 0 and per_block.exit_code == 0, (default.output, per_block.output)
    assert "the rest estimated token by token (value sketches of rank 16)" in default.stderr, default.stderr
    assert "the rest estimated" in per_block.stderr and "token by token" not in per_block.stderr


def test_usage_errors_exit_2_without_traceback(tiny):
    for args, fragment in [(["--retrieval", "faiss"], "'faiss' is not one of"),
                           (["--budget", "inf"], "not a token count"), (["--max-context", "nan"], "not a token count")]:
        result = generate(tiny, *args)
        assert result.exit_code == 2 and fragment in result.output and "Traceback" not in result.output, result.output


def test_profile_option_values(tiny):
    base = ["profile", "--model", str(tiny), "--context", "64", "--decode-steps", "1", "--rank", "8"]
    assert_user_error(run(*base, "--prefill-chunk", "0"), "--prefill-chunk must be >= 16")
    assert_user_error(run(*base, "--gpu-mem-gb", "-1"), "--gpu-mem-gb must be > 0")
    assert_user_error(run(*base, "--device", "tpu"), "device must be auto")
    assert_user_error(run(*base, "--shape", "llama3-1b"), "not both")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_numbered_cuda_device_without_gpu(tiny):
    assert_user_error(generate(tiny, "--device", "cuda:1"), "asked for a GPU", "--device cpu")


# ---- memory ----------------------------------------------------------------------------------------

def test_gpu_cap_smaller_than_the_weights_is_refused_before_loading(smol_dir):
    """check_weights_fit runs before any weight is read (load_model's `check`); it only does arithmetic,
    so the GPU branch is exercised here without a GPU."""
    cfg = ModelConfig.from_hf(read_hf_config(smol_dir))  # 135M parameters: 0.25 GiB in bf16
    cuda = torch.device("cuda")
    with pytest.raises(ResourceError, match=r"the weights alone need 0\.\d GiB, more than gpu_mem_gb=0\.1"):
        check_weights_fit(cfg, cuda, torch.bfloat16, 0.1)
    with pytest.raises(ResourceError, match="dense KV cache of 1,000,000 tokens.*use retrieval"):
        check_weights_fit(cfg, cuda, torch.bfloat16, 2.0, kv_tokens=1_000_000)
    check_weights_fit(cfg, cuda, torch.bfloat16, 2.0, kv_tokens=8192)  # fits
    check_weights_fit(cfg, cuda, torch.bfloat16, None, kv_tokens=10**9)  # no cap, no check


@pytest.mark.cuda
def test_gpu_cap_smaller_than_the_weights_cli(smol_dir):
    assert_user_error(run("generate", "hi", "--model", str(smol_dir), "--device", "cuda", "--gpu-mem-gb", "0.1"),
                      "weights alone need", "--gpu-mem-gb 0.1")


def test_not_enough_ram_for_the_context(tmp_path, tiny):
    """KVRETRIEVE_FREE_RAM_GB=0.03: 27.6 MiB may be allocated at once. The tiny model's weights (24.2 MiB)
    fit, with the dense KV cache of 4K tokens (1 MiB) too, but not with that of 32K tokens (8 MiB); this
    is said before any weight is read (a corrupt weights file is never opened). With retrieval the CPU
    store grows with the prompt and refuses a 57K-token one (4 segments of 8 MiB) before allocating."""
    env = {"KVRETRIEVE_FREE_RAM_GB": "0.03"}
    assert generate(tiny, env=env).exit_code == 0
    assert_user_error(generate(tiny, "--max-context", "32K", "--retrieval", "off", env=env), "not enough CPU RAM",
                      "KV cache of 32,768 tokens", "--max-context", "use retrieval")
    broken = variant(tmp_path, tiny, model__safetensors=b"\x00" * 64)
    assert_user_error(generate(broken, "--max-context", "32K", "--retrieval", "off", env=env), "not enough CPU RAM")
    auto = generate(tiny, "--max-context", "32K", env=env)  # the default, auto: what does not fit dense is retrieved
    assert auto.exit_code == 0 and "attention: retrieval" in auto.stderr and "does not fit" in auto.stderr, auto.stderr
    long_prompt = " ".join(f"w{i % 500}" for i in range(15_000))
    result = generate(tiny, "--raw", "--max-context", "64K", "--retrieval", "bounds", "--store", "ram", prompt="-",
                      input=long_prompt, env=env)
    assert_user_error(result, "not enough CPU RAM", "KVRETRIEVE_FREE_RAM_GB", "--store disk")
    # left to auto, a store that does not fit the free RAM goes to disk (memory-mapped files), and runs
    on_disk = generate(tiny, "--raw", "--max-context", "64K", "--retrieval", "bounds", prompt="-", input=long_prompt,
                       env=env)
    assert on_disk.exit_code == 0 and "CPU store on disk" in on_disk.stderr, on_disk.stderr


# ---- Ctrl-C ----------------------------------------------------------------------------------------

class Pump:
    """Collects what a file descriptor delivers, on a thread; wait() polls a predicate over the text."""

    def __init__(self, fd: int):
        self.fd, self.data = fd, b""
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while True:
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # the pty's other side is gone
                return
            if not chunk:
                return
            self.data += chunk

    @property
    def text(self) -> str:
        return self.data.decode(errors="replace")

    def wait(self, predicate, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while not predicate(self.text):
            if time.monotonic() > end:
                raise AssertionError(f"timed out; last output: {self.text[-500:]!r}")
            time.sleep(0.01)


def chat_command(model: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "kvretrieve", "chat", "-d", str(DOC), "--model", str(model), "--device", "cpu",
            "--dtype", "float32", *extra]


def assert_process_tree_gone(proc: subprocess.Popen, children: list[psutil.Process]) -> None:
    assert all(not c.is_running() or c.status() == psutil.STATUS_ZOMBIE for c in children)
    with pytest.raises(ProcessLookupError):  # start_new_session: its process group is its own
        os.killpg(proc.pid, 0)


def send(fd: int, text: str) -> None:
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]


@pytest.mark.parametrize("mode", [["--max-new-tokens", "80"],
                                  ["--max-new-tokens", "16", "--retrieval", "lowrank", "--rank", "8", "--budget", "64",
                                   "--window", "32"]], ids=["dense", "retrieval"])
def test_ctrl_c_in_chat_returns_to_the_prompt_with_the_conversation_intact(tiny, mode):
    """In a terminal: Ctrl-C while an answer streams, then while a long question prefills, then a
    question too long for the context: each time the prompt comes back, and the answers that follow are
    byte for byte those of a fresh session that was asked only the completed questions (greedy fp32).
    Ctrl-D then exits 0 and leaves no process behind."""
    cmd = chat_command(tiny, "--max-context", "16K", *mode)
    fresh = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=REPO)
    fresh.stdin.write(b"Who kept the light?\nWhy?\n")  # the questions the session below completes
    fresh.stdin.close()
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[3] &= ~(termios.ECHO | termios.ICANON)  # raw lines: a question may exceed the 4 KiB line limit
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=slave, cwd=REPO, start_new_session=True)
    try:
        out, term = Pump(proc.stdout.fileno()), Pump(master)
        prompts = lambda n: lambda t: t.count(">>> ") >= n  # noqa: E731
        out.wait(prompts(1))
        children = psutil.Process(proc.pid).children(recursive=True)

        send(master, "Tell me a story.\n")  # 1: interrupted while the answer streams
        out.wait(lambda t: len(t.split(">>> ")[-1]) >= 8)
        proc.send_signal(signal.SIGINT)
        term.wait(lambda t: t.count("[answer interrupted]") == 1)
        out.wait(prompts(2))

        send(master, "Who kept the light?\n")  # 2: answered
        out.wait(prompts(3))

        words = ["lamp", "tower", "storm", "keeper", "ship", "rock", "wave", "light", "night", "harbour"]
        long_question = 10_000  # the prefill must outlast a layer
        send(master, "Describe " + " ".join(words[i % 7] for i in range(long_question)) + "\n")  # 3: cut in prefill
        term.wait(lambda t: "prefill [" in t.split("[answer interrupted]")[-1])  # the first of two layers is done
        proc.send_signal(signal.SIGINT)
        term.wait(lambda t: t.count("[answer interrupted]") == 2)
        out.wait(prompts(4))
        prefill = term.text.split("[answer interrupted]")[-2]
        assert "100%" not in prefill  # it stopped inside the prefill (the engine rolls the pass back)
        assert out.text.split(">>> ")[3] == ""

        send(master, "Describe " + " ".join(words[i % 9] for i in range(20_000)) + "\n")  # 4: too long
        term.wait(lambda t: "error: this turn needs" in t)
        out.wait(prompts(5))

        attrs[3] |= termios.ICANON  # back to lines; the read after this one sees Ctrl-D as end of input
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        send(master, "Why?\n")  # 5: answered
        out.wait(prompts(6))
        send(master, "\x04")
        assert proc.wait(60) == 0
        assert "Traceback" not in term.text
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(slave)
        os.close(master)
    assert fresh.wait(300) == 0
    expected = fresh.stdout.read()
    answers = out.data.split(b">>> ")
    assert answers[2] + answers[5] == expected and len(answers[2]) > 20 and len(answers[5]) > 20
    assert_process_tree_gone(proc, children)


def test_ctrl_c_while_documents_prefill_exits_cleanly(tmp_path, tiny):
    """Questions piped in, documents still prefilling: Ctrl-C ends the run (exit 130, one line, no
    traceback) and no process is left."""
    doc = tmp_path / "long.txt"
    doc.write_text(" ".join(["lamp", "tower", "storm", "keeper", "ship"][i % 5] for i in range(12_000)))
    master, slave = pty.openpty()  # stderr is a terminal, so the prefill progress bar shows each layer
    cmd = chat_command(tiny, "-d", str(doc), "--max-context", "16K")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave, cwd=REPO,
                            start_new_session=True)
    try:
        term = Pump(master)
        proc.stdin.write(b"Who kept the light?\n")
        proc.stdin.flush()
        term.wait(lambda t: "prefill [" in t)
        children = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
        term.wait(lambda t: "interrupted" in t)
        assert "100%" not in term.text and "Traceback" not in term.text
        assert proc.stdout.read() == b""
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(slave)
        os.close(master)
    assert_process_tree_gone(proc, children)


# ---- a forward pass cut short leaves the cache as it was --------------------------------------------------

def _session(model: Path, retrieval, interrupt: bool, long_prompt: int, steps: int = 8) -> list[torch.Tensor]:
    """Prefill a document, then (optionally cut short after its first layer, as Ctrl-C would) a long
    continuation, then a short question in its place and a few decode steps: the logits."""
    llm = kvretrieve.load(model, device="cpu", dtype="float32", max_context=4096, retrieval=retrieval)
    g = torch.Generator().manual_seed(0)
    doc, question = torch.randint(0, 49152, (300,), generator=g).tolist(), [11, 12, 13, 14]
    llm.prefill(doc)

    def stop_after_first_layer(layer):
        if layer == 0 and interrupt:
            raise KeyboardInterrupt

    if long_prompt:
        longer = doc + torch.randint(0, 49152, (long_prompt,), generator=g).tolist()
        if interrupt:
            with pytest.raises(KeyboardInterrupt):  # the staged Ctrl-C must really cut the prefill short
                llm.prefill(longer, stop_after_first_layer)
            assert llm.engine.length == len(doc)  # and the pass was rolled back
        else:
            llm.prefill(longer)
    out = [llm.prefill(doc + question)]
    for t in range(steps):
        out.append(llm.engine.step(torch.tensor(100 + t)))
    return out


@pytest.mark.parametrize("kind", ["off", "lowrank"])
def test_prefill_cut_short_leaves_the_cache_as_it_was(tiny, kind):
    """The engine's promise (engine/engine.py): a forward pass that does not finish leaves the cache as
    it was before, so what follows matches a session where it never ran."""
    retrieval = None if kind == "off" else RetrievalConfig(index=kind, rank=8, budget_tokens=64, window_tokens=32)
    for a, b in zip(_session(tiny, retrieval, True, 1000), _session(tiny, retrieval, False, 0)):
        assert torch.equal(a, b)



class _InterruptAt:
    """A trace function that sends this process SIGINT at the n-th line kvretrieve executes, as Ctrl-C
    would; the handler runs at once, in the main thread. n=None only counts."""

    def __init__(self, n: int | None):
        self.n, self.count, self.where = n, 0, None

    def __call__(self, frame, event, arg):
        if "kvretrieve" not in frame.f_code.co_filename:
            return None
        if event == "line":
            self.count += 1
            if self.count == self.n:
                self.where = (frame.f_code.co_filename.split("kvretrieve")[-1], frame.f_code.co_name)
                sys.settrace(None)
                signal.raise_signal(signal.SIGINT)
        return self

    def run(self, fn):
        sys.settrace(self)
        try:
            return fn()
        finally:
            sys.settrace(None)


@pytest.mark.parametrize("kind", ["off", "lowrank", "ivf"])
@pytest.mark.parametrize("pass_", ["decode", "prefill"])
def test_ctrl_c_at_any_line_of_a_forward_pass_is_rolled_back(tiny, kind, pass_):
    """A decode step or a continuation prefill cut short anywhere, its commit included, leaves a cache
    whose next passes give the logits of a session never interrupted. The decode step completes a
    block, so its commit stores that block; the steps after it retrieve from a cache that the cut-short
    lookups touched. A cut after the commit (on the way out of the engine) keeps the tokens: the caller
    never saw them and truncates them away (as LLM does with its token list)."""
    retrieval = None if kind == "off" else RetrievalConfig(index=kind, block_size=8, rank=8, budget_tokens=32,
                                                           window_tokens=32, cluster_tokens=512)
    g = torch.Generator().manual_seed(1)
    doc = torch.randint(0, 49152, (8 * 80 - 1,), generator=g).tolist()
    # ivf: a continuation long enough that its layers cluster a segment (cluster_tokens) before they store it
    more = [0] if pass_ == "decode" else torch.randint(0, 49152, (600 if kind == "ivf" else 40,), generator=g).tolist()
    tokens = [torch.tensor(t) for t in (101, 102, 103)]

    def session():
        llm = kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=4096, retrieval=retrieval)
        llm.prefill(doc)
        return llm.engine

    def run(engine):  # the pass under test, then decode steps after it
        first = engine.step(tokens[0]) if pass_ == "decode" else engine.prefill(more)
        return [first] + [engine.step(t) for t in tokens[1:]]

    ref = run(session())
    engine, n, cut = session(), 0, _InterruptAt(0)
    stride = 1 if pass_ == "decode" and kind != "off" else 7
    while cut.count >= cut.n:  # until a pass runs to its end uncut: every line (every stride-th) was cut
        n += stride
        cut = _InterruptAt(n)
        try:
            cut.run(lambda: engine.step(tokens[0]) if pass_ == "decode" else engine.prefill(more))
        except KeyboardInterrupt:
            kept = engine.length == len(doc) + len(more) and cut.where[0].endswith("engine.py")
            assert engine.length == len(doc) or kept, cut.where
        engine.truncate(len(doc))
        for got, expected in zip(run(engine), ref):
            assert torch.equal(got, expected), f"cut at line event {n} in {cut.where}"
        engine.truncate(len(doc))
    assert n > 100


@pytest.mark.parametrize("ahead", [False, True])
def test_ctrl_c_at_any_line_of_a_streamed_answer_leaves_the_next_answer_as_fresh(tiny, ahead):
    """LLM keeps its token list in step with the cache whatever line a Ctrl-C lands on (inside the
    engine, sampling, detokenizing, or between updating the list and the cache): the next prompt,
    which shares a prefix with the cut one, is answered as in a fresh session. ahead: the engine
    launches each step before the host reads its token (the CUDA default), as on a GPU."""
    retrieval = RetrievalConfig(index="lowrank", block_size=8, rank=8, budget_tokens=32, window_tokens=32)
    doc = DOC.read_text()[:600]
    first, second = doc + "\nWho kept the lamp?", doc + "\nWhy?"

    def fresh():
        llm = kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=4096, retrieval=retrieval)
        llm.engine.ahead = ahead
        return llm

    def stream(llm, prompt):
        return list(llm.stream(prompt, max_new_tokens=8))

    expected = stream(fresh(), second)
    # Every 34th line, the two variants offset by 17 (their line sequences differ only in the order
    # of step and read): together every 17th line, at half the time each.
    llm, n, cut = fresh(), 17 if ahead else 0, _InterruptAt(0)
    while cut.count >= cut.n:
        n += 34
        cut = _InterruptAt(n)
        try:
            cut.run(lambda: stream(llm, first))
        except KeyboardInterrupt:
            pass
        assert stream(llm, second) == expected, f"cut at line event {n} in {cut.where}"
    assert n > 200


class _Watching(_InterruptAt):
    """_InterruptAt that also notes the line events (their counts) inside files ending with `watch`."""

    def __init__(self, n: int | None, watch: str):
        super().__init__(n)
        self.watch, self.seen = watch, []

    def __call__(self, frame, event, arg):
        if event == "line" and frame.f_code.co_filename.endswith(self.watch):
            self.seen.append(self.count + 1)
        return super().__call__(frame, event, arg)


@pytest.mark.parametrize("ahead", [False, True])
def test_ctrl_c_at_any_line_of_taking_the_turn_never_leaves_it_taken(tiny, ahead):
    """A Ctrl-C at any line of kvretrieve/turns.py (or the line after) while a stream() takes or gives back
    the LLM's turn: another thread still gets the turn. On Python 3.11 a cut at a `try:` or at a `with`'s
    exit skips the code that gives a lock back; such a cut once hung the suite (the test above, whose
    every-34th-line cuts moved onto one when code elsewhere changed)."""
    retrieval = RetrievalConfig(index="lowrank", block_size=8, rank=8, budget_tokens=32, window_tokens=32)
    llm = kvretrieve.load(tiny, device="cpu", dtype="float32", max_context=4096, retrieval=retrieval)
    llm.engine.ahead = ahead

    def stream():
        return list(llm.stream(DOC.read_text()[:300] + "\nWho kept the lamp?", max_new_tokens=3))

    count = _Watching(None, "turns.py")
    count.run(stream)
    assert len(count.seen) >= 6
    for n in sorted({m + d for m in count.seen for d in (0, 1)}):
        cut = _InterruptAt(n)
        try:
            cut.run(stream)
        except KeyboardInterrupt:
            pass
        taken = []

        def take():
            with llm._turn("another thread"):
                taken.append(True)

        other = threading.Thread(target=take, daemon=True)
        other.start()
        other.join(10)
        assert taken, f"the turn stayed taken after a cut at line event {n} in {cut.where}"


def test_interrupts_deferred_holds_ctrl_c_until_the_block_ends():
    from kvretrieve.engine.interrupts import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append("after the signal")
    assert done == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_deferred():  # no signal, nothing raised
        done.append("quiet")
    seen = []
    thread = threading.Thread(target=lambda: seen.append(interrupts_deferred().__enter__() is None))
    thread.start()
    thread.join()
    assert seen == [True]  # off the main thread it holds nothing (and does not fail)
