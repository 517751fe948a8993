"""The fuzz targets (bad pickled states, module fqns, set_mask inputs): what
a case is, how one is drawn, and the oracle that runs it.

A case is a JSON object (so that a finding or a corpus entry is a readable
file) with "target" and "kind"; each target draws cases from a
random.Random, builds the inputs a case describes deterministically, runs
them and checks the oracle:

- the call succeeds or raises a Python exception (a signal or a hang is
  caught by the driver, run_fuzz.py, which runs cases in a worker process);
- bad input changes nothing (a refused update_mask / set_mask leaves the
  held mask bitwise as it was; a refused swap_module / set_submodule leaves
  the model as it was);
- target-specific checks (below).

A broken oracle check raises Violation: a finding that is ours.

Targets:

pickled_state  torch.jit.save archives of fuzz_models.TwoHolders (one
               FakeSparsity, one FakeStructuredSparsity attribute):
  kind "state":       the pickled state of one holder replaced by a value
                      drawn from a grammar of states (wrong types, versions,
                      keys, type tags, tensor dtypes, shapes, layouts). A
                      well-formed state must load and give that very mask; any
                      other must fail with a RuntimeError that is the class's
                      own (names the class), never torch's INTERNAL ASSERT.
  kind "jit_bytes":   byte edits of data.pkl (or of a storage record).
                      torch's unpickler reads them first: any Python exception
                      is fine, and cases that hit torch's known limits
                      (known_torch_limit) are torch's.
  kind "export_bytes": byte edits of a torch.export.save archive of a model
                      converted with convert(model, target="export").
  Whatever loads is then used: forward, mask, update_mask, sparsity_level,
  deepcopy, a second save and load.
module_utils_fqn  fqn strings (grammar of real names, internal names,
               digits, huge numbers, unicode, empty pieces, very long strings)
               fed to every module utility on fuzz_models.FuzzNet, through
               torch_sparsity.utils, the operators, and TorchScript methods.
set_mask       arguments to update_mask of both classes and to set_mask of
               an AOTInductor package (one package compiled per run): every
               dtype, meta, sparse, non-contiguous, expanded, 0-dim and empty
               tensors, inference tensors, tensors that require grad, NaN and
               Inf, aliases of the held mask, and non-tensors.
"""

import copy
import io
import json
import os
import random
import warnings
from typing import Any, Dict, List, Optional

import torch

import pickle_archive as pa

warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.* are deprecated
warnings.filterwarnings("ignore", category=UserWarning)

TARGETS = ["pickled_state", "module_utils_fqn", "set_mask"]


class Violation(Exception):
    """An oracle check failed: a finding that is ours."""


# Findings of ours already reported and not fixed yet, by name: a violation
# whose message matches is counted as "known", not as a new finding, so that
# the CI run stays green until the fix lands (and says when it has: the
# corpus entry marked "xfail" with that name then passes).
KNOWN_FINDINGS: Dict[str, str] = {
    # Empty: both findings of the first runs are fixed (a self-overlapping
    # mask is refused by the classes; set_submodule refuses a leading empty
    # piece). Their corpus entries stay as regression cases.
}


def known_finding(detail: str) -> Optional[str]:
    import re

    for name, pattern in KNOWN_FINDINGS.items():
        if re.search(pattern, detail):
            return name
    return None


def check(condition, message):
    if not condition:
        raise Violation(message)


def short(text, limit=300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


# ------------------------------------------------------------------ tensors

MASK_DTYPES = ["bool", "uint8", "float32", "float64", "float16", "bfloat16"]
PICKLABLE_DTYPES = MASK_DTYPES + ["int8", "int16", "int32", "int64", "complex64", "complex128"]
ALL_DTYPES = PICKLABLE_DTYPES + ["uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2", "qint8", "quint8"]
FILLS = ["random", "zeros", "ones", "nan", "inf", "specials"]


def dtype_of(name: str) -> torch.dtype:
    return getattr(torch, name)


def _values(numel: int, dtype: torch.dtype, fill: str, generator: torch.Generator) -> torch.Tensor:
    """numel values of dtype (drawn in float64 or int64, then converted)."""
    if dtype == torch.bool:
        return torch.rand(numel, generator=generator) > 0.5
    if not (dtype.is_floating_point or dtype.is_complex):
        if dtype in (torch.qint8, torch.quint8):
            return torch.quantize_per_tensor(torch.randn(numel, generator=generator), 0.1, 10, dtype)
        high = 256 if dtype == torch.uint8 else 100
        low = 0 if "uint" in str(dtype) else -100
        return torch.randint(low, high, (numel,), generator=generator).to(dtype)
    if fill == "zeros":
        values = torch.zeros(numel, dtype=torch.float64)
    elif fill == "ones":
        values = torch.ones(numel, dtype=torch.float64)
    elif fill == "nan":
        values = torch.full((numel,), float("nan"), dtype=torch.float64)
    elif fill == "inf":
        values = torch.full((numel,), float("inf"), dtype=torch.float64)
    else:
        values = torch.randn(numel, generator=generator, dtype=torch.float64)
        if fill == "specials" and numel:
            specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-40, 7e4], dtype=torch.float64)
            picks = torch.randint(0, len(specials), (numel,), generator=generator)
            values = torch.where(torch.rand(numel, generator=generator) < 0.5, specials[picks], values)
    if dtype.is_complex:
        values = torch.complex(values, values.flip(0))
    return values.to(dtype)


def make_tensor(spec: Dict[str, Any]) -> torch.Tensor:
    """A strided CPU tensor as a spec describes it: dtype, size, stride
    (None: contiguous), offset, fill, seed, requires_grad."""
    generator = torch.Generator().manual_seed(int(spec.get("seed", 0)))
    dtype = dtype_of(spec["dtype"])
    size = [int(s) for s in spec["size"]]
    stride = spec.get("stride")
    if stride is None:
        stride, running = [], 1
        for s in reversed(size):
            stride.insert(0, running)
            running *= max(s, 1)
    offset = int(spec.get("offset", 0))
    extent = offset + (1 + sum((s - 1) * st for s, st in zip(size, stride)) if all(s > 0 for s in size) else 0)
    base = _values(extent, dtype, spec.get("fill", "random"), generator)
    tensor = base.as_strided(size, stride, offset)
    if spec.get("requires_grad") and (dtype.is_floating_point or dtype.is_complex):
        tensor = tensor.detach().requires_grad_(True)
    return tensor


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bits (NaN payloads included), whatever the strides."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False

    def flat_bytes(t):
        t = t.detach().int_repr() if t.is_quantized else t.detach()
        # Copied into a fresh tensor: reshape and contiguous keep a stride
        # of 0 where a dimension has 0 or 1 entries, which view() refuses.
        flat = torch.empty(t.numel(), dtype=t.dtype)
        flat.copy_(t.reshape(-1))
        return flat.view(torch.uint8)

    return torch.equal(flat_bytes(a), flat_bytes(b))


