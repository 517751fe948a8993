"""The channel analysis's rules for Conv and Linear (``channel_ops.py`` has
the others): the layers whose weights make and read channels."""

import math
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.fx import Node

from .channels import CONST, VARYING, ZERO, Flow, Read

__all__ = ["CONVS", "LayerRules", "shape_of"]

aten = torch.ops.aten
CONVS = {aten.conv1d, aten.conv2d, aten.conv3d}
_CONV_MODULES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def shape_of(node) -> Optional[tuple]:
    value = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in value.shape) if isinstance(value, torch.Tensor) else None


class LayerRules:
    """Part of the graph walker of ``channel_ops``: what a Conv or Linear
    reads (a ``Read``, its weight's columns) and makes (its rows, the
    elements of a new channel space)."""

    def conv_or_linear(self, node: Node, op) -> Optional[Flow]:
        x, weight = node.args[0], node.args[1]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight_fqn = self.fqn.get(getattr(weight, "name", None)) or ""
        module_fqn, _, name = weight_fqn.rpartition(".")
        module = self.modules.get(module_fqn) if name == "weight" else None
        expected = nn.Linear if op is aten.linear else _CONV_MODULES
        flow, out_shape = self.flows.get(x), shape_of(node)
        in_shape = shape_of(x)
        w = self.tensor_of(weight)
        known = isinstance(module, expected) and w is not None and (bias is None or self.tensor_of(bias) is not None)
        groups = node.args[6] if op in CONVS and len(node.args) > 6 else 1
        channel_dim = 1 if op in CONVS else len(out_shape) - 1
        macs = math.prod(out_shape) * math.prod(w.shape[1:]) if w is not None else 0
        if not known:
            what = f"{op} of {weight_fqn or 'a computed weight'}, no {'Linear' if op is aten.linear else 'Conv'}'s own weight"
            if isinstance(flow, Flow):
                self.analysis.pin(flow.ids, what)
            self.analysis.costs.append((macs, None, None))
            if w is None:
                return None
            ids = self.producer(weight_fqn or node.name, w.shape[0], slice_weight=False)
            self.analysis.pin(ids, what)
            return Flow(channel_dim, ids, np.full(len(ids), VARYING, np.int8), torch.zeros(len(ids), dtype=torch.float64))
        # The bias's own name: export may name a weight tied between modules after either.
        bias_fqn = self.fqn.get(getattr(bias, "name", None)) or (f"{module_fqn}.bias" if module_fqn else "bias")
        module_fqn = bias_fqn.rpartition(".")[0] if bias is not None else module_fqn
        depthwise = op in CONVS and groups > 1 and groups == in_shape[1] == w.shape[0] and w.shape[1] == 1
        b = self.tensor_of(bias) if bias is not None else None
        rows_zero = (w.reshape(w.shape[0], -1) == 0).all(1).cpu()
        bias_value = b.detach().to(torch.float64).cpu() if b is not None else torch.zeros(w.shape[0], dtype=torch.float64)
        if depthwise:
            if not isinstance(flow, Flow):
                ids = self.producer(weight_fqn, w.shape[0])
                self.analysis.pin(ids, f"depthwise convolution {module_fqn} of the model's input")
                flow = Flow(1, ids, np.full(len(ids), VARYING, np.int8), torch.zeros(len(ids), dtype=torch.float64))
            ids = flow.ids
            self.analysis.add_slice(weight_fqn, 0, ids)
            if b is not None:
                self.analysis.add_slice(bias_fqn, 0, ids)
            padding = node.args[4] if len(node.args) > 4 else 0
            padded = isinstance(padding, str) or any(padding if isinstance(padding, (list, tuple)) else [padding])
            sums = w.detach().reshape(w.shape[0], -1).sum(1).to(torch.float64).cpu()
            kind = np.full(len(ids), VARYING, np.int8)
            value = torch.zeros(len(ids), dtype=torch.float64)
            for c in range(len(ids)):
                if rows_zero[c] or flow.kind[c] == ZERO:
                    value[c] = bias_value[c]
                elif flow.kind[c] == CONST and not padded:
                    value[c] = flow.value[c] * sums[c] + bias_value[c]
                else:
                    continue
                kind[c] = ZERO if value[c] == 0 else CONST
            self.analysis.costs.append((macs, ids, None))
            return Flow(1, ids, kind, value)
        # A Conv/Linear reads its input's channels and makes its own. Grouped,
        # a weight column serves the same place in every group, and each group
        # keeps as many rows as the others: those places are coupled.
        in_ids = None
        if isinstance(flow, Flow):
            if flow.dim != (1 if op in CONVS else len(in_shape) - 1):
                self.analysis.pin(flow.ids, f"{module_fqn} reads the channels along another dim")
            else:
                in_ids = flow.ids
                columns = self.couple_groups(flow.ids, groups)
                padding = node.args[4] if op in CONVS and len(node.args) > 4 else 0
                padded = isinstance(padding, str) or any(padding if isinstance(padding, (list, tuple)) else [padding])
                blocker = None
                if groups > 1:
                    blocker = "a grouped convolution"
                elif padded:
                    blocker = "a padded convolution"
                elif bias_fqn in self.masked:
                    blocker = "its bias is masked"
                self.analysis.add_slice(weight_fqn, 1, columns)
                kind = "conv" if op in CONVS else "linear"
                self.analysis.reads.append(Read(module_fqn, weight_fqn, bias_fqn, kind, flow, blocker))
        ids = self.producer(weight_fqn, w.shape[0])
        self.couple_groups(ids, groups)
        if b is not None:
            self.analysis.add_slice(bias_fqn, 0, ids)
        kind = np.where(rows_zero.numpy(), np.where((bias_value == 0).numpy(), ZERO, CONST), VARYING).astype(np.int8)
        value = torch.where(torch.from_numpy(kind == CONST), bias_value, torch.zeros_like(bias_value))
        self.analysis.costs.append((macs, ids, in_ids))
        return Flow(channel_dim, ids, kind, value)

    def producer(self, weight_fqn: str, count: int, slice_weight: bool = True) -> np.ndarray:
        if weight_fqn not in self.analysis.produced:
            name = weight_fqn.rsplit(".", 1)[0] if slice_weight else weight_fqn
            ids = self.analysis.new_elements(count, name)
            self.analysis.produced[weight_fqn] = ids
            if slice_weight:
                self.analysis.add_slice(weight_fqn, 0, ids)
        return self.analysis.produced[weight_fqn]

    def couple_groups(self, ids: np.ndarray, groups: int) -> np.ndarray:
        """Unites the channels at the same place of each of ``groups`` equal
        blocks; returns the first block."""
        size = len(ids) // groups
        for g in range(1, groups):
            self.analysis.unite(ids[:size], ids[g * size:(g + 1) * size])
        return ids[:size]
