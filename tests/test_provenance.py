"""Benchmark provenance (bench/common.py): results trace to committed code, also from a copy without git
(the GPU machine), and merged results keep every run's record."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402

PROBE = "import sys; sys.path.insert(0, 'bench'); import common; print(common.source_commit())"


def copy_without_git(dest: Path) -> Path:
    for d in ("kvretrieve", "bench"):
        shutil.copytree(REPO / d, dest / d, ignore=shutil.ignore_patterns("results", "__pycache__"))
    shutil.copy(REPO / "pyproject.toml", dest / "pyproject.toml")
    return dest


def commit_in(root: Path, **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVRETRIEVE_")}
    return subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True,
                          env=clean | {"GIT_CEILING_DIRECTORIES": str(root.parent)} | env)


def test_a_copy_without_git_names_its_commit_only_with_the_matching_tree_hash(tmp_path):
    copy = copy_without_git(tmp_path / "copy")
    tree = common.tree_hash(copy)
    assert tree == common.tree_hash(copy_without_git(tmp_path / "again"))  # by relative path and content
    ok = commit_in(copy, KVRETRIEVE_COMMIT="abc1234", KVRETRIEVE_TREE=tree)
    assert ok.returncode == 0 and ok.stdout.strip() == "abc1234"
    (copy / "kvretrieve" / "config.py").write_text((copy / "kvretrieve" / "config.py").read_text() + "\n# edit\n")
    changed = commit_in(copy, KVRETRIEVE_COMMIT="abc1234", KVRETRIEVE_TREE=tree)
    assert changed.returncode != 0 and "KVRETRIEVE_TREE" in changed.stderr and "Traceback" not in changed.stderr
    marked = commit_in(copy, KVRETRIEVE_COMMIT="abc1234", KVRETRIEVE_ALLOW_DIRTY="1")
    assert marked.returncode == 0 and marked.stdout.strip() == "abc1234+unverified"
    assert commit_in(copy).returncode != 0  # no commit named at all


def test_keep_runs_keeps_the_runs_rows_come_from():
    a = {"command": "a", "commit": "c1", "date": "d1", "device": "x"}
    b = {"command": "b", "commit": "c2", "date": "d2", "device": "x"}
    rows = common.stamp([{"k": 1}], a) + common.stamp([{"k": 2}], b)
    merged = common.keep_runs(a | {"runs": [a]}, b, rows)
    assert [r["command"] for r in merged["runs"]] == ["a", "b"]
    assert [r["command"] for r in common.keep_runs(merged, b, rows[1:])["runs"]] == ["b"]  # a's rows all replaced
    legacy = [{"k": 0}] + rows[1:]  # a row from before per-row ids: every earlier run stays
    assert [r["command"] for r in common.keep_runs(merged, b, legacy)["runs"]] == ["a", "b"]
