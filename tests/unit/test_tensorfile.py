"""workers/tensorfile.py writes what safetensors reads, and writes a packed state (views of
one buffer, in file order) in one piece."""

from __future__ import annotations

import mmap
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from workers import tensorfile
from workers.checkpoints import TrainingState
from workers.model import AdapterSpec
from workers.training.optimizer import AdamState


def test_mixed_tensors_read_back_equal(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(6, dtype=torch.int64),
               "c": torch.randn(2, 3).to(torch.bfloat16), "empty": torch.zeros(0, 5),
               "scalar": torch.tensor(2.5), "strided": torch.randn(4, 6)[:, ::2]}
    tensorfile.save(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    back = load_file(str(tmp_path / "x.safetensors"))
    assert set(back) == set(tensors)
    for name, tensor in tensors.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_views_of_one_buffer_in_order_are_one_write():
    flat = torch.arange(30, dtype=torch.float32)
    a, b, c = flat[:6].view(2, 3), flat[6:18].view(3, 4), flat[18:]
    assert [len(g) for g in tensorfile.runs([a, b, c])] == [3]
    assert [len(g) for g in tensorfile.runs([a, c, b])] == [1, 1, 1]
    assert [len(g) for g in tensorfile.runs([a, torch.zeros(0), b, torch.ones(2)])] == [2, 1]


def test_a_packed_state_is_two_writes_and_reads_back(tmp_path):
    """A snapshot's host state: the weights in one write, the AdamW moments in one more
    (plus the step's 8 bytes), whatever the number of tensors."""
    weights = {f"w{i}": torch.randn(4, 3) for i in range(5)}
    adam = AdamState(7, [torch.randn(4, 3) for _ in range(5)],
                     [torch.rand(4, 3) for _ in range(5)])
    state = TrainingState(weights, AdapterSpec(rank=4, alpha=8.0), adam, "tiny")
    packed = state.over(torch.cat([t.reshape(-1) for t in state.ordered()]))
    assert [len(g) for g in tensorfile.runs(packed.tensors.values())] == [5]
    assert [len(g) for g in tensorfile.runs(packed.optimizer.to_tensors().values())] == [10, 1]
    tensorfile.save(packed.optimizer.to_tensors(), tmp_path / "opt.safetensors")
    back = AdamState.from_tensors(load_file(str(tmp_path / "opt.safetensors")))
    assert back.step == 7
    for got, want in zip(back.exp_avg + back.exp_avg_sq, adam.exp_avg + adam.exp_avg_sq,
                         strict=True):
        assert torch.equal(got, want)


def test_neighbours_in_separate_storages_are_separate_writes(tmp_path):
    """Two tensors that lie side by side in memory but in storages of their own (as the
    allocator may place a model's small weights) are written one by one: one write over
    both would read past the first's storage."""
    flat = torch.arange(12, dtype=torch.float32)
    a = torch.empty(0).set_(flat.untyped_storage()[:24], 0, (6,))
    b = torch.empty(0).set_(flat.untyped_storage()[24:], 0, (6,))
    assert b.data_ptr() == a.data_ptr() + a.nbytes
    assert [len(g) for g in tensorfile.runs([a, b])] == [1, 1]
    tensorfile.save({"a": a, "b": b}, tmp_path / "x.safetensors")
    back = load_file(str(tmp_path / "x.safetensors"))
    assert torch.equal(back["a"], flat[:6]) and torch.equal(back["b"], flat[6:])


def page_aligned(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` at the start of fresh anonymous pages (as a pinned buffer is)."""
    raw = torch.frombuffer(mmap.mmap(-1, max(1, tensor.nbytes)), dtype=torch.uint8)
    out = raw[: tensor.nbytes].view(tensor.dtype).view(tensor.shape)
    out.copy_(tensor)
    return out


def test_a_direct_write_reads_back_equal_and_goes_out_by_dma_where_aligned(tmp_path, request):
    """One packed buffer (a snapshot's host state): the header padded to a page, the
    aligned bulk with O_DIRECT, the last partial page and the unaligned step written
    buffered; safetensors reads every tensor back. On tmpfs (no O_DIRECT) or from memory
    that is not page-aligned the same file comes out of plain writes."""
    flat = page_aligned(torch.randn(3 * 1024 + 5))  # 3 pages and 20 bytes
    tensors = {"a": flat[:1024].view(32, 32), "b": flat[1024:].view(-1), "n": torch.tensor(7)}
    targets = [tmp_path / "x.safetensors"]
    if Path("/dev/shm").is_dir():
        shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
        request.addfinalizer(lambda: shutil.rmtree(shm, ignore_errors=True))
        targets.append(shm / "x.safetensors")
    for target in targets:
        sent = tensorfile.save(tensors, target, metadata={"format": "pt"}, direct=True)
        back = load_file(str(target))
        assert set(back) == set(tensors)
        for name, tensor in tensors.items():
            assert torch.equal(back[name], tensor), (target, name)
        assert sent in (0, 3 * tensorfile.ALIGN), sent  # 0: this file system has no O_DIRECT
        header = struct.unpack("<Q", target.read_bytes()[:8])[0]
        assert (8 + header) % tensorfile.ALIGN == 0
    if tensorfile._open_direct(targets[0]) is not None:  # the disk under tmp_path has it
        assert tensorfile.save(tensors, targets[0], direct=True) == 3 * tensorfile.ALIGN
    shifted = {"a": torch.randn(5000)[1:]}  # not page-aligned: written as before
    assert tensorfile.save(shifted, tmp_path / "y.safetensors", direct=True) == 0
    assert torch.equal(load_file(str(tmp_path / "y.safetensors"))["a"], shifted["a"])
