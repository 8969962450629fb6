"""Device run lengths + pycocotools compression equal pycocotools.mask.encode exactly."""

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from labelmill.teachers.rle import class_rles, run_starts, runs_to_counts


def reference(label_map: np.ndarray, k: int) -> bytes:
    return mask_utils.encode(np.asfortranarray((label_map == k).astype(np.uint8)))["counts"]


def encode_batch(maps: list[np.ndarray], classes: int) -> list[list[bytes]]:
    flat = torch.cat([torch.from_numpy(m).T.flatten() for m in maps])
    starts, values = run_starts(flat, [m.size for m in maps])
    starts, values = starts.numpy(), values.numpy()
    out, offset = [], 0
    for m in maps:
        lo, hi = np.searchsorted(starts, [offset, offset + m.size])
        out.append(class_rles(starts[lo:hi] - offset, values[lo:hi], m.shape, list(range(classes))))
        offset += m.size
    return out


def test_random_maps_of_odd_sizes_in_one_batch():
    rng = np.random.default_rng(0)
    maps = []
    for h, w in [(1, 1), (1, 7), (7, 1), (3, 5), (17, 13), (64, 33), (5, 4)]:
        blocky = rng.integers(0, 4, (h // 2 + 1, w // 3 + 1)).repeat(2, 0).repeat(3, 1)[:h, :w]
        maps += [rng.integers(0, 4, (h, w)), np.ascontiguousarray(blocky)]
    for m, got in zip(maps, encode_batch(maps, 5)):  # class 4 never occurs: an empty mask
        assert got == [reference(m, k) for k in range(5)], m.shape


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (9, 4)])
def test_edge_cases(shape):
    n = shape[0] * shape[1]
    full = np.zeros(shape, np.int64)
    single_first, single_last, single_mid = full.copy(), full.copy(), full.copy()
    single_first[0, 0] = 1
    single_last[-1, -1] = 1
    single_mid[shape[0] // 2, shape[1] // 2] = 1
    cases = [full, single_first, single_last, single_mid, 1 - single_mid]
    for m, got in zip(cases, encode_batch(cases, 3)):
        assert got == [reference(m, k) for k in range(3)]
    assert runs_to_counts(np.array([], int), np.array([], int), n) == [n]  # empty mask
    assert runs_to_counts(np.array([0]), np.array([n]), n) == [0, n]  # full mask
