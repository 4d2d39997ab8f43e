"""safetensors files written by streaming the tensors' memory to the file.

safetensors' own `save_file` first copies every tensor into one Python bytes object; for the
hundreds of MiB of a snapshot that copy is most of the write, and it keeps the interpreter
busy while the engine's tick wants it. This writer lays out the same format (an 8-byte
little-endian header length, a JSON header of dtype, shape and byte offsets padded to 8
bytes, then the tensors' bytes in order) and writes the bytes with numpy's `tofile`, which
releases the interpreter while they go out. Tensors that lie end to end in memory (the
views of a snapshot's one host buffer, in file order) go out in one write: each write
takes the interpreter back from the tick's thread once, so a thousand small writes would
cost the tick far more than their bytes. Files are read back with safetensors'
`load_file`, which checks the layout.

With `direct` (the snapshot writer's host state: views of one page-aligned pinned buffer),
the header is padded with spaces to a whole page and the tensors' bytes go out with
O_DIRECT wherever memory and file offset are page-aligned: the disk's DMA reads the buffer,
and no CPU copies hundreds of MiB into the page cache beside the engine's CPU-bound tick.
What is not aligned (a run's last partial page, a run after it, a file system without
O_DIRECT such as tmpfs) is written as before.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}


ALIGN = 4096  # what O_DIRECT asks of memory addresses, file offsets and lengths


def save(tensors: dict[str, torch.Tensor], path: Path,
         metadata: dict[str, str] | None = None, direct: bool = False) -> int:
    """Write CPU `tensors` to `path` in the safetensors format, in the dict's order; returns
    the bytes that went out with O_DIRECT (0 unless `direct`)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; write CPU tensors")
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % (ALIGN if direct else 8))
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.flush()
        fd = _open_direct(path) if direct else None
        try:
            return _write_data(f, fd, runs(tensors.values()), 8 + len(encoded))
        finally:
            if fd is not None:
                os.close(fd)


def _write_data(f, fd: int | None, groups: list[list[torch.Tensor]], offset: int) -> int:
    """Each group's bytes from file `offset` on: with O_DIRECT through `fd` where aligned,
    the rest through `f`; returns the bytes that went out with O_DIRECT."""
    sent = 0
    for run in groups:
        data = _bytes(run)
        bulk = 0 if fd is None else _aligned(data, offset)
        if bulk:
            try:
                _pwrite_all(fd, memoryview(data[:bulk].numpy()), offset)
                sent += bulk
            except OSError as e:  # alignment or memory that the file system or the
                if e.errno not in (errno.EINVAL, errno.EFAULT):  # driver refuses
                    raise
                fd, bulk = None, 0  # (closed by save)
        if bulk < data.numel():
            f.seek(offset + bulk)
            data[bulk:].numpy().tofile(f)
        offset += data.numel()
    return sent


def _open_direct(path: Path) -> int | None:
    """A second descriptor on the file being written, with O_DIRECT; None where the
    platform or the file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError as e:
        if e.errno == errno.EINVAL:
            return None
        raise


def _aligned(data: torch.Tensor, offset: int) -> int:
    """How many leading bytes of `data` can go to file `offset` with O_DIRECT."""
    if data.data_ptr() % ALIGN or offset % ALIGN:
        return 0
    return data.numel() // ALIGN * ALIGN


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def runs(tensors: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`tensors` (made contiguous, empty ones left out) in groups that lie end to end in
    one storage, in order: each group is one write. Two tensors of separate storages are
    never grouped, even where the allocator happened to put them side by side."""
    groups: list[list[torch.Tensor]] = []
    end, storage = -1, -1
    for tensor in tensors:
        tensor = tensor.contiguous()
        if tensor.nbytes == 0:
            continue
        here = tensor.untyped_storage().data_ptr()
        if tensor.data_ptr() == end and here == storage:
            groups[-1].append(tensor)
        else:
            groups.append([tensor])
        end, storage = tensor.data_ptr() + tensor.nbytes, here
    return groups


def _bytes(run: list[torch.Tensor]) -> torch.Tensor:
    """The memory of `run` (contiguous tensors end to end) as one uint8 tensor."""
    first = run[0]
    if len(run) == 1:
        return first.view(torch.uint8).reshape(-1) if first.dim() else \
            first.reshape(1).view(torch.uint8)
    size = sum(t.nbytes for t in run)
    return torch.empty(0, dtype=torch.uint8).set_(
        first.untyped_storage(), first.storage_offset() * first.element_size(), (size,))
