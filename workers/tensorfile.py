"""safetensors files written by streaming each tensor's bytes to the file.

safetensors' own `save_file` first copies every tensor into one Python bytes object; for the
hundreds of MiB of a snapshot that copy is most of the write, and it keeps the interpreter
busy while the engine's tick wants it. This writer lays out the same format (an 8-byte
little-endian header length, a JSON header of dtype, shape and byte offsets padded to 8
bytes, then the tensors' bytes in order) and writes each tensor with numpy's `tofile`, which
releases the interpreter while the bytes go out. Files are read back with safetensors'
`load_file`, which checks the layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8",
           torch.bool: "BOOL"}


def save(tensors: dict[str, torch.Tensor], path: Path,
         metadata: dict[str, str] | None = None) -> None:
    """Write CPU `tensors` to `path` in the safetensors format."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset, parts = 0, []
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu":
            raise ValueError(f"tensor {name!r} is on {tensor.device}; write CPU tensors")
        data = tensor.contiguous().view(torch.uint8).reshape(-1)  # any dtype, as bytes
        header[name] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + data.numel()]}
        offset += data.numel()
        parts.append(data)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        f.flush()
        for data in parts:
            if data.numel():
                data.numpy().tofile(f)