def random_shape(rng: random.Random, right: List[int]) -> List[int]:
    """The right shape, or one near it, or an odd one."""
    choice = rng.random()
    if choice < 0.4:
        return list(right)
    if choice < 0.55:
        return list(reversed(right))
    if choice < 0.65:
        return []
    if choice < 0.75:
        return [0] + right[1:]
    if choice < 0.85:
        return right + [1]
    return [rng.choice([0, 1, 2, 3, 4, 5, 8, 64]) for _ in range(rng.randint(1, 4))]


# ========================================================= pickled_state

STATE_TAGS = [None, "Dict[str, Tensor]", "Dict[str, Tensor]", "Dict[str, int]", "Dict[int, Tensor]",
              "Dict[str, Any]", "List[Tensor]", "Tensor", "Dict[str, Tensor", "NoSuchType", ""]
ODD_VERSIONS = [0, 2, 7, -1, 255, 256, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**70]
HOLDER_SHAPES = {"FakeSparsity": [4, 3], "FakeStructuredSparsity": [4]}
HOLDER_ATTRIBUTES = {"FakeSparsity": "unstructured", "FakeStructuredSparsity": "structured"}


def _tensor_spec(rng: random.Random, holder: str, dtype: Optional[str] = None) -> Dict[str, Any]:
    right = HOLDER_SHAPES[holder]
    size = random_shape(rng, right)
    spec = {"t": "tensor", "dtype": dtype or rng.choice(MASK_DTYPES if rng.random() < 0.6 else PICKLABLE_DTYPES),
            "size": size, "stride": None, "offset": 0, "fill": rng.choice(FILLS), "seed": rng.randrange(2**31),
            "requires_grad": rng.random() < 0.15}
    layout = rng.random()
    if layout < 0.1 and len(size) >= 2:  # transposed
        spec["stride"] = [1] + [size[0]] * (len(size) - 1) if len(size) == 2 else None
    elif layout < 0.2 and size:  # expanded: stride 0 in dim 0
        spec["stride"] = [0] + [1] * (len(size) - 1) if len(size) == 1 else None
    elif layout < 0.3:
        spec["offset"] = rng.randint(1, 5)
    return spec


def _random_value(rng: random.Random, holder: str, depth: int = 0) -> Dict[str, Any]:
    kind = rng.choice(["int", "float", "str", "bool", "none", "tensor", "tuple", "list", "dict"] if depth < 3 else
                      ["int", "str", "none", "tensor"])
    if kind == "int":
        return {"t": "int", "v": rng.choice(ODD_VERSIONS + [1, 5])}
    if kind == "float":
        return {"t": "float", "v": rng.choice(["1.0", "nan", "-inf", "0.5"])}
    if kind == "str":
        return {"t": "str", "v": rng.choice(["mask", "1", "", "FakeSparsity", "\u00e9" * 3])}
    if kind == "bool":
        return {"t": "bool", "v": rng.random() < 0.5}
    if kind == "none":
        return {"t": "none"}
    if kind == "tensor":
        return _tensor_spec(rng, holder)
    if kind == "dict":
        items = [[{"t": "str", "v": rng.choice(["mask", "x", "Mask"])}, _random_value(rng, holder, depth + 1)]
                 for _ in range(rng.randint(0, 2))]
        return {"t": "dict", "tag": rng.choice(STATE_TAGS), "items": items}
    items = [_random_value(rng, holder, depth + 1) for _ in range(rng.randint(0, 3))]
    return {"t": kind, "items": items, "tag": None}


def good_state_spec(rng: random.Random, holder: str) -> Dict[str, Any]:
    mask = _tensor_spec(rng, holder, dtype=rng.choice(MASK_DTYPES))
    mask.update(size=HOLDER_SHAPES[holder], stride=None, offset=0)
    return {"t": "tuple", "items": [{"t": "int", "v": 1},
                                    {"t": "dict", "tag": "Dict[str, Tensor]",
                                     "items": [[{"t": "str", "v": "mask"}, mask]]}]}


def mutate_state(rng: random.Random, state: Dict[str, Any], holder: str) -> Dict[str, Any]:
    """One structured mutation of a state spec (a deep copy)."""
    state = copy.deepcopy(state)
    well_formed_shape = state.get("t") == "tuple" and len(state.get("items", [])) == 2
    mutation = rng.randrange(10)
    if not well_formed_shape or mutation == 0:
        return _random_value(rng, holder)
    version, tensors = state["items"]
    if mutation == 1:
        state["items"][0] = rng.choice([{"t": "int", "v": rng.choice(ODD_VERSIONS)}, {"t": "str", "v": "1"},
                                        {"t": "bool", "v": True}, {"t": "float", "v": "1.0"}, {"t": "none"}])
    elif mutation == 2:
        if rng.random() < 0.5:
            state["items"].append(_random_value(rng, holder, 2))
        else:
            state["items"].pop(rng.randrange(2))
    elif mutation == 3:
        state["t"] = "list"
        state["tag"] = rng.choice([None, "List[Any]", "List[int]"])
    elif mutation == 4:
        state["items"][1] = _random_value(rng, holder, 1)
    elif tensors.get("t") != "dict":
        state["items"][1] = good_state_spec(rng, holder)["items"][1]
    elif mutation == 5:
        tensors["tag"] = rng.choice(STATE_TAGS)
    elif mutation == 6:
        tensors["items"].append([{"t": "str", "v": rng.choice(["x", "mask_", "mask", ""])}, _random_value(rng, holder, 2)])
    elif mutation == 7:
        if tensors["items"]:
            tensors["items"].pop(rng.randrange(len(tensors["items"])))
        key = rng.choice([{"t": "str", "v": "Mask"}, {"t": "int", "v": 0}, {"t": "str", "v": "mask\x00"}])
        tensors["items"].append([key, _tensor_spec(rng, holder)])
    elif mutation == 8 and tensors["items"]:
        tensors["items"][0][1] = _random_value(rng, holder, 2)
    elif tensors["items"]:
        tensors["items"][0][1] = _tensor_spec(rng, holder)
    return state


def build_value(spec: Dict[str, Any]):
    """The Python value (with pickle_archive stand-ins) a state spec describes."""
    kind = spec["t"]
    if kind in ("int", "str", "bool"):
        return spec["v"]
    if kind == "float":
        return float(spec["v"])
    if kind == "none":
        return None
    if kind == "tensor":
        return make_tensor(spec)
    if kind in ("tuple", "list"):
        items = [build_value(item) for item in spec["items"]]
        value = tuple(items) if kind == "tuple" else items
    else:
        value = {}
        for key, item in spec["items"]:
            value[build_value(key)] = build_value(item)
    tag = spec.get("tag")
    return pa.Tagged(value, tag) if tag is not None and kind != "tuple" else value


