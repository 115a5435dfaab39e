"""Hardening round 2: the edges of the CLI (closed or broken pipes, bytes that are not UTF-8, values
out of range, --help without torch) and the sampler's (tiny temperatures, the repetition penalty).

Stream cases run the real CLI as a process (`python -m kvretrieve`), since CliRunner replaces the
streams they are about; the others go through CliRunner or the library.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys

import click
import pytest
import torch

from kvretrieve.cli import cli
from kvretrieve.config import SamplingParams
from kvretrieve.engine.sampling import Sampler, apply_repeat_penalty, sample
from kvretrieve.errors import ConfigError
from test_cli import FAST, REPO, assert_user_error, run

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
KV = f"{sys.executable} -m kvretrieve"


def shell(command: str, input: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], input=input, capture_output=True, env=ENV, timeout=300)


def assert_process_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1 and "Traceback" not in err and "internal error" not in err, (proc.returncode, err)
    (line,) = [line for line in err.splitlines() if line.startswith("error: ")]
    for fragment in fragments:
        assert fragment in line, line


# ---- the sampler -----------------------------------------------------------------------------------

def reference_penalty(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    out = logits.clone()
    for t in set(recent):
        out[t] = out[t] / penalty if out[t] > 0 else out[t] * penalty
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("penalty", [0.7, 1.1, 2.0])
def test_repeat_penalty_matches_reference(seed, penalty):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, generator=g) * 4
    recent = torch.randint(0, 60, (40,), generator=g)  # duplicates, and logits of both signs
    expected = reference_penalty(logits, recent.tolist(), penalty)
    assert torch.equal(apply_repeat_penalty(logits, recent, penalty), expected)
    greedy = SamplingParams(repeat_penalty=penalty)
    assert int(sample(logits, greedy, None, recent)) == int(expected.argmax())
    # Sampled: the same draw as sampling the reference's logits without a penalty, from the same seed.
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=seed, repeat_penalty=penalty,
                            repeat_last_n=40)
    plain = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, seed=seed)
    drawn = Sampler(params, torch.device("cpu"), recent.tolist())(logits)
    assert int(drawn) == int(Sampler(plain, torch.device("cpu"))(expected))


def test_sampler_remembers_the_last_n_tokens():
    params = SamplingParams(repeat_penalty=1.5, repeat_last_n=4)
    sampler = Sampler(params, torch.device("cpu"), [5, 6, 7, 8, 9, 10])
    assert sampler.recent.tolist() == [7, 8, 9, 10]
    for best in (3, 7):  # 7 is penalized, but still the best
        logits = torch.zeros(12)
        logits[best] = 5.0
        sampler(logits)
    assert sampler.recent.tolist() == [9, 10, 3, 7]
    assert Sampler(SamplingParams(), torch.device("cpu"), [1, 2]).recent is None  # off: nothing kept


@pytest.mark.parametrize("temperature", [9e-6, 1e-40, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy(temperature):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1000, generator=g) * 10
        params = SamplingParams(temperature=temperature, seed=1)
        assert int(Sampler(params, torch.device("cpu"))(logits)) == int(logits.argmax())


def test_tiny_temperature_answers_like_greedy(smol, smol_dir):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    greedy = smol.generate(question, max_new_tokens=8)
    assert "Paris" in greedy
    for temperature in (1e-40, 1e-300):
        assert smol.generate(question, max_new_tokens=8, temperature=temperature) == greedy
    result = run("generate", question[0]["content"], "--model", str(smol_dir), "--max-new-tokens", "8",
                 "--temperature", "1e-300", *FAST)
    assert result.exit_code == 0 and "Paris" in result.stdout, result.output


def test_seed_range():
    SamplingParams(seed=0)
    SamplingParams(seed=2**64 - 1)
    for bad in (2**64, -1, 10**23):
        with pytest.raises(ConfigError, match=r"seed must be an integer from 0 to 2\*\*64 - 1"):
            SamplingParams(seed=bad)


def repeated_ngrams(text: str, n: int = 4) -> int:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams))


def test_chat_default_repeat_penalty_breaks_a_loop(smol_dir):
    """Greedy, the default model repeats a line of its poem over and over; chat's default penalty
    (1.1 over 64 tokens) makes it write on."""
    poem = ["chat", "--model", str(smol_dir), "--max-new-tokens", "56", *FAST]
    looping = run(*poem, "--repeat-penalty", "1", input="Write a poem about the sea.\n")
    default = run(*poem, input="Write a poem about the sea.\n")
    assert looping.exit_code == 0 and default.exit_code == 0, (looping.output, default.output)
    assert repeated_ngrams(looping.stdout) >= 8, looping.stdout
    assert repeated_ngrams(default.stdout) <= repeated_ngrams(looping.stdout) // 3, default.stdout


# ---- options: checked before the model loads, in range, described ----------------------------------

BAD_SAMPLING = [("--top-p", "7", "--top-p must be in (0, 1]"), ("--temperature", "nan", "--temperature must be"),
                ("--top-k", "-1", "--top-k must be"), ("--max-new-tokens", "-2", "--max-new-tokens must be"),
                ("--seed", "100000000000000000000000", "--seed must be an integer from 0 to 2**64 - 1"),
                ("--repeat-penalty", "0", "--repeat-penalty must be > 0"),
                ("--repeat-last-n", "-1", "--repeat-last-n must be >= 0")]


@pytest.mark.parametrize("command", ["generate", "chat"])
@pytest.mark.parametrize("flag,value,message", BAD_SAMPLING)
def test_sampling_options_checked_before_the_model_loads(tmp_path, command, flag, value, message):
    """The model path does not exist: loading it first would report that instead."""
    args = [command, "--model", str(tmp_path / "nope"), flag, value] + (["hi"] if command == "generate" else [])
    assert_user_error(run(*args, input="hi\n"), message)


def test_every_option_is_described():
    def commands(group: click.Group):
        yield "kvretrieve", group
        yield from group.commands.items()

    for name, command in commands(cli):
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"kvretrieve {name}: {param.opts} has no help"


HELP_RUN = """
import sys
from kvretrieve.cli import cli
for args in (["--help"], ["--version"], ["generate", "--help"], ["chat", "--help"], ["profile", "--help"]):
    try:
        cli(args, prog_name="kvretrieve")
    except SystemExit as e:
        assert e.code == 0, (args, e.code)
