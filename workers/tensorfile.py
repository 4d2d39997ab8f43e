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
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save(tensors: dict[str, torch.Tensor], path: Path,
         metadata: dict[str, str] | None = None) -> None:
    """Write CPU `tensors` to `path` in the safetensors format, in the dict's order."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; write CPU tensors")
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.flush()
        for run in runs(tensors.values()):
            _bytes(run).numpy().tofile(f)


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
