"""Command line: `kvretrieve generate`, `kvretrieve chat`, `kvretrieve prefill` and `kvretrieve cache`
(saved prefills), `kvretrieve serve` and `kvretrieve profile`.

User errors (KVRetrieveError) print one line and exit 1; usage errors exit 2; Ctrl-C exits 130; a
reader that goes away (`| head`) ends the run quietly with exit 0. Anything else is a bug: one line
asking for --debug, which shows the traceback. Nothing imported here imports torch: --help answers
at once, and a command pays for torch only when it runs.
"""
from __future__ import annotations

import os
import sys
import traceback

import click

from .. import __version__
from ..errors import InputError, KVRetrieveError
from .chat import chat
from ..models.tokenizer import check_utf8
from .options import (as_flags, debug_enabled, format_stats, load_from_options, model_options,
                      require_stdin, require_stdout, retrieval_options, sampling_from_options, sampling_options,
                      set_debug)
from .profile import profile
from .saved import cache, prefill
from .serve import serve


class Cli(click.Group):
    """Turns exceptions into one-line messages and exit codes, for the console script and CliRunner alike."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.ClickException, click.exceptions.Abort):
            raise
        except KVRetrieveError as e:
            if debug_enabled(ctx):
                traceback.print_exc()
            click.echo(f"error: {as_flags(str(e))}", err=True)
            ctx.exit(1)
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader took what it wanted (`| head -c 20`): no error, as for cat or grep. stdout goes
            # to /dev/null so that Python's flush of it at exit does not fail again ("Exception ignored").
            _stdout_to_devnull()
            ctx.exit(0)
        except Exception as e:  # a bug, not a user error
            if debug_enabled(ctx):
                traceback.print_exc()
            else:
                click.echo(f"internal error: {type(e).__name__}: {e} (run again with --debug for the traceback)",
                           err=True)
            ctx.exit(1)


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # no stdout, or one without a descriptor (CliRunner's)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


@click.group(cls=Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="kvretrieve")
@click.option("--debug", is_flag=True, expose_value=False, is_eager=True, callback=set_debug, help="Show tracebacks.")
def cli():
    """kvretrieve: long-context LLM inference with the KV cache in CPU memory.

    \b
    kvretrieve generate "Why is the sky blue?"
    kvretrieve chat --document notes.txt          (ask questions about a document)
    kvretrieve prefill -d book.txt -o book.kvr    (prefill once; then: kvretrieve chat --resume book.kvr)
    kvretrieve serve --port 8000                  (an OpenAI-compatible server)
    kvretrieve profile --shape llama3-8b --context 32K,128K --retrieval lowrank
    """


@cli.command()
@click.argument("prompt")
@model_options
@retrieval_options
@sampling_options(1.0, "Off by default here: a greedy answer stays the model's own (exact, reproducible, the "
                       "same as transformers' and llama.cpp's); chat turns it on.")
@click.option("--raw", is_flag=True, help="Send PROMPT as is, without the model's chat template.")
@click.option("--system", default=None, help="System message (chat template only).")
@click.option("--stats", is_flag=True, help="Print timings to stderr at the end.")
def generate(prompt, raw, system, stats, **opts):
    """Answer PROMPT (or '-' to read it from stdin), streaming the text."""
    require_stdout()
    if prompt == "-":
        require_stdin("prompt", "pipe one in (`echo Why? | kvretrieve generate -`) or pass it as the argument")
        try:
            prompt = sys.stdin.read()
        except UnicodeDecodeError as e:
            raise InputError(f"the prompt on stdin is not UTF-8 text (invalid byte {e.object[e.start:e.start + 1]!r}); "
                             "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    check_utf8(prompt, "the prompt")
    if system is not None:
        check_utf8(system, "the --system message")
    if not prompt.strip():
        raise InputError("the prompt is empty; pass some text, or '-' to read it from stdin")
    sampling = sampling_from_options(opts)
    llm = load_from_options(opts)
    if not raw and llm.tokenizer.chat_template:
        prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    for piece in llm.stream(prompt, sampling=sampling):
        click.echo(piece, nl=False)
        sys.stdout.flush()
    click.echo()
    if stats:
        click.echo(format_stats(llm), err=True)


cli.add_command(chat)
cli.add_command(prefill)
cli.add_command(cache)
cli.add_command(serve)
cli.add_command(profile)


def main() -> None:
    cli(prog_name="kvretrieve")


if __name__ == "__main__":
    main()
