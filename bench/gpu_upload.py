"""Bring a verified evaluation GGUF (bench/eval_models.py) to the GPU machine, part by part.

That machine receives only files inside the repository working tree, at most 64 MiB a call with the
tracked tree itself (~4.5 MiB) and the `carry` list, and keeps ignored files between calls while it
stays warm. So the file is cut here into 56 MiB parts in the ignored folder .eval_models/, one part
travels per call, and every call runs `join`, which checks the parts that have arrived and, once all
are there, reassembles the file, verifies its sha256 and deletes the parts.

The exact sequence, for the 1.5B (20 parts; the 0.5B has 9), all calls on one warm machine:

    here:  python bench/gpu_upload.py split 1.5b                      # prints the carry list of every call
           python bench/longctx_corpus.py .eval_models/corpus.json   # the corpus the GPU run reads
    GPU:   run(command="python bench/gpu_upload.py join 1.5b",
               carry=[".eval_models/1.5b/manifest.json", ".eval_models/1.5b/part-00"])
           run(command="python bench/gpu_upload.py join 1.5b", carry=[".eval_models/1.5b/part-01"])
           ... one call per part ...
           run(command="KVRETRIEVE_CACHE=$PWD/.eval_models/cache python bench/gpu_upload.py join 1.5b --convert",
               carry=[".eval_models/1.5b/part-19", ".eval_models/corpus.json"])   # -> verified, converted once
           run(command="KVRETRIEVE_CACHE=$PWD/.eval_models/cache <what `python bench/common.py tree` prints> "
                       "python bench/longctx.py --corpus .eval_models/corpus.json --lengths 8K,16K")
           # the results come back from $OUT: copy longctx.json/.md into bench/results/ here, then
           run(command="... the same ... --lengths 32K --configs default --merge bench/results/longctx.json")
           ... and the same with --configs oracle

A machine that went cold in between has lost the parts: `join` lists what is missing.

The GPU copy of the tree holds a `.git` that may name an older commit: run benchmarks there with
`GIT_DIR=/nonexistent` plus KVRETRIEVE_COMMIT / KVRETRIEVE_TREE, so the tree hash proves the commit.
Never move or delete that `.git`: twice the call after one that did broke the machine (and lost the
uploaded parts). fp32 on the GPU is no shortcut to a precise reference: a 32K fp32 prefill of the 1.5B
did not finish in 380 s.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_models  # noqa: E402

FOLDER = eval_models.REPO / ".eval_models"
# bytes: a part plus the tracked tree, the manifest (or the 2.5 MB corpus with the short last part) and
# the small scripts of a call fit its 64 MiB (60 MiB parts stopped fitting once the tree passed 4 MiB)
PART = 56 << 20


def split(name: str) -> list[Path]:
    """Cut the verified file into FOLDER/name/part-NN and write manifest.json (sizes and sha256 of
    the parts and of the whole)."""
    m, src = eval_models.spec(name), eval_models.fetch(name)
    out = FOLDER / name
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    with src.open("rb") as f:
        while chunk := f.read(PART):
            path = out / f"part-{len(parts):02d}"
            path.write_bytes(chunk)
            parts.append({"name": path.name, "size": len(chunk), "sha256": hashlib.sha256(chunk).hexdigest()})
    manifest = {"model": name, "filename": m.filename, "size": m.size, "sha256": m.sha256, "parts": parts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return [out / p["name"] for p in parts]


def join(name: str) -> Path | None:
    """Reassemble FOLDER/<filename> when every part has arrived; None (and what is missing) otherwise."""
    m, folder = eval_models.spec(name), FOLDER / name
    dest = FOLDER / m.filename
    if eval_models.is_verified(dest, m):
        return dest
    manifest = folder / "manifest.json"
    if not manifest.is_file():
        raise eval_models.VerifyError(f"{manifest} is missing: carry it with the first part")
    parts = json.loads(manifest.read_text())["parts"]
    missing = [p["name"] for p in parts if not (folder / p["name"]).is_file()]
    if missing:
        print(f"{len(parts) - len(missing)}/{len(parts)} parts here; missing: {' '.join(missing)}")
        return None
    tmp = dest.with_name(dest.name + ".partial")
    with tmp.open("wb") as out:
        for p in parts:
            data = (folder / p["name"]).read_bytes()
            if (len(data), hashlib.sha256(data).hexdigest()) != (p["size"], p["sha256"]):
                (folder / p["name"]).unlink()
                raise eval_models.VerifyError(f"{p['name']} is damaged (deleted): carry it again")
            out.write(data)
    if (tmp.stat().st_size, eval_models.sha256_of(tmp)) != (m.size, m.sha256):
        tmp.unlink()
        raise eval_models.VerifyError(f"the reassembled file does not have sha256 {m.sha256}; deleted")
    tmp.replace(dest)
    eval_models.is_verified(dest, m)  # stamp the final name
    for p in parts:
        (folder / p["name"]).unlink()
    return dest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["split", "join"])
    ap.add_argument("name", choices=sorted(eval_models.MODELS))
    ap.add_argument("--convert", action="store_true",
                    help="join: load the model once on the CPU, so the GGUF conversion is cached ($KVRETRIEVE_CACHE)")
    args = ap.parse_args(argv)
    try:
        if args.action == "split":
            parts = split(args.name)
            rel = [p.relative_to(eval_models.REPO).as_posix() for p in parts]
            manifest = (FOLDER / args.name / "manifest.json").relative_to(eval_models.REPO).as_posix()
            for i, r in enumerate(rel):
                print(f"call {i + 1}/{len(rel)}: carry={json.dumps(([manifest] if i == 0 else []) + [r])}")
            return 0
        path = join(args.name)
    except eval_models.VerifyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if path is not None:
        print(f"verified {path}")
        if args.convert:
            import kvretrieve
            kvretrieve.load(str(path), device="cpu", dtype="float32", max_context=64, log=print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