def effective_items(dict_spec) -> Dict[Any, Dict[str, Any]]:
    """A dict spec's entries as the pickled dict holds them (a repeated key:
    the last one wins, as in build_value)."""
    return {build_value(key): value for key, value in dict_spec["items"]}


def state_is_well_formed(spec: Dict[str, Any], holder: str) -> Optional[bool]:
    """Whether the class must accept the state (True), refuse it (False), or
    it depends on how torch reads a type tag that does not fit (None)."""
    def tag_fits(node):
        tag = node.get("tag")
        return tag is None or (node["t"] == "dict" and tag in ("Dict[str, Tensor]", "Dict[str, Any]"))

    def tags_all_fit(node):
        if not tag_fits(node):
            return False
        children = [c for pair in node.get("items", []) for c in (pair if isinstance(pair, list) else [pair])]
        return all(tags_all_fit(child) for child in children if isinstance(child, dict))

    def ints_fit(node):  # torch reads int64 only
        if node.get("t") == "int" and not -(2**63) <= node["v"] < 2**63:
            return False
        children = [c for pair in node.get("items", []) for c in (pair if isinstance(pair, list) else [pair])]
        return all(ints_fit(child) for child in children if isinstance(child, dict))

    if not tags_all_fit(spec) or not ints_fit(spec):
        return None
    if spec["t"] != "tuple" or len(spec["items"]) != 2:
        return False
    version, tensors = spec["items"]
    if version["t"] != "int" or version["v"] != 1 or tensors["t"] != "dict" or len(effective_items(tensors)) != 1:
        return False
    (key, mask), = effective_items(tensors).items()
    if not (isinstance(key, str) and key == "mask") or mask["t"] != "tensor" or mask["dtype"] not in MASK_DTYPES:
        return False
    if holder == "FakeStructuredSparsity" and len(mask["size"]) != 1:
        return False
    # Elements sharing memory (a stride-0 dimension of size > 1, not empty):
    # the classes refuse such a mask, which update_mask could not write.
    size, stride = mask["size"], mask.get("stride")
    overlapping = stride is not None and all(n > 0 for n in size) and any(
        n > 1 and st == 0 for n, st in zip(size, stride))
    return not overlapping


# --- byte edits


INTERESTING_BYTES = [0, 1, 0x7F, 0x80, 0xFF, ord("K"), ord("J"), ord("("), ord("t"), ord("R"), ord("b"),
                     ord("Q"), ord("h"), ord("j"), ord("r"), ord("."), ord("}"), ord("u"), ord("N"), ord("\x8a")]
INTERESTING_WORDS = [0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 20, 1 << 30, 64, 255]


def random_edit(rng: random.Random, data: bytes, file: str) -> Dict[str, Any]:
    """One byte edit of a file: {"file", "op", "offset", ...}."""
    n = max(len(data), 1)
    offset = rng.randrange(n)
    op = rng.choice(["flip", "byte", "word", "delete", "insert", "duplicate", "truncate", "flip", "byte"])
    edit = {"file": file, "op": op, "offset": offset}
    if op == "flip":
        edit["bit"] = rng.randrange(8)
    elif op == "byte":
        edit["value"] = rng.choice(INTERESTING_BYTES + [rng.randrange(256)])
    elif op == "word":
        edit["value"] = rng.choice(INTERESTING_WORDS)
    elif op in ("delete", "duplicate"):
        edit["length"] = rng.randint(1, 8)
    elif op == "insert":
        edit["hex"] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4))).hex()
    return edit


def apply_edit(data: bytes, edit: Dict[str, Any]) -> bytes:
    offset = min(edit["offset"], len(data))
    op = edit["op"]
    if op == "flip" and offset < len(data):
        return data[:offset] + bytes([data[offset] ^ (1 << edit["bit"])]) + data[offset + 1:]
    if op == "byte" and offset < len(data):
        return data[:offset] + bytes([edit["value"]]) + data[offset + 1:]
    if op == "word":
        return data[:offset] + (edit["value"] & 0xFFFFFFFF).to_bytes(4, "little") + data[offset + 4:]
    if op == "delete":
        return data[:offset] + data[offset + edit["length"]:]
    if op == "insert":
        return data[:offset] + bytes.fromhex(edit["hex"]) + data[offset:]
    if op == "duplicate":
        return data[:offset] + data[offset:offset + edit["length"]] * 2 + data[offset + edit["length"]:]
    if op == "truncate":
        return data[:offset]
    return data


def apply_edits(records: Dict[str, bytes], edits: List[Dict[str, Any]]) -> Dict[str, bytes]:
    records = dict(records)
    for edit in edits:
        name = pa.find_record(records, edit["file"])
        if name is not None:
            records[name] = apply_edit(records[name], edit)
    return records


# Beyond this a memo index makes torch's unpickler grow its memo table
# element by element (a minute or more, gigabytes): torch's, not ours.
MEMO_INDEX_LIMIT = 1 << 20


def known_torch_limit_of_jit_archive(records: Dict[str, bytes]) -> Optional[str]:
    """Why torch's own unpickler cannot be trusted with this archive, or None.
    Two are known: a huge memo index, and a storage element count that the
    unpickler trusts (a storage larger than its record, then read
    past its end)."""
    data_pkl = records.get(pa.find_record(records, "data.pkl") or "", b"")
    indices = pa.memo_indices(data_pkl)
    if indices and max(indices) > MEMO_INDEX_LIMIT:
        return f"torch: memo index {max(indices)} (the unpickler grows its memo table to it)"
    try:
        _, storages = pa.decode(data_pkl)
    except Exception as error:
        storages = getattr(error, "storages", [])
    sizes = torch.storage._dtype_to_storage_type_map()
    element_sizes = {name: torch.empty(0, dtype=dtype).element_size() for dtype, name in sizes.items()}
    for ref in storages:
        record = pa.find_record(records, f"data/{ref.key}")
        if record is None or not isinstance(ref.numel, int) or ref.type_name not in element_sizes:
            continue  # torch refuses these itself
        needed = ref.numel * element_sizes[ref.type_name]
        if ref.numel < 0 or needed > len(records[record]):
            return (f"torch: storage {ref.key!r} of {ref.numel} {ref.type_name} elements ({needed} bytes) "
                    f"but its record has {len(records[record])} bytes (the unpickler trusts the count)")
    return None


