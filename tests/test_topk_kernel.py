"""topk_indices: the radix-select Triton kernel (kernels/topk.py) against torch.topk, under
TRITON_INTERPRET=1 in a subprocess on CPU and natively on CUDA; its reference; input checks; and
top_blocks, which the decode step selects with."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import run_interpreted
from kvretrieve.kernels import reference as ref


# (rows, n, k, what the scores look like): one slice and several, uneven last slices, k at the
# slice limit, ties, masked (-inf) candidates as the decode step passes them, negative scores.
CASES = [(3, 100, 7, "randn"), (8, 2048, 128, "randn"), (8, 8704, 128, "masked"), (2, 5000, 1024, "randn"),
         (3, 4100, 64, "ties"), (1, 40, 40, "negative"), (2, 3000, 0, "randn"), (8, 33000, 128, "masked")]
KNOBS = ((None, True), (4096, True), (None, False))  # topk_indices' slice_len and stop_at_k


def scores_for(h: int, n: int, kind: str, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 7 + h)
    s = torch.randn(h, n, generator=g)
    if kind == "ties":
        s = torch.randint(0, 5, (h, n), generator=g).float()  # hundreds of equal scores at the k-th
    elif kind == "negative":
        s = -s.abs() - 1
    elif kind == "masked":
        s[:, :3] = float("-inf")          # sinks
        s[:, -300:] = float("-inf")       # window and beyond the context
        s[0, ::5] = float("-inf")
    return s.to(device)


def check_against_topk(scores: torch.Tensor, k: int, got: torch.Tensor) -> None:
    """A valid top k: right shape and dtype, distinct indices in range, and the values they pick are
    the k largest (with ties, which indices is free)."""
    assert got.shape == (scores.shape[0], k) and got.dtype == torch.long
    want = torch.topk(scores, k, dim=1).values
    for row, s, w in zip(got.cpu(), scores.cpu(), want.cpu()):
        assert len(set(row.tolist())) == k and (row >= 0).all() and (row < scores.shape[1]).all()
        assert torch.equal(s[row].sort(descending=True).values, w)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-{c[3]}")
def test_reference_is_a_top_k(case):
    h, n, k, kind = case
    s = scores_for(h, n, kind)
    check_against_topk(s, k, ref.topk_indices(s, k))


def test_column_slice_of_the_scores_is_accepted():
    s = scores_for(4, 3000, "randn")
    check_against_topk(s[:, 17:2900], 50, ref.topk_indices(s[:, 17:2900], 50))


@pytest.mark.parametrize("args,fragment", [((torch.zeros(2, 8, dtype=torch.float16), 2), "float32"),
                                           ((torch.zeros(8), 2), "float32 \\[H, n\\]"),
                                           ((torch.zeros(2, 8), 9), "k must be"),
                                           ((torch.zeros(2, 8), -1), "k must be"),
                                           ((torch.zeros(8, 2).t(), 1), "contiguous")])
def test_bad_input_is_refused_with_the_problem_named(args, fragment):
    with pytest.raises(ValueError, match=fragment):
        ref.topk_indices(*args)


def interp_main() -> None:
    """In the TRITON_INTERPRET=1 subprocess: one JSON line, per case the kernel's indices."""
    from kvretrieve.kernels import topk

    out = {}
    for h, n, k, kind in CASES:
        for width, stop in KNOBS:
            if 2 * k <= topk.TOPK_SLICE:
                got = topk.topk_indices(scores_for(h, n, kind), k, width, stop_at_k=stop)
                out[f"{h}-{n}-{k}-{kind}-{width}{stop}"] = got.tolist()
    print("RESULTS " + json.dumps(out))


@pytest.fixture(scope="module")
def interp_results():
    return run_interpreted("test_topk_kernel")


def test_triton_interpreter_gives_a_top_k(interp_results):
    assert len(interp_results) == len(KNOBS) * sum(2 * k <= 2048 for _, _, k, _ in CASES)
    for name, got in interp_results.items():
        h, n, k, kind, _ = name.split("-")
        check_against_topk(scores_for(int(h), int(n), kind), int(k), torch.tensor(got, dtype=torch.long).view(int(h), int(k)))


@pytest.mark.cuda
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-k{c[2]}-{c[3]}")
def test_cuda_dispatch_gives_a_top_k(case):
    from kvretrieve import kernels
    from kvretrieve.kernels import topk

    h, n, k, kind = case
    s = scores_for(h, n, kind, "cuda")
    check_against_topk(s, k, kernels.topk_indices(s, k))
    for width, stop in KNOBS:
        if 2 * k <= topk.TOPK_SLICE:
            check_against_topk(s, k, topk.topk_indices(s, k, width, stop_at_k=stop))


@pytest.mark.parametrize("ranked", [False, True])
def test_top_blocks_picks_the_best_blocks_in_order_when_ranked(ranked):
    from kvretrieve.index.base import top_blocks

    s = scores_for(3, 5000, "masked")
    got = top_blocks(s, 100, ranked)
    check_against_topk(s, 100, got)
    if ranked:
        assert torch.equal(got, torch.topk(s, 100, dim=1).indices)
