"""index_dtype_is_wide: int64 index math in the interpreter or past 2**31 elements, int32 otherwise."""
import torch

from minidu.kernels import utils


def test_index_width(monkeypatch):
    small, edge = torch.empty(2**31 - 1, dtype=torch.uint8, device="meta"), torch.empty(2**31, device="meta")
    monkeypatch.setattr(utils, "INTERPRET", False)
    assert not utils.index_dtype_is_wide(small, small)
    assert utils.index_dtype_is_wide(small, edge)
    monkeypatch.setattr(utils, "INTERPRET", True)
    assert utils.index_dtype_is_wide(small)