class PickledState:
    name = "pickled_state"

    def __init__(self):
        from fuzz_models import TwoHolders

        torch.manual_seed(0)
        self.model = torch.jit.script(TwoHolders((torch.rand(4, 3) > 0.5).float(), torch.ones(4)))
        buffer = io.BytesIO()
        torch.jit.save(self.model, buffer)
        self.jit_records = pa.read_archive(buffer.getvalue())
        module, _ = pa.decode(self.jit_records[pa.find_record(self.jit_records, "data.pkl")])
        self.module_name = module.qualified_name
        self.attributes = dict(module.state)  # training, _is_full_backward_hook, the two holders
        self._export_records = None
        self._export_input = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))

    def export_records(self):
        """A torch.export.save archive of a pruned Linear(8, 4) converted with
        target="export" (built on first use: it takes seconds)."""
        if self._export_records is None:
            from torch_sparsity.convert import convert
            from torch_sparsity.sparsifiers import prune_with_weight_norm

            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
            prune_with_weight_norm(model, 0.5)
            program = torch.export.export(convert(model, target="export"), (self._export_input,))
            buffer = io.BytesIO()
            torch.export.save(program, buffer)
            self._export_records = pa.read_archive(buffer.getvalue())
        return self._export_records

    # --- drawing cases

    def generate(self, rng: random.Random, corpus: List[Dict[str, Any]]) -> Dict[str, Any]:
        if corpus and rng.random() < 0.25:
            return self.mutate(rng, copy.deepcopy(rng.choice(corpus)))
        kind = rng.choices(["state", "jit_bytes", "export_bytes"], weights=[50, 45, 5])[0]
        if kind == "state":
            holder = rng.choice(list(HOLDER_SHAPES))
            state = good_state_spec(rng, holder)
            for _ in range(rng.choice([0, 1, 1, 1, 2, 3])):
                state = mutate_state(rng, state, holder)
            return {"target": self.name, "kind": "state", "holder": holder, "state": state}
        return self.mutate(rng, {"target": self.name, "kind": kind, "edits": []})

    def mutate(self, rng: random.Random, case: Dict[str, Any]) -> Dict[str, Any]:
        if case["kind"] == "state":
            case["state"] = mutate_state(rng, case["state"], case["holder"])
            return case
        if case["kind"] == "jit_bytes":
            records = self.jit_records
            # Mostly data.pkl; now and then a storage record (whose truncation is torch's limit).
            files = ["data.pkl"] * 9 + [name.split("/", 1)[1] for name in records if "/data/" in name]
        else:
            records = self.export_records()
            files = [name.split("/", 1)[1] for name in records if "serialization_id" not in name]
        for _ in range(rng.choice([1, 1, 2, 3, 4])):
            file = rng.choice(files)
            data = apply_edits(records, case["edits"]).get(pa.find_record(records, file) or "", b"")
            case["edits"].append(random_edit(rng, data, file))
        return case

    # --- running them

    def archive_of(self, case) -> Dict[str, bytes]:
        if case["kind"] == "state":
            return self.state_archive(case["holder"], build_value(case["state"]))
        if case["kind"] == "jit_bytes":
            return apply_edits(self.jit_records, case["edits"])
        return apply_edits(self.export_records(), case["edits"])

    def state_archive(self, holder: str, state) -> Dict[str, bytes]:
        """The TwoHolders archive with data.pkl rewritten: the holder's state
        replaced by state, the other holder keeping its own."""
        writer = pa.PickleWriter()
        attributes = {}
        for name, value in self.attributes.items():
            if isinstance(value, pa._ClassStub):
                if name == HOLDER_ATTRIBUTES[holder]:
                    value = pa.ClassObject(value.qualified_name, state)
                else:
                    mask = getattr(self.model, name).mask
                    value = pa.ClassObject(value.qualified_name, (1, pa.Tagged({"mask": mask}, "Dict[str, Tensor]")))
            attributes[name] = value
        data_pkl = writer.pickle(pa.ClassObject(self.module_name, attributes))
        records = dict(self.jit_records)
        prefix = pa.find_record(records, "data.pkl")[: -len("data.pkl")]
        records[prefix + "data.pkl"] = data_pkl
        for key, data in writer.records.items():
            records[f"{prefix}data/{key}"] = data
        return records

    def known_torch_limit(self, case) -> Optional[str]:
        if case["kind"] == "jit_bytes":
            return known_torch_limit_of_jit_archive(self.archive_of(case))
        return None

    def run(self, case) -> str:
        records = self.archive_of(case)
        archive = io.BytesIO(pa.write_archive(records))
        if case["kind"] == "export_bytes":
            return self._run_export(archive)
        expectation = state_is_well_formed(case["state"], case["holder"]) if case["kind"] == "state" else None
        try:
            loaded = torch.jit.load(archive)
        except Exception as error:
            if case["kind"] == "state":
                message = str(error)
                check(expectation is not True, f"a well-formed state was refused: {short(message)}")
                if expectation is False:
                    check(isinstance(error, RuntimeError), f"{type(error).__name__}, not a RuntimeError: {short(message)}")
                    check("INTERNAL ASSERT" not in message, f"torch's internal assert, not the class's message: {short(message)}")
                    check(case["holder"] in message, f"the message does not name {case['holder']}: {short(message)}")
            return f"refused: {type(error).__name__}: {short(str(error), 120)}"
        if case["kind"] == "state":
            check(expectation is not False, "a malformed state was accepted")
            if expectation:
                _, tensors = case["state"]["items"]
                expected_mask = make_tensor(effective_items(tensors)["mask"])
                held = getattr(loaded, HOLDER_ATTRIBUTES[case["holder"]]).mask
                check(same_bits(held, expected_mask), "the loaded mask is not the pickled one")
                check(held.requires_grad == expected_mask.requires_grad, "requires_grad of the mask was not kept")
        self._use(loaded, must_work=expectation is True)
        return "loaded"

    def _use(self, loaded, must_work: bool):
        """Everything a loaded model offers; with must_work, none may fail
        (the model's own forward aside, whose input fits only the original
        masks)."""
        def attempt(what, call):
            """(whether call worked, its result)."""
            try:
                return True, call()
            except Exception as error:
                check(not must_work, f"{what} failed on a well-formed state: {type(error).__name__}: {short(error)}")
                return False, None

        try:
            loaded(torch.randn(4, 3))
        except Exception:
            pass
        for name in HOLDER_ATTRIBUTES.values():
            _, holder = attempt(f"{name} attribute", lambda: getattr(loaded, name))
            _, mask = attempt(f"{name}.mask", lambda: holder.mask) if holder is not None else (False, None)
            if not isinstance(mask, torch.Tensor):
                continue
            shape = list(mask.shape) if name == "unstructured" else list(mask.shape[:1]) + [2]
            attempt(f"{name}.forward", lambda: holder.forward(torch.randn(shape)))
            attempt(f"{name}.sparsity_level", lambda: holder.sparsity_level())
            attempt(f"{name}.update_mask", lambda: holder.update_mask(torch.ones(mask.shape)))
            if must_work:
                check(holder.mask is mask, f"{name}.update_mask replaced the held mask")
        copied_ok, copied = attempt("deepcopy", lambda: copy.deepcopy(loaded))
        buffer = io.BytesIO()
        saved, _ = attempt("save again", lambda: torch.jit.save(copied if copied_ok else loaded, buffer))
        if saved:
            buffer.seek(0)
            loaded_again, again = attempt("load again", lambda: torch.jit.load(buffer))
            if must_work and loaded_again:
                for name in HOLDER_ATTRIBUTES.values():
                    check(same_bits(getattr(again, name).mask, getattr(loaded, name).mask),
                          f"{name}: save/load changed the mask")

    def _run_export(self, archive) -> str:
        import torch_sparsity

        try:
            program = torch.export.load(archive)
        except Exception as error:
            return f"refused: {type(error).__name__}: {short(str(error), 120)}"
        for call in (lambda: program.module()(self._export_input), lambda: torch_sparsity.masks(program)):
            try:
                call()
            except Exception:
                pass
        return "loaded"


