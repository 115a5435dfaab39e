"""The CLI through click's CliRunner, one real run of the installed console script, and bad input:
every user mistake gives one line naming problem and fix, a non-zero exit code and no traceback."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from kvretrieve import __version__
from kvretrieve.cli import cli
from kvretrieve.models.loader import default_model_path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "examples" / "lighthouse.txt"
FAST = ["--dtype", "float32", "--device", "cpu"]


def run(*args, input=None):
    return CliRunner().invoke(cli, list(args), input=input)


def assert_user_error(result, *fragments):
    err = result.stderr
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert "Traceback" not in result.output and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version_and_help():
    assert run("--version").output.strip().endswith(__version__)
    for cmd in ([], ["generate"], ["chat"], ["profile"]):
        result = run(*cmd, "--help")
        assert result.exit_code == 0 and "Usage:" in result.output


def test_generate_answers(smol_dir):
    result = run("generate", "What is the capital of France?", "--model", str(smol_dir), "--max-new-tokens", "20",
                 *FAST, "--stats")
    assert result.exit_code == 0, result.output
    assert "Paris" in result.stdout and "ms/token" in result.stderr


def test_generate_reads_stdin(smol_dir):
    result = run("generate", "-", "--model", str(smol_dir), "--max-new-tokens", "20", *FAST,
                 input="What is the capital of France?")
    assert result.exit_code == 0 and "Paris" in result.stdout


def test_chat_over_document_with_piped_questions(smol_dir):
    questions = "Who was the first keeper of the lighthouse?\n/stats\nIn which year was the lighthouse first lit?\n"
    result = run("chat", "--document", str(DOC), "--model", str(smol_dir), "--max-new-tokens", "40", *FAST,
                 input=questions)
    assert result.exit_code == 0, result.output
    assert "Ellory" in result.stdout and "1871" in result.stdout
    assert "prefill:" in result.stderr and "reused" in result.stderr
    # how attention runs, said once at load and again by /stats: the default, auto, is dense at this size
    assert result.stderr.count("attention: dense: the KV cache of") == 2, result.stderr


def test_installed_console_script(smol_dir):
    script = shutil.which("kvretrieve", path=str(Path(sys.executable).parent))
    assert script, "the kvretrieve console script is not installed next to this Python"
    proc = subprocess.run([script, "chat", "-d", str(DOC), "--model", str(smol_dir), "--max-new-tokens", "30", *FAST],
                          input="Who was the first keeper of the lighthouse?\n", capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Ellory" in proc.stdout


# ---- bad input -------------------------------------------------------------------------------------

def test_missing_model_path(tmp_path):
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "nope")), "does not exist")


def test_directory_without_checkpoint(tmp_path):
    assert_user_error(run("generate", "hi", "--model", str(tmp_path)), "no config.json")


def test_unknown_architecture(tmp_path, smol_dir):
    shutil.copytree(smol_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "m")), "unsupported architecture GPT2LMHeadModel")


def test_config_missing_field(tmp_path, smol_dir):
    shutil.copytree(smol_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "m")), "num_hidden_layers")


@pytest.mark.parametrize("keep", [100, 1_000_000])
def test_truncated_safetensors(tmp_path, smol_dir, keep):
    shutil.copytree(smol_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp_path / "m" / "model.safetensors").write_bytes((smol_dir / "model.safetensors").open("rb").read(keep))
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "m")), "model.safetensors", "re-download")


@pytest.mark.parametrize("keep", [7, 1000, 50_000_000])
def test_truncated_gguf(tmp_path, monkeypatch, keep):
    monkeypatch.setenv("KVRETRIEVE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(default_model_path().open("rb").read(keep))
    assert_user_error(run("generate", "hi", "--model", str(bad)), "broken.gguf", "corrupt")
    assert not any((tmp_path / "cache").iterdir())  # no half-written cache entry is left behind


def test_missing_tokenizer(tmp_path, smol_dir):
    shutil.copytree(smol_dir, tmp_path / "m", ignore=shutil.ignore_patterns("tokenizer.json"))
    assert_user_error(run("generate", "hi", "--model", str(tmp_path / "m")), "missing tokenizer")


def test_document_problems(tmp_path, smol_dir):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "binary.txt").write_bytes(b"\x7fELF\x00\x00\x01")
    (tmp_path / "empty.txt").write_text("  \n")
    cases = {str(tmp_path / "missing.txt"): "does not exist", str(tmp_path / "latin1.txt"): "not UTF-8",
             str(tmp_path / "binary.txt"): "binary", str(tmp_path / "empty.txt"): "empty", str(tmp_path): "not a regular"}
    for path, fragment in cases.items():
        assert_user_error(run("chat", "--document", path, "--model", str(smol_dir), input="hi\n"), fragment)


def test_prompt_longer_than_max_context(smol_dir):
    assert_user_error(run("generate", "word " * 300, "--model", str(smol_dir), "--max-context", "128", *FAST),
                      "context holds 128", "--max-context")
    assert_user_error(run("chat", "-d", str(DOC), "--model", str(smol_dir), "--max-context", "64", *FAST,
                          input="hi\n"), "documents take", "--max-context")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu(smol_dir):
    assert_user_error(run("generate", "hi", "--model", str(smol_dir), "--device", "cuda"), "GPU", "--device cpu")


def test_bad_option_values(smol_dir):
    assert_user_error(run("generate", "hi", "--model", str(smol_dir), "--temperature", "-1"), "temperature")
    assert_user_error(run("generate", "hi", "--model", str(smol_dir), "--retrieval", "lowrank", "--budget", "8",
                          "--block-size", "16"), "--budget (8) must be at least one block")
    result = run("generate", "hi", "--max-context", "lots")
    assert result.exit_code == 2 and "not a token count" in result.output
    result = run("profile", "--shape", "smollm2-135m", "--context", "4K,20M")
    assert result.exit_code == 2 and "16 to 16,777,216 tokens" in result.output, result.output


def test_debug_shows_traceback(tmp_path):
    result = run("--debug", "generate", "hi", "--model", str(tmp_path / "nope"))
    assert result.exit_code == 1 and "Traceback" in result.stderr


def test_profile_shape_and_model(smol_dir):
    common = ["profile", "--shape", "smollm2-135m", "--decode-steps", "3", "--device", "cpu", "--dtype", "float32",
              "--json"]
    result = run(*common, "--context", "256")  # the default, auto: dense while the KV fits, and it says so
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)
    assert row["index"] == "dense" and "fits" in row["attention"] and row["cache_hit"] is None
    result = run(*common, "--context", "256,1K", "--retrieval", "lowrank", "--budget", "128", "--window", "64",
                 "--sink", "16")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["context"] for r in rows] == [256, 1024] and all(r["decode_ms_p50"] > 0 for r in rows)
    assert all(r["index"] == "lowrank" for r in rows)
    assert rows[1]["cache_hit"] is not None and rows[1]["h2d_mb_per_token"] is not None
    table = run("profile", "--model", str(smol_dir), "--context", "300", "--decode-steps", "2", "--retrieval", "off",
                "--dtype", "float32")
    assert table.exit_code == 0 and "decode ms p50" in table.stdout
    # the mean beside the median: rare slow steps (a graph capture every few tokens) show only there
    assert [h.strip() for h in table.stdout.splitlines()[0].split("|")][9:11] == ["p90", "mean"]
    assert table.stdout.splitlines()[2].split("|")[2].strip() == "300"  # the context column
    assert_user_error(run("profile", "--shape", "gpt5"), "unknown shape")


def test_cache_blocks_flag_sizes_the_block_cache():
    """--cache-blocks reaches the GPU block pool: with more slots the same decode finds more of its
    blocks cached and copies fewer bytes (random weights select afresh each step, so the pool's size
    shows)."""
    common = ["profile", "--shape", "smollm2-135m", "--context", "512", "--decode-steps", "4", "--device", "cpu",
              "--dtype", "float32", "--json", "--retrieval", "lowrank", "--budget", "64", "--window", "32",
              "--sink", "16", "--block-size", "16"]
    rows = {}
    for slots in ("4", "32"):  # the budget's 4 blocks; the whole 512-token context
        result = run(*common, "--cache-blocks", slots)
        assert result.exit_code == 0, result.output
        (rows[slots],) = json.loads(result.stdout)
    assert rows["32"]["cache_hit"] > rows["4"]["cache_hit"]
    assert rows["32"]["h2d_mb_per_token"] < rows["4"]["h2d_mb_per_token"]


def test_chat_with_retrieval(smol_dir):
    result = run("chat", "-d", str(DOC), "--model", str(smol_dir), "--max-new-tokens", "30", *FAST,
                 "--retrieval", "lowrank", "--budget", "64", "--window", "64", "--sink", "16",
                 input="Who was the first keeper of the lighthouse?\n")
    assert result.exit_code == 0, result.output
    assert "Ellory" in result.stdout


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = next(line for line in ci.splitlines() if "pytest" in line)
    assert command in readme


def test_library_parameter_names_become_flags():
    """The library names Python parameters; the CLI prints them as flags (values unquoted), leaving
    plain words and parameters without a flag alone."""
    from kvretrieve.cli.options import as_flags

    assert as_flags("lower max_context or RetrievalConfig.rank") == "lower --max-context or --rank"
    assert as_flags("more than gpu_mem_gb=0.1; raise") == "more than --gpu-mem-gb 0.1; raise"
    assert as_flags("use device='cpu'") == "use --device cpu"
    assert as_flags("the model's dtype on this device") == "the model's dtype on this device"
    assert as_flags("budget_tokens (8) must be") == "--budget (8) must be"
    assert as_flags("lower RetrievalConfig.cache_blocks") == "lower --cache-blocks"
    assert as_flags("lower RetrievalConfig.estimate_tokens") == "lower RetrievalConfig.estimate_tokens"


def test_profile_prompts_are_real_text_from_a_seeded_start(smol_dir):
    """Real-weights benchmarks read real text; sessions side by side (bench/batch_decode.py) each start
    elsewhere in it, so their selections differ as real sessions' would."""
    import pydoc_data.topics as topics

    from kvretrieve.cli.profile import prompt_ids
    from kvretrieve.models.tokenizer import Tokenizer

    tok = Tokenizer(smol_dir, json.loads((smol_dir / "config.json").read_text()))
    text = tok.encode("\n\n".join(topics.topics.values()))
    cpu = torch.device("cpu")
    first, other = (prompt_ids(tok, 3000, 0, cpu, seed).tolist() for seed in (0, 1))
    assert first == text[:3000] and len(other) == 3000 and other != first
    ring = text + text  # the seeded prompt is the text read on from somewhere else in it, wrapping around
    starts = [p for p in range(1, len(text)) if ring[p] == other[0] and ring[p:p + 3000] == other]
    assert starts
    wrapped = prompt_ids(tok, len(text) + 10, 0, cpu, 0).tolist()  # longer than the text: it wraps around
    assert wrapped[len(text):] == text[:10]
    random_ids = prompt_ids(None, 64, 1000, cpu, 3)
    assert random_ids.shape == (64,) and int(random_ids.max()) < 1000