print("TORCH" if "torch" in sys.modules else "NO TORCH")
"""


def test_help_does_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", HELP_RUN], capture_output=True, text=True, env=ENV, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("Usage: kvretrieve") == 4 and proc.stdout.strip().endswith("NO TORCH"), proc.stdout


# ---- streams: closed, broken, not UTF-8 -------------------------------------------------------------

def test_reader_that_goes_away_ends_the_run_quietly(smol_dir):
    """`kvretrieve generate ... | head -c 20`: exit 0 and not a word on stderr about the pipe."""
    proc = subprocess.Popen([*KV.split(), "generate", "Tell me a long story about a dragon.", "--model", str(smol_dir),
                             "--max-new-tokens", "200", *FAST], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ENV)
    assert len(proc.stdout.read(20)) == 20
    proc.stdout.close()  # what head does after 20 bytes; the answer is far from done
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert [line for line in err.splitlines() if not line.startswith("attention:")] == [], err


@pytest.mark.parametrize("command,fragment", [
    ("generate hi --model {nope} >&-", "stdout is closed (>&-), so the output has nowhere to go; redirect it"),
    ("chat --model {nope} >&-", "stdout is closed"),
    ("profile --shape smollm2-135m --context 64 --decode-steps 1 >&-", "stdout is closed"),
    ("generate - --model {nope} <&-", "stdin is closed (<&-), so there is no prompt to read; pipe one in"),
    ("chat --model {nope} <&-", "stdin is closed (<&-), so there is no question to read")])
def test_closed_streams(tmp_path, command, fragment):
    """Checked before the model loads: {nope} does not exist."""
    assert_process_error(shell(f"{KV} " + command.format(nope=tmp_path / "nope")), fragment)


def test_prompt_bytes_that_are_not_utf8(tmp_path):
    nope = ["--model", str(tmp_path / "nope")]
    for args, stdin in (([b"generate", b"caf\xe9"], None), ([b"generate", b"-"], b"caf\xe9 au lait"),
                        ([b"generate", b"hi", b"--system", b"\xff"], None), ([b"chat", b"--system", b"\xff"], b"")):
        proc = subprocess.run([*KV.encode().split(), *args, *map(str.encode, nope)], input=stdin, capture_output=True,
                              env=ENV, timeout=120)
        assert_process_error(proc, "is not UTF-8 text (invalid byte b'\\x", "convert it to UTF-8")


def test_chat_question_bytes_that_are_not_utf8(smol_dir):
    proc = subprocess.run([*KV.split(), "chat", "--model", str(smol_dir), "--max-new-tokens", "4", *FAST],
                          input=b"caf\xe9?\n", capture_output=True, env=ENV, timeout=300)
    assert_process_error(proc, "a question is not UTF-8 text (invalid byte b'\\xe9' at character 3)")