# ========================================================= module_utils_fqn

INTERNAL_NAMES = ["capsule", "__dict__", "_c", "__class__", "forward", "__getstate__", "__setstate__", "_modules",
                  "_parameters", "_buffers", "state_dict", "update_mask", "get_mask", "sparsity_level",
                  "__obj_flatten__", "T", "grad", "data", "_is_full_backward_hook", "original_name", "code",
                  "training", "__torch__", "self", "__init__", "from_dense", "lookup", "install"]
ODD_PIECES = ["", " ", "-1", "-0", "00", "01", "007", "99999999999999999999", str(2**63), str(2**64), "1e3", "0x1",
              "+1", "слой", "😀", "e\u0301", "\x00", "\udc80", "a b", "\n", "mask\x00", "*", "[0]", "heads['a']",
              "\u202e", "ſ", "ＦＣ1", "FC1", "fc1 "]
# Structure of FuzzNet: name -> the names inside it (submodules, tensors,
# attributes and properties), for walks along real paths.
FUZZNET_NAMES = {
    "": ["fc1", "blocks", "heads", "props", "nested", "plain", "sparse_prototype", "running", "counter", "scale",
         "tag", "names", "table", "holder", "training"],
    "MaskedLinear": ["weight", "bias", "weight_sparsity", "row_sparsity"],
    "holder": ["mask"],
    "Sequential": ["0", "1"],
    "ModuleList": ["0", "1"],
    "ModuleDict": ["a", "b"],
    "Slot": ["slot"],
    "Properties": ["inner", "broken", "inner_bias", "fail"],
    "Linear": ["weight", "bias"],
}
CHILD_KIND = {"fc1": "MaskedLinear", "blocks": "ModuleList", "heads": "ModuleDict", "props": "Properties",
              "nested": "Slot", "plain": "Linear", "sparse_prototype": "Linear", "weight_sparsity": "holder",
              "row_sparsity": "holder", "holder": "holder", "inner": "Linear", "slot": "Slot"}
CANDIDATES = ["masked_linear", "masked_linear_out3", "linear_8_8", "linear_4_8", "relu", "slot", "model",
              "submodule", "parent_slot", "prototype", "tensor", "none", "int"]
CLASS_NAMES = ["FakeSparsity", "FakeStructuredSparsity", "Linear", "MaskedLinear", "Slot", "", "sparsity.FakeSparsity",
               "torch.classes.sparsity.FakeSparsity", "___torch_mangle_0.Linear"]


def random_real_path(rng: random.Random) -> List[str]:
    """A walk down FuzzNet's structure, sometimes past its end."""
    pieces, names = [], FUZZNET_NAMES[""]
    for _ in range(rng.randint(1, 6)):
        piece = rng.choice(names)
        pieces.append(piece)
        kind = CHILD_KIND.get(piece)
        if piece in ("0", "1") and pieces[:1] == ["blocks"]:
            kind = "Linear" if piece == "0" else "Sequential"
        elif piece == "1" and len(pieces) > 1 and pieces[-2] == "1":
            kind = "Linear"
        elif piece in ("a", "b") and len(pieces) > 1 and pieces[-2] == "heads":
            kind = "Linear" if piece == "a" else "Slot"
        elif piece == "slot" and pieces[:1] == ["heads"]:
            kind = "MaskedLinear"
        elif piece == "slot" and pieces.count("slot") >= 2:
            kind = "Linear"
        if kind is None or rng.random() < 0.15:
            break
        names = FUZZNET_NAMES[kind]
    return pieces


def mutate_fqn(rng: random.Random, fqn: str) -> str:
    op = rng.randrange(12)
    pieces = fqn.split(".")
    if op == 0:
        pieces.insert(rng.randint(0, len(pieces)), "")
    elif op == 1 and len(pieces) > 1:
        pieces.pop(rng.randrange(len(pieces)))
    elif op == 2:
        pieces[rng.randrange(len(pieces))] = rng.choice(INTERNAL_NAMES)
    elif op == 3:
        pieces[rng.randrange(len(pieces))] = rng.choice(ODD_PIECES)
    elif op == 4:
        pieces.append(rng.choice(INTERNAL_NAMES + ODD_PIECES))
    elif op == 5:
        return fqn + "." if rng.random() < 0.5 else "." + fqn
    elif op == 6:
        return ".".join([fqn] * rng.choice([2, 3, 50, 2000]))
    elif op == 7 and fqn:
        i = rng.randrange(len(fqn))
        return fqn[:i] + chr(rng.choice([0, 46, 32, 0xDC80, 0x1F600, rng.randrange(0x20, 0x7F)])) + fqn[i:]
    elif op == 8 and fqn:
        i = rng.randrange(len(fqn))
        return fqn[:i] + fqn[i + 1:]
    elif op == 9:
        return fqn.upper() if rng.random() < 0.5 else fqn.swapcase()
    elif op == 10:
        pieces.insert(rng.randint(0, len(pieces)), rng.choice(["a" * 100_000, "9" * 400, "." * 1000]))
    else:
        return random_fqn(rng)
    return ".".join(pieces)


def random_fqn(rng: random.Random) -> str:
    style = rng.random()
    if style < 0.55:
        return ".".join(random_real_path(rng))
    if style < 0.75:
        vocabulary = FUZZNET_NAMES[""] + INTERNAL_NAMES + ODD_PIECES + ["weight", "bias", "0", "1", "a", "b", "slot", "mask"]
        return ".".join(rng.choice(vocabulary) for _ in range(rng.randint(0, 5)))
    return mutate_fqn(rng, ".".join(random_real_path(rng)))


def torch_ao_split(tensor_fqn: str):
    """torch.ao.pruning's get_arg_info_from_tensor_fqn split: (module_fqn, tensor_name)."""
    tensor_name = tensor_fqn.split(".")[-1]
    return tensor_fqn[: -len(tensor_name) - ("." in tensor_fqn)], tensor_name


