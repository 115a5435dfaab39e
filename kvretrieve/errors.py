"""Errors a user can fix. The CLI prints their message on one line (no traceback) and exits 1.

Every message names the problem and the fix. Anything else that escapes is a bug in kvretrieve
and is reported as such (with the traceback under --debug).
"""


class KVRetrieveError(Exception):
    """Base class: something about the user's input, files or machine, with a fix to suggest."""


class ConfigError(KVRetrieveError, ValueError):
    """An invalid configuration value (RetrievalConfig, RuntimeConfig, SamplingParams)."""


class ModelLoadError(KVRetrieveError):
    """A model path, checkpoint file, config.json or tokenizer that cannot be used."""


class InputError(KVRetrieveError, ValueError):
    """A prompt, document or message list that cannot be run."""


class ResourceError(KVRetrieveError):
    """Not enough memory (CPU RAM, GPU) or a missing device for what was asked."""


class NumericsError(KVRetrieveError):
    """A forward pass produced NaN or infinite values: damaged weights, or activations that overflow
    the dtype's range (float16)."""


class LoadWarning(UserWarning):
    """A doubtful but usable model setting (a value assumed, a context past the trained length). Given
    a log callback, kvretrieve.load sends these to it instead."""


class BusyError(KVRetrieveError, RuntimeError):
    """A call on an LLM that the same thread is still using (an unfinished stream() generator): it
    cannot wait for itself."""


class SavedPrefillError(KVRetrieveError):
    """A saved prefill that cannot be reopened: missing, damaged, from another format version, or made
    for another model, tokenizer, dtype or KV layout."""
