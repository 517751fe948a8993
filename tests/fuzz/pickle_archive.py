"""Reading and writing the data.pkl of a torch.jit.save archive, for the
pickled_state fuzz target: a small pickle writer that emits exactly the
opcodes TorchScript's pickler uses (protocol 2, no memo, tensors as
torch._utils._rebuild_tensor_v2 of a persistent storage record), and a
decoder built on Python's own unpickler that stands in for TorchScript's
classes, so that an archive can be inspected without torch.jit.load."""

import collections
import io
import pickle
import pickletools
import struct
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch


# ------------------------------------------------------------------ writer


class Tagged:
    """A dict or list that TorchScript's pickler wraps in
    torch.jit._pickle.restore_type_tag(value, tag)."""

    def __init__(self, value, tag: str):
        self.value, self.tag = value, tag


class ClassObject:
    """An object of a TorchScript class (a module or a custom class): pickled
    as GLOBAL qualified name, NEWOBJ, then BUILD with its state."""

    def __init__(self, qualified_name: str, state):
        self.qualified_name, self.state = qualified_name, state


class PickleWriter:
    """Writes values as TorchScript's pickler does, without a memo. Tensors
    become storage records, named by key, in ``records``."""

    def __init__(self, record_prefix: str = "fz"):
        self.out = io.BytesIO()
        self.records: Dict[str, bytes] = {}
        self._prefix = record_prefix

    def _global(self, qualified: str):
        module, _, name = qualified.rpartition(".")
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _int(self, v: int):
        if 0 <= v < 256:
            self.out.write(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            self.out.write(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            self.out.write(b"J" + struct.pack("<i", v))
        elif -(2**63) <= v < 2**63:  # as TorchScript's pickler writes an int64
            self.out.write(b"\x8a\x08" + v.to_bytes(8, "little", signed=True))
        else:  # no int64: torch's unpickler refuses it
            data = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
            self.out.write(b"\x8a" + bytes([len(data)]) + data)

    def _items(self, values):
        for v in values:
            self.value(v)

    def value(self, v):
        w = self.out.write
        if v is None:
            w(b"N")
        elif v is True:
            w(b"\x88")
        elif v is False:
            w(b"\x89")
        elif isinstance(v, int):
            self._int(v)
        elif isinstance(v, float):
            w(b"G" + struct.pack(">d", v))
        elif isinstance(v, str):
            data = v.encode("utf-8", "surrogatepass")
            w(b"X" + struct.pack("<I", len(data)) + data)
        elif isinstance(v, tuple):
            if len(v) == 0:
                w(b")")
            elif len(v) <= 3:
                self._items(v)
                w(b"\x85\x86\x87"[len(v) - 1 : len(v)])
            else:
                w(b"(")
                self._items(v)
                w(b"t")
        elif isinstance(v, list):
            w(b"]")
            if v:
                w(b"(")
                self._items(v)
                w(b"e")
        elif isinstance(v, dict):
            w(b"}")
            if v:
                w(b"(")
                for key, item in v.items():
                    self.value(key)
                    self.value(item)
                w(b"u")
        elif isinstance(v, Tagged):
            self._global("torch.jit._pickle.restore_type_tag")
            self.value(v.value)
            self.value(v.tag)
            w(b"\x86R")
        elif isinstance(v, ClassObject):
            self._global(v.qualified_name)
            w(b")\x81")
            self.value(v.state)
            w(b"b")
        elif isinstance(v, torch.Tensor):
            self._tensor(v)
        else:
            raise TypeError(f"PickleWriter: cannot write {type(v).__name__}")

    def _tensor(self, t: torch.Tensor):
        """Its whole storage as a record, then _rebuild_tensor_v2(storage,
        offset, size, stride, requires_grad, OrderedDict())."""
        storage = t.untyped_storage()
        numel = storage.nbytes() // t.element_size()
        base = torch.empty(0, dtype=t.dtype).set_(storage, 0, (numel,), (1,))
        key = f"{self._prefix}{len(self.records)}"
        self.records[key] = base.detach().view(torch.uint8).numpy().tobytes() if numel else b""
        storage_type = torch.storage._dtype_to_storage_type_map()[t.dtype]
        w = self.out.write
        self._global("torch._utils._rebuild_tensor_v2")
        w(b"((")
        self.value("storage")
        self._global("torch." + storage_type)
        self.value(key)
        self.value("cpu")
        self.value(numel)
        w(b"tQ")
        self.value(t.storage_offset())
        self.value(tuple(t.shape))
        self.value(tuple(t.stride()))
        self.value(bool(t.requires_grad))
        self._global("collections.OrderedDict")
        w(b")Rt" + b"R")

    def pickle(self, v) -> bytes:
        self.out.write(b"\x80\x02")
        self.value(v)
        self.out.write(b".")
        return self.out.getvalue()


# ------------------------------------------------------------------ reader


class StorageRef:
    def __init__(self, type_name: str, key: str, location: str, numel):
        self.type_name, self.key, self.location, self.numel = type_name, key, location, numel


class _Decoder(pickle.Unpickler):
    """Python's unpickler with TorchScript's globals replaced by stand-ins:
    classes become ClassObject, tensors a (StorageRef, offset, size, stride)
    tuple, type tags Tagged."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.storages: List[StorageRef] = []

    def find_class(self, module, name):
        qualified = f"{module}.{name}"
        if module.startswith("__torch__"):
            return type(name, (_ClassStub,), {"qualified_name": qualified})
        if qualified == "torch._utils._rebuild_tensor_v2":
            return lambda storage, offset, size, stride, *rest: ("tensor", storage, offset, size, stride)
        if qualified == "torch.jit._pickle.restore_type_tag":
            return Tagged
        if qualified == "collections.OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            return name
        return lambda *args: ("call", qualified, args)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or len(pid) != 5:
            raise pickle.UnpicklingError(f"odd persistent id {pid!r}")
        ref = StorageRef(*pid[1:])
        self.storages.append(ref)
        return ref


class _ClassStub:
    qualified_name = ""

    def __setstate__(self, state):
        self.state = state


def decode(data: bytes) -> Tuple[Any, List[StorageRef]]:
    """The value pickled in data, with stand-ins; raises on a malformed
    pickle (the storages read so far are in the exception's .storages)."""
    decoder = _Decoder(data)
    try:
        return decoder.load(), decoder.storages
    except Exception as error:
        error.storages = decoder.storages
        raise


def memo_indices(data: bytes) -> List[int]:
    """The memo indices the pickle's PUT and GET opcodes use, as far as it
    can be parsed."""
    found = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if opcode.name in ("PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"):
                found.append(int(arg))
    except Exception:
        pass
    return found


# ------------------------------------------------------------------ archives


def read_archive(data: bytes) -> Dict[str, bytes]:
    """Every record of a zip archive, by name, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def write_archive(records: Dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return out.getvalue()


def find_record(records: Dict[str, bytes], suffix: str) -> Optional[str]:
    """The name of the record whose name ends with /suffix."""
    for name in records:
        if name.endswith("/" + suffix):
            return name
    return None