def _children(module_c):
    return torch._C.ModuleDict(module_c).items()


def snapshot(model_c) -> List[Any]:
    """The model as it stands: each module by path (the object, its type),
    its parameters and buffers (the tensors, and clones of their values), and
    the plain attributes FuzzNet has. Raises Violation on a cycle."""
    entries = []

    def walk(path, module, ancestors):
        check(not any(module == a for a in ancestors), f"the module at {path!r} is its own ancestor (a cycle)")
        tensors = list(torch._C.ParameterDict(module).items()) + list(torch._C.BufferDict(module).items())
        entries.append((path, module, module._type().qualified_name(),
                        [(name, t, t.detach().clone()) for name, t in tensors]))
        for name, child in _children(module):
            walk(f"{path}.{name}" if path else name, child, ancestors + [module])

    walk("", model_c, [])
    plain = [repr(model_c.getattr(name)) for name in ("counter", "scale", "tag", "names", "table", "training")]
    return [entries, plain]


def same_snapshot(a, b) -> bool:
    (entries_a, plain_a), (entries_b, plain_b) = a, b
    if plain_a != plain_b or len(entries_a) != len(entries_b):
        return False
    for (path_a, mod_a, type_a, tensors_a), (path_b, mod_b, type_b, tensors_b) in zip(entries_a, entries_b):
        if path_a != path_b or not (mod_a == mod_b) or type_a != type_b or len(tensors_a) != len(tensors_b):
            return False
        for (name_a, t_a, v_a), (name_b, t_b, v_b) in zip(tensors_a, tensors_b):
            if name_a != name_b or t_a is not t_b or not same_bits(v_a, v_b):
                return False
    return True


ALLOWED_RESULT_TYPES = (type(None), bool, int, float, str, list, dict, tuple, torch.Tensor, torch.jit.ScriptModule,
                        torch._C.ScriptModule, torch.ScriptObject)
OUR_CLASSES = ("__torch__.torch.classes.sparsity.FakeSparsity", "__torch__.torch.classes.sparsity.FakeStructuredSparsity")


class ModuleUtilsFqn:
    name = "module_utils_fqn"

    def __init__(self):
        from fuzz_models import FuzzNet, MaskedLinear, Slot, SparsePrototype

        import torch_sparsity.utils  # noqa: F401  (the Python helpers)

        torch.manual_seed(0)
        self.template = torch.jit.script(FuzzNet())
        self.stranger = torch.jit.script(torch.nn.Linear(2, 2))
        self.x = torch.randn(2, 4)
        self.makers = {
            "masked_linear": lambda m: torch.jit.script(MaskedLinear(torch.nn.Linear(4, 8))),
            "masked_linear_out3": lambda m: torch.jit.script(MaskedLinear(torch.nn.Linear(8, 3))),
            "linear_8_8": lambda m: torch.jit.script(torch.nn.Linear(8, 8)),
            "linear_4_8": lambda m: torch.jit.script(torch.nn.Linear(4, 8)),
            "relu": lambda m: torch.jit.script(torch.nn.ReLU()),
            "slot": lambda m: torch.jit.script(Slot(torch.nn.Linear(8, 8))),
            "model": lambda m: m,
            "submodule": lambda m: m.nested.slot,
            "parent_slot": lambda m: m.nested,
            "prototype": lambda m: torch.jit.script(SparsePrototype()),
            "tensor": lambda m: torch.ones(2),
            "none": lambda m: None,
            "int": lambda m: 3,
        }
        for make in self.makers.values():  # compile each type once, outside the timed cases
            make(self.template)

    def generate(self, rng: random.Random, corpus: List[Dict[str, Any]]) -> Dict[str, Any]:
        if corpus and rng.random() < 0.25:
            case = copy.deepcopy(rng.choice(corpus))
            case["fqn"] = mutate_fqn(rng, case["fqn"])
            return case
        return {"target": self.name, "kind": "fqn", "fqn": random_fqn(rng), "candidate": rng.choice(CANDIDATES),
                "via": rng.choice(["python", "op", "script"]), "property_raises": rng.random() < 0.3,
                "class_name": rng.choice(CLASS_NAMES + ["<fqn>"]), "mapping_key": rng.choice(CLASS_NAMES + ["<fqn>"])}

    def known_torch_limit(self, case):
        return None

    def run(self, case) -> str:
        from torch_sparsity import utils

        fqn = case["fqn"]
        model = copy.deepcopy(self.template)
        model.props.fail = bool(case.get("property_raises"))
        via = case.get("via", "python")
        odd_string = any(0xD800 <= ord(c) <= 0xDFFF for c in fqn)  # not UTF-8: refused at the call

        def expected_error(error, what):
            """A property that raises on the path, or a string that is not UTF-8."""
            if odd_string and isinstance(error, (UnicodeError, RuntimeError, TypeError)):
                return True
            check(isinstance(error, RuntimeError), f"{what}: {type(error).__name__}, not a RuntimeError: {short(error)}")
            check(case.get("property_raises") and "property 'broken'" in str(error),
                  f"{what} raised on a path whose properties all work: {short(error)}")
            return True

        before = snapshot(model._c)
        # fqn_to_module
        lookups = {"python": lambda p: utils.fqn_to_module(model, p),
                   "op": lambda p: torch.ops.sparsity.fqn_to_module(model._c, p),
                   "script": lambda p: model.lookup(p)}
        try:
            found = lookups[via](fqn)
        except Exception as error:
            expected_error(error, "fqn_to_module")
            found = None
        check(isinstance(found, ALLOWED_RESULT_TYPES), f"fqn_to_module handed out a {type(found).__name__}")
        if isinstance(found, torch.ScriptObject) and not isinstance(found, torch._C.ScriptModule):
            qualified = found._type().qualified_name()
            check(qualified in OUR_CLASSES or qualified.startswith("__torch__."),
                  f"fqn_to_module handed out an object of type {qualified}")
        found_c = found._c if isinstance(found, torch.jit.ScriptModule) else found
        if isinstance(found_c, torch._C.ScriptModule):
            path = utils.module_to_fqn(model, found_c)
            check(isinstance(path, str), "module_to_fqn does not find a module that fqn_to_module found")
            check(torch.ops.sparsity.fqn_to_module(model._c, path) == found_c,
                  f"fqn_to_module(module_to_fqn(m)) is another module (path {path!r})")
            check(utils.module_to_fqn(model, found_c, fqn) == fqn + path, "module_to_fqn's prefix is not pasted in front")
        # get_arg_info_from_tensor_fqn
        try:
            info = (model.tensor_info(fqn) if via == "script" else
                    torch.ops.sparsity.get_arg_info_from_tensor_fqn(model._c, fqn) if via == "op" else
                    utils.get_arg_info_from_tensor_fqn(model, fqn))
        except Exception as error:
            expected_error(error, "get_arg_info_from_tensor_fqn")
            info = None
        if info is not None:
            module_fqn, tensor_name = torch_ao_split(fqn)
            check((info["module_fqn"], info["tensor_name"], info["tensor_fqn"]) == (module_fqn, tensor_name, fqn),
                  "get_arg_info_from_tensor_fqn does not split the fqn as torch.ao.pruning does")
        # module_contains_param and swap_module, on the module found or the model
        module = found if isinstance(found, torch.jit.ScriptModule) else model
        if isinstance(found, torch._C.ScriptModule):
            module = torch.jit._recursive.wrap_cpp_module(found)
        class_name = fqn if case.get("class_name") == "<fqn>" else case.get("class_name", "FakeSparsity")
        try:
            contains = utils.module_contains_param(module, class_name)
            check(isinstance(contains, bool), "module_contains_param did not give a bool")
        except Exception as error:
            check(odd_string, f"module_contains_param raised {type(error).__name__}: {short(error)}")
        key = fqn if case.get("mapping_key") == "<fqn>" else case.get("mapping_key", "MaskedLinear")
        prototype = model.sparse_prototype
        try:
            swapped = utils.swap_module(module, {key: prototype})
            check(swapped is module or swapped._c._type() == prototype._c._type(),
                  "swap_module gave neither the module nor a copy of the prototype")
        except Exception as error:
            check(isinstance(error, (RuntimeError, UnicodeError)), f"swap_module raised {type(error).__name__}: {short(error)}")
        check(prototype.weight.numel() == 0, "swap_module changed the prototype")
        check(same_snapshot(before, snapshot(model._c)), "swap_module or a lookup changed the model")
        # set_submodule
        new_module = self.makers[case.get("candidate", "linear_8_8")](model)
        new_c = new_module._c if isinstance(new_module, torch.jit.ScriptModule) else new_module
        try:
            if via == "script":
                model.install(fqn, new_c)
            elif via == "op":
                torch.ops.sparsity.set_submodule(model._c, fqn, new_c)
            else:
                utils.set_submodule(model, fqn, new_module)
        except Exception as error:
            check(isinstance(error, (RuntimeError, TypeError, UnicodeError)),
                  f"set_submodule raised {type(error).__name__}: {short(error)}")
            check(same_snapshot(before, snapshot(model._c)), f"a refused set_submodule changed the model ({short(error, 120)})")
            return f"set_submodule refused: {short(error, 100)}"
        check("" not in fqn.split("."),
              f"set_submodule accepted the path {short(repr(fqn), 80)}, which has an empty piece (fqn_to_module gives None for it)")
        installed = torch.ops.sparsity.fqn_to_module(model._c, fqn)
        check(installed == new_c, "after set_submodule the path does not name the new module")
        snapshot(model._c)  # no cycle
        check(utils.module_to_fqn(model, self.stranger) is None, "module_to_fqn found a stranger")
        try:
            torch.jit._recursive.wrap_cpp_module(model._c)(self.x)
        except RuntimeError:
            pass  # a module of another width installed in a same-typed slot: a shape error
        return "set_submodule accepted"


