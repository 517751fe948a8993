"""The channel analysis behind ``shrink``: where each output channel of each
Conv/Linear flows in a model's ``torch.export`` graph, what value it has
there, and which channels are coupled (docs/shrinking.md).

Every channel a Conv or Linear makes is an element of a union-find; a tensor
of the graph that carries channels has a ``Flow``: the dim that holds them,
the element of each channel and its value (ZERO, CONST: the same number
everywhere, or VARYING). Operations pass flows on (per-op rules:
``channel_ops.py``); a residual add, a multiply, a depthwise convolution or a
shared weight unites the elements it joins. What the analysis gathers:

- ``slices``: (tensor fqn, dim) -> the element of each index along that dim,
  for every parameter and buffer that holds a slice of a channel;
- ``reads``: the Conv/Linear inputs that consume channels, with the value of
  each channel there (zero, a constant that may fold into the bias, varying);
- ``pins``: elements that must stay, with the reason (an operation that the
  analysis does not know or that mixes channels, the model's output, ...).
"""

from collections import Counter
from typing import Dict, List, Optional

import numpy as np
import torch

__all__ = ["ZERO", "CONST", "VARYING", "Analysis", "Flow", "Read"]

ZERO, CONST, VARYING = 0, 1, 2


class Flow:
    """The channels a tensor carries along ``dim``: ``ids`` (their elements),
    ``kind`` (ZERO, CONST or VARYING each) and ``value`` (float64; the
    constant where CONST, 0 elsewhere)."""

    def __init__(self, dim: int, ids: np.ndarray, kind: np.ndarray, value: torch.Tensor):
        self.dim, self.ids, self.kind, self.value = dim, ids, kind, value

    def with_dim(self, dim: int) -> "Flow":
        return Flow(dim, self.ids, self.kind, self.value)

    def varying(self) -> "Flow":
        """The same channels, every one that is not ZERO now VARYING."""
        kind = np.where(self.kind == ZERO, ZERO, VARYING).astype(np.int8)
        return Flow(self.dim, self.ids, kind, torch.where(torch.from_numpy(kind == ZERO), 0.0, self.value))

    def repeated(self, inner: int, outer: int) -> "Flow":
        """Each channel as a block of ``inner`` entries, the whole ``outer`` times
        (a channel dim merged with others by a reshape or flatten)."""
        index = np.tile(np.repeat(np.arange(len(self.ids)), inner), outer)
        return Flow(self.dim, self.ids[index], self.kind[index], self.value[torch.from_numpy(index)])


class Read:
    """A Conv/Linear input that consumes channels: ``module`` (fqn), its
    ``weight`` and ``bias`` fqns, the kind of read (``"linear"``, ``"conv"``),
    the flow it reads (one entry per input column or channel) and whether a
    constant channel folds exactly into its bias (``foldable``; else why not)."""

    def __init__(self, module: str, weight: str, bias: str, kind: str, flow: Flow, fold_blocker: Optional[str]):
        self.module, self.weight, self.bias, self.kind, self.flow = module, weight, bias, kind, flow
        self.fold_blocker = fold_blocker


class Analysis:
    """Union-find over channel elements, with what the per-op rules record."""

    def __init__(self):
        self.parent: List[int] = []
        self.space: List[int] = []  # the producer each element was made by
        self.space_names: List[str] = []
        self.slices: Dict[tuple, np.ndarray] = {}
        self.reads: List[Read] = []
        self.pins: Dict[int, str] = {}
        self.produced: Dict[str, np.ndarray] = {}  # weight fqn -> its output channels' elements
        self.costs: List[tuple] = []  # (multiply-adds, output elements or None, input elements or None)

    def new_elements(self, count: int, name: str) -> np.ndarray:
        start = len(self.parent)
        self.space_names.append(name)
        self.parent.extend(range(start, start + count))
        self.space.extend([len(self.space_names) - 1] * count)
        return np.arange(start, start + count, dtype=np.int64)

    def find(self, element: int) -> int:
        parent = self.parent
        root = element
        while parent[root] != root:
            root = parent[root]
        while parent[element] != root:
            parent[element], element = root, parent[element]
        return root

    def roots(self, ids: np.ndarray) -> np.ndarray:
        return np.fromiter((self.find(int(i)) for i in ids), dtype=np.int64, count=len(ids))

    def unite(self, a: np.ndarray, b: np.ndarray) -> None:
        for x, y in zip(a.tolist(), b.tolist()):
            x, y = self.find(x), self.find(y)
            if x != y:
                self.parent[max(x, y)] = min(x, y)

    def pin(self, ids: np.ndarray, reason: str) -> None:
        for element in ids.tolist():
            self.pins.setdefault(element, reason)

    def add_slice(self, fqn: str, dim: int, ids: np.ndarray) -> None:
        """``fqn`` holds one entry per channel ``ids`` along ``dim``; a tensor
        used twice (a shared weight) couples what it meets."""
        key = (fqn, dim)
        if key in self.slices:
            if len(self.slices[key]) != len(ids):
                self.pin(ids, f"{fqn} is used with different channel counts")
                self.pin(self.slices[key], f"{fqn} is used with different channel counts")
                return
            self.unite(self.slices[key], ids)
        else:
            self.slices[key] = ids

    def decide(self) -> Dict[int, str]:
        """The reason each kept root stays; roots not in the result go."""
        kept: Dict[int, str] = {}
        for element, reason in self.pins.items():
            kept.setdefault(self.find(element), reason)
        for read in self.reads:
            roots = self.roots(read.flow.ids)
            for root, kind, value in zip(roots.tolist(), read.flow.kind.tolist(), read.flow.value.tolist()):
                if kind == VARYING:
                    kept.setdefault(root, f"nonzero where {read.module} reads it")
                elif kind == CONST and read.fold_blocker:
                    kept.setdefault(root, f"constant {value:.4g} where {read.module} reads it ({read.fold_blocker})")
        return kept

    def components(self) -> List[int]:
        """Per space (producer), the first space of its group of coupled
        producers: spaces whose channels are united belong together."""
        space_parent = list(range(len(self.space_names)))

        def space_root(s):
            while space_parent[s] != s:
                s = space_parent[s]
            return s

        for element in range(len(self.parent)):
            a, b = space_root(self.space[element]), space_root(self.space[self.find(element)])
            if a != b:
                space_parent[max(a, b)] = min(a, b)
        return [space_root(s) for s in range(len(self.space_names))]

    def groups(self, kept: Dict[int, str]) -> List[dict]:
        """Per group of coupled producers: its name, channels, how many go and
        why the others stay."""
        component = self.components()
        members: Dict[int, list] = {}
        for s, root in enumerate(component):
            members.setdefault(root, []).append(s)
        channels: Dict[int, set] = {}
        for element in range(len(self.parent)):
            channels.setdefault(component[self.space[element]], set()).add(self.find(element))
        result = []
        for root, spaces in members.items():
            roots = channels.get(root, set())
            reasons = Counter(kept[r] for r in roots if r in kept)
            result.append({
                "producers": [self.space_names[s] for s in spaces],
                "channels": len(roots),
                "removed": len(roots) - sum(reasons.values()),
                "kept": dict(reasons),
            })
        return result