# ========================================================= set_mask

NON_TENSORS = ["none", "int", "float", "str", "list", "nested_list", "tuple", "holder", "module", "bool"]


class SetMask:
    name = "set_mask"
    aoti_fqn = "0.weight"

    def __init__(self, workdir: str):
        from torch_sparsity import aoti
        from torch_sparsity.convert import convert
        from torch_sparsity.sparsifiers import prune_with_weight_norm

        self.aoti = aoti
        self.x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
        self.package_path = os.path.join(workdir, "set_mask_linear.pt2")
        if not os.path.exists(self.package_path):  # compiled once per run; restarted workers reuse it
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
            prune_with_weight_norm(model, 0.5)
            converted = convert(model, target="export")
            partial = self.package_path[: -len(".pt2")] + ".partial.pt2"
            aoti.compile(converted, (self.x,), partial)
            os.replace(partial, self.package_path)
        runner = aoti.load(self.package_path)
        self.aoti_mask = runner.mask(self.aoti_fqn)

    def generate(self, rng: random.Random, corpus: List[Dict[str, Any]]) -> Dict[str, Any]:
        if corpus and rng.random() < 0.25:
            case = copy.deepcopy(rng.choice(corpus))
            case["arg"] = self._arg(rng, case["holder"]) if rng.random() < 0.5 else case["arg"]
            case["mode"] = rng.choice(["plain", "no_grad", "inference_mode"])
            return case
        holder = rng.choices(["FakeSparsity", "FakeStructuredSparsity", "aoti"], weights=[35, 25, 40])[0]
        case = {"target": self.name, "kind": "set_mask", "holder": holder, "arg": self._arg(rng, holder),
                "mode": rng.choices(["plain", "no_grad", "inference_mode"], weights=[70, 15, 15])[0]}
        if holder == "aoti":
            case["fqn"] = self.aoti_fqn if rng.random() < 0.7 else mutate_fqn(rng, self.aoti_fqn)
            case["via"] = rng.choice(["runner", "package"])
        else:
            case["held"] = {"dtype": rng.choice(MASK_DTYPES), "inference": rng.random() < 0.1,
                            "expanded": rng.random() < 0.05}
        return case

    def _arg(self, rng: random.Random, holder: str) -> Dict[str, Any]:
        if rng.random() < 0.08:
            return {"kind": rng.choice(NON_TENSORS)}
        if rng.random() < 0.05:
            return {"kind": rng.choice(["held", "held_view", "held_flipped"])}
        right = [4, 8] if holder == "aoti" else HOLDER_SHAPES[holder]
        dtype = rng.choice(["bool"] * 6 + ALL_DTYPES) if holder == "aoti" else rng.choice(MASK_DTYPES * 2 + ALL_DTYPES)
        return {"kind": "tensor", "dtype": dtype, "size": random_shape(rng, right), "fill": rng.choice(FILLS),
                "seed": rng.randrange(2**31),
                "layout": rng.choices(["strided", "sparse_coo", "sparse_csr"], weights=[85, 10, 5])[0],
                "view": rng.choices(["none", "transpose", "expand", "slice", "offset"], weights=[60, 10, 10, 10, 10])[0],
                "device": rng.choices(["cpu", "meta"], weights=[90, 10])[0],
                "inference": rng.random() < 0.1, "requires_grad": rng.random() < 0.1}

    def known_torch_limit(self, case):
        return None

    def _tensor(self, arg) -> torch.Tensor:
        """The argument a tensor spec describes; where a combination cannot
        be built (a sparse CSR 0-dim tensor, say), the plain tensor."""
        size, view = list(arg["size"]), arg.get("view", "none")
        spec = {"dtype": arg["dtype"], "size": size, "fill": arg["fill"], "seed": arg["seed"]}
        if view == "transpose" and len(size) >= 2:
            spec["stride"] = [1] + [size[0]] * (len(size) - 1) if len(size) == 2 else None
        elif view == "expand" and size and all(s > 0 for s in size):
            spec["stride"] = [0] + [1] * (len(size) - 1) if len(size) == 1 else [0] * len(size)
        elif view == "slice":
            spec["stride"] = [2 * s for s in (make_tensor({**spec, "size": size}).stride())]
        elif view == "offset":
            spec["offset"] = 3
        tensor = make_tensor(spec)
        for step in ("layout", "device", "requires_grad"):
            try:
                if step == "layout" and arg["layout"] == "sparse_coo":
                    tensor = tensor.to_sparse()
                elif step == "layout" and arg["layout"] == "sparse_csr":
                    tensor = tensor.to_sparse_csr()
                elif step == "device" and arg["device"] == "meta":
                    tensor = tensor.to("meta")
                elif step == "requires_grad" and arg["requires_grad"]:
                    tensor = tensor.detach().requires_grad_(True)
            except Exception:
                pass
        if arg.get("inference"):
            with torch.inference_mode():
                tensor = tensor.clone() if tensor.layout == torch.strided else tensor.detach()
        return tensor

    def _argument(self, arg, held: torch.Tensor, holder_object, module):
        kind = arg["kind"]
        if kind == "tensor":
            return self._tensor(arg)
        return {"none": None, "int": 1, "float": 1.0, "bool": True, "str": "mask", "list": [1.0, 0.0],
                "nested_list": [[True] * held.shape[-1]] * (held.shape[0] if held.dim() > 1 else 1),
                "tuple": (1, 0), "holder": holder_object, "module": module,
                "held": held, "held_view": held.view(held.shape) if held.layout == torch.strided else held,
                "held_flipped": held.flip(0)}[kind]

    def run(self, case) -> str:
        mode = {"plain": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[case.get("mode", "plain")]
        if case["holder"] == "aoti":
            return self._run_aoti(case, mode)
        holder_class = getattr(torch.classes.sparsity, case["holder"])
        held_spec = case["held"]
        spec = {"dtype": held_spec["dtype"], "size": HOLDER_SHAPES[case["holder"]], "fill": "random", "seed": 7}
        if held_spec.get("expanded"):  # every row the same memory
            spec["stride"] = [0] + [1] * (len(spec["size"]) - 1)
        if held_spec.get("inference"):
            with torch.inference_mode():
                held = make_tensor(spec)
        else:
            held = make_tensor(spec)
        if held_spec.get("expanded"):
            # update_mask could never write it: the class must refuse it.
            try:
                holder_class(held)
            except RuntimeError as error:
                check(case["holder"] in str(error), f"the refusal does not name {case['holder']}: {short(error)}")
                return f"refused at construction: {short(str(error), 100)}"
            raise Violation("a mask whose elements share memory was accepted")
        holder = holder_class(held)
        before = held.clone()
        argument = self._argument(case["arg"], held, holder, torch.jit.script(torch.nn.ReLU()))
        expected = None
        if isinstance(argument, torch.Tensor):
            try:
                with mode():
                    expected = torch.empty_like(before).copy_(argument)
            except Exception:
                pass
        try:
            with mode():
                holder.update_mask(argument)
        except Exception as error:
            check(holder.mask is held, "a refused update_mask replaced the held mask")
            check(same_bits(held, before), f"a refused update_mask changed the held mask ({type(error).__name__}: {short(error, 150)})")
            check(isinstance(error, (RuntimeError, TypeError, ValueError)),
                  f"update_mask raised {type(error).__name__}: {short(error)}")
            return f"refused: {type(error).__name__}: {short(str(error), 100)}"
        check(holder.mask is held, "update_mask replaced the held mask")
        check(isinstance(argument, torch.Tensor), f"update_mask accepted a {type(argument).__name__}")
        check(argument.dtype in [dtype_of(d) for d in MASK_DTYPES], f"update_mask accepted a {argument.dtype} mask")
        check(argument.layout == torch.strided, f"update_mask accepted a {argument.layout} mask")
        check(list(argument.shape) == list(held.shape), f"update_mask accepted shape {list(argument.shape)}")
        if expected is not None:
            check(same_bits(held, expected), "update_mask did not copy the new mask as copy_ does")
        holder.forward(torch.randn(list(held.shape) + ([2] if case["holder"] == "FakeStructuredSparsity" else [])))
        return "accepted"

    def _run_aoti(self, case, mode) -> str:
        runner = self.aoti.load(self.package_path)
        mask_before = runner.mask(self.aoti_fqn)
        with torch.no_grad():
            output_before = runner(self.x)
        held = runner.mask(self.aoti_fqn)
        argument = self._argument(case["arg"], held, runner.package, torch.jit.script(torch.nn.ReLU()))
        fqn = case.get("fqn", self.aoti_fqn)
        try:
            with mode():
                if case.get("via") == "package":
                    runner.package.set_mask(fqn, argument)
                else:
                    runner.set_mask(fqn, argument)
        except Exception as error:
            check(same_bits(runner.mask(self.aoti_fqn), mask_before),
                  f"a refused set_mask changed the mask ({type(error).__name__}: {short(error, 150)})")
            with torch.no_grad():
                check(same_bits(runner(self.x), output_before), "a refused set_mask changed the output")
            check(isinstance(error, (RuntimeError, TypeError, ValueError)), f"set_mask raised {type(error).__name__}: {short(error)}")
            return f"refused: {type(error).__name__}: {short(str(error), 100)}"
        check(fqn == self.aoti_fqn, f"set_mask accepted the fqn {fqn!r}")
        check(isinstance(argument, torch.Tensor), f"set_mask accepted a {type(argument).__name__}")
        check(argument.dtype == self.aoti_mask.dtype and argument.device == self.aoti_mask.device
              and list(argument.shape) == list(self.aoti_mask.shape) and argument.layout == torch.strided,
              f"set_mask accepted a {argument.layout} {argument.dtype} {list(argument.shape)} mask on {argument.device}")
        check(same_bits(runner.mask(self.aoti_fqn), argument.detach()), "set_mask did not keep the mask given")
        with torch.no_grad():
            runner(self.x)
        return "accepted"


def make_target(name: str, workdir: str):
    if name == "pickled_state":
        return PickledState()
    if name == "module_utils_fqn":
        return ModuleUtilsFqn()
    if name == "set_mask":
        return SetMask(workdir)
    raise ValueError(f"no fuzz target {name!r}; the targets: {', '.join(TARGETS)}")
