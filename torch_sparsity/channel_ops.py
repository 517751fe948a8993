"""The per-operation rules of the channel analysis (``channels.py``; those
of Conv and Linear: ``channel_layers.py``): walks a ``torch.export`` graph
(ATen ops, eval mode) and passes each tensor's channel flow on. A constant channel's value after an operation is that
operation applied to the constant itself (a probe tensor with one entry per
channel), which is what the operation computes on the real tensor. Any
operation not known here keeps every channel it touches, and says so."""

import math
import operator
from typing import Dict, Optional

import numpy as np
import torch
from torch import nn
from torch.fx import Node

from .channel_layers import CONVS, LayerRules, shape_of as _shape
from .channels import CONST, VARYING, ZERO, Analysis, Flow

__all__ = ["analyze"]

aten = torch.ops.aten

# One output channel per input channel, computed from that channel alone, at
# every position the same way: the probe gives a constant's new value.
_CHANNELWISE = {
    aten.relu, aten.relu_, aten.hardswish, aten.hardswish_, aten.hardsigmoid, aten.hardsigmoid_,
    aten.gelu, aten.gelu_, aten.silu, aten.silu_, aten.sigmoid, aten.sigmoid_, aten.tanh, aten.tanh_,
    aten.hardtanh, aten.hardtanh_, aten.relu6, aten.leaky_relu, aten.leaky_relu_, aten.elu, aten.elu_,
    aten.clamp, aten.clamp_, aten.clone, aten.contiguous, aten.alias, aten.detach, aten.dropout, aten.dropout_,
    aten.feature_dropout, aten.feature_dropout_, aten.alpha_dropout, aten.batch_norm,
    aten._native_batch_norm_legit_no_training, aten.to, aten._to_copy, aten.type_as, aten.neg, aten.abs,
}
# Spatial pooling: a zero channel stays zero, a constant one constant.
_POOLS = {aten.max_pool1d, aten.max_pool2d, aten.max_pool3d, aten.max_pool2d_with_indices,
          aten.adaptive_avg_pool1d, aten.adaptive_avg_pool2d, aten.adaptive_avg_pool3d,
          aten.adaptive_max_pool1d, aten.adaptive_max_pool2d, aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d}
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.squeeze,
             aten.squeeze_, aten.unsqueeze, aten.unsqueeze_}
_BINARY = {aten.add, aten.add_, aten.sub, aten.sub_, aten.mul, aten.mul_, aten.div, aten.div_}
# Ops that read a tensor's metadata only, never its values.
_METADATA = {aten._assert_tensor_metadata, aten.sym_size, aten.sym_numel, aten.sym_stride, aten.sym_storage_offset}


def _packet(target):
    return getattr(target, "overloadpacket", target)


class _Walker(LayerRules):
    def __init__(self, program, tensors: Dict[str, torch.Tensor], modules: Dict[str, nn.Module], masked: set):
        signature = program.graph_signature
        self.fqn = {**signature.inputs_to_parameters, **signature.inputs_to_buffers,
                    **signature.inputs_to_lifted_tensor_constants}
        self.tensors, self.modules, self.masked = tensors, modules, masked
        self.analysis = Analysis()
        self.flows: Dict[Node, object] = {}

    def tensor_of(self, arg) -> Optional[torch.Tensor]:
        """The value of a parameter, buffer or constant read by the graph."""
        if isinstance(arg, Node) and arg.op == "placeholder" and arg.name in self.fqn:
            return self.tensors.get(self.fqn[arg.name])
        return None

    def pin_args(self, node: Node, reason: str) -> None:
        for arg in node.all_input_nodes:
            flow = self.flows.get(arg)
            for f in flow if isinstance(flow, list) else [flow]:
                if isinstance(f, Flow):
                    self.analysis.pin(f.ids, reason)

    def probe(self, flow: Flow, rank: int, value) -> torch.Tensor:
        shape = [1] * rank
        shape[flow.dim] = len(flow.ids)
        return flow.value.to(value.dtype).reshape(shape).to(value.device)

    def read_probe(self, out: torch.Tensor, flow: Flow, dim: int) -> Flow:
        """The flow after an op whose probe result is ``out`` (channels along ``dim``)."""
        value = out.detach().movedim(dim, 0).reshape(len(flow.ids), -1)[:, 0].to(torch.float64).cpu()
        kind = np.where(flow.kind == VARYING, VARYING, np.where((value == 0).numpy(), ZERO, CONST)).astype(np.int8)
        value = torch.where(torch.from_numpy(kind == CONST), value, torch.zeros_like(value))
        return Flow(dim, flow.ids, kind, value)

    def materialize(self, arg, flow: Flow, rank: int, like):
        if isinstance(arg, Node):
            if self.flows.get(arg) is flow:  # in the input's dtype, which a cast may change
                val = arg.meta.get("val")
                return self.probe(flow, rank, val if isinstance(val, torch.Tensor) else like)
            tensor = self.tensor_of(arg)
            if tensor is None:
                raise LookupError(arg.name)
            return tensor
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.materialize(a, flow, rank, like) for a in arg)
        return arg

    def apply_probe(self, node: Node, flow: Flow, rank: int) -> Optional[Flow]:
        """``node``'s op on the probe of ``flow`` (its other tensor inputs
        being model constants), or None when it has others."""
        value = node.meta.get("val")
        value = value[0] if isinstance(value, (list, tuple)) else value
        try:
            args = self.materialize(node.args, flow, rank, value)
            kwargs = {k: self.materialize(v, flow, rank, value) for k, v in node.kwargs.items()}
            with torch.no_grad():
                out = node.target(*args, **kwargs)
        except LookupError:
            return None
        out = out[0] if isinstance(out, (list, tuple)) else out
        return self.read_probe(out, flow, flow.dim + out.dim() - rank)

    def run(self, graph) -> Analysis:
        for node in graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    flow = self.flows.get(arg)
                    for f in flow if isinstance(flow, list) else [flow]:
                        if isinstance(f, Flow):
                            self.analysis.pin(f.ids, "it reaches the model's output")
        calls = {}
        for read in self.analysis.reads:
            calls[read.module] = calls.get(read.module, 0) + 1
        for read in self.analysis.reads:
            if calls[read.module] > 1:  # a bias that one call's constant would change for every call
                read.fold_blocker = "it is called more than once"
        return self.analysis

    def call(self, node: Node) -> None:
        op = _packet(node.target)
        if op in _METADATA or not (op in CONVS or op is aten.linear) and not any(
                isinstance(self.flows.get(a), (Flow, list)) for a in node.all_input_nodes):
            return  # no channel values involved
        try:
            self.flows[node] = self.rule(node, op)
        except Exception as error:  # a form of a known op the rules do not expect: its channels stay
            self.pin_args(node, f"{op} (the analysis failed on it: {type(error).__name__}: {error})")
            self.flows[node] = None
        in_place = getattr(op, "__name__", "").endswith("_") and node.args and isinstance(node.args[0], Node)
        if self.flows[node] is None and (node.users or in_place):  # channels no longer followed must stay
            what = f"output {node.args[1]} of {_packet(node.args[0].target)}" if op is operator.getitem else f"{op}"
            self.pin_args(node, f"{what} (the analysis does not follow it)")
        if in_place:
            # An in-place op: later readers of its input see its output.
            self.flows[node.args[0]] = self.flows.get(node)

    def rule(self, node: Node, op):
        """The flow of ``node``'s output (None: no channels the analysis follows)."""
        if op in CONVS or op is aten.linear:
            for arg in node.args[1:3]:  # a computed weight or bias reads channels as no input column does
                if isinstance(self.flows.get(arg), Flow):
                    self.analysis.pin(self.flows[arg].ids, f"{op} takes them as its weight or bias")
            return self.conv_or_linear(node, op)
        if node.target is operator.getitem:
            flows, index = self.flows.get(node.args[0]), node.args[1]
            return flows[index] if isinstance(flows, list) and index < len(flows) else None
        if op in _CHANNELWISE:
            return self.channelwise(node, op)
        if op in _POOLS:
            return self.pool(node, op)
        if op in _RESHAPES:
            return self.reshape(node)
        if op in _BINARY:
            return self.binary(node, op)
        if op is aten.cat:
            return self.cat(node)
        if op in (aten.permute, aten.transpose, aten.t, aten.expand, aten.mean, aten.select, aten.slice):
            return self.move(node, op)
        if op is aten.group_norm:
            return self.group_norm(node)
        self.pin_args(node, f"{op} (an operation the analysis does not know)")
        return None

    def channelwise(self, node: Node, op) -> Optional[Flow]:
        flow = self.flows[node.args[0]]
        others = [a for a in node.all_input_nodes[1:] if isinstance(self.flows.get(a), Flow)]
        if not isinstance(flow, Flow) or others:
            self.pin_args(node, f"{op} with channels in more than its input")
            return None
        rank = len(_shape(node.args[0]))
        if op in (aten.batch_norm, aten._native_batch_norm_legit_no_training):
            if flow.dim != 1:
                self.pin_args(node, f"{op} over another dim than the channels")
                return None
            for arg in node.args[1:5]:
                if isinstance(arg, Node) and arg.name in self.fqn:
                    self.analysis.add_slice(self.fqn[arg.name], 0, flow.ids)
        result = self.apply_probe(node, flow, rank)
        if result is None:
            self.pin_args(node, f"{op} with inputs that are not model constants")
            return None
        if op is aten._native_batch_norm_legit_no_training:
            return [result]
        return result

    def pool(self, node: Node, op) -> Flow:
        flow = self.flows[node.args[0]]
        if not isinstance(flow, Flow) or flow.dim != 1:
            self.pin_args(node, f"{op} over the channel dim")
            return None
        # An average over padding, or by another divisor, changes a constant.
        average = op in (aten.avg_pool1d, aten.avg_pool2d, aten.avg_pool3d)
        padded = average and len(node.args) > 3 and any(node.args[3] if isinstance(node.args[3], (list, tuple))
                                                        else [node.args[3]])
        divided = average and (len(node.args) > 6 and node.args[6] is not None or "divisor_override" in node.kwargs)
        result = flow.varying() if padded or divided else flow
        with_indices = op in (aten.max_pool2d_with_indices, aten.adaptive_max_pool1d, aten.adaptive_max_pool2d)
        return [result] if with_indices else result

    def reshape(self, node: Node) -> Optional[Flow]:
        flow = self.flows[node.args[0]]
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        pre, size = math.prod(in_shape[:flow.dim]), in_shape[flow.dim]
        post = math.prod(in_shape[flow.dim + 1:])
        for k, out_size in enumerate(out_shape):
            outer = math.prod(out_shape[:k])
            if out_size == 1 and size != 1 or pre % outer or out_size % (size * (pre // outer)):
                continue
            inner = out_size // (size * (pre // outer))
            if post % inner == 0:
                return flow.repeated(inner, pre // outer).with_dim(k)
        self.pin_args(node, f"{_packet(node.target)} splits or mixes the channels")
        return None

    def move(self, node: Node, op) -> Optional[Flow]:
        flow = self.flows[node.args[0]]
        rank = len(_shape(node.args[0]))
        if op is aten.permute:
            dims = [d % rank for d in node.args[1]]
            return flow.with_dim(dims.index(flow.dim))
        if op in (aten.transpose, aten.t):
            a, b = (node.args[1] % rank, node.args[2] % rank) if op is aten.transpose else (0, 1)
            return flow.with_dim(b if flow.dim == a else a if flow.dim == b else flow.dim)
        if op is aten.expand:
            return flow.with_dim(flow.dim + len(_shape(node)) - rank)
        if op is aten.mean:
            dims = [d % rank for d in (node.args[1] if len(node.args) > 1 else range(rank))]
            keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
            if flow.dim in dims:
                self.pin_args(node, "mean over the channels")
                return None
            return flow if keepdim else flow.with_dim(flow.dim - sum(d < flow.dim for d in dims))
        dim = node.args[1] % rank if len(node.args) > 1 else 0
        if dim == flow.dim:
            self.pin_args(node, f"{op} along the channel dim")
            return None
        if op is aten.select and dim < flow.dim:
            return flow.with_dim(flow.dim - 1)
        return flow

    def binary(self, node: Node, op) -> Optional[Flow]:
        out_rank = len(_shape(node))
        a, b = node.args[0], node.args[1]
        fa, fb = self.flows.get(a), self.flows.get(b)
        fa = fa if isinstance(fa, Flow) else None
        fb = fb if isinstance(fb, Flow) else None
        multiply = op in (aten.mul, aten.mul_)
        if fa is not None and fb is not None:
            da, db = fa.dim + out_rank - len(_shape(a)), fb.dim + out_rank - len(_shape(b))
            if da != db or len(fa.ids) != len(fb.ids) or op in (aten.div, aten.div_):
                self.pin_args(node, f"{op} of tensors whose channels do not line up")
                return None
            self.analysis.unite(fa.ids, fb.ids)
            kind = np.maximum(fa.kind, fb.kind)
            if multiply:
                kind = np.where((fa.kind == ZERO) | (fb.kind == ZERO), ZERO, kind)
            with torch.no_grad():
                value = node.target(fa.value.clone(), fb.value, *node.args[2:], **node.kwargs).to(torch.float64)
            kind = np.where((kind == CONST) & (value == 0).numpy(), ZERO, kind).astype(np.int8)
            value = torch.where(torch.from_numpy(kind == CONST), value, torch.zeros_like(value))
            return Flow(da, fa.ids, kind, value)
        flow, other = (fa, b) if fa is not None else (fb, a)
        dim = flow.dim + out_rank - len(_shape(a if fa is not None else b))
        other_shape = _shape(other) if isinstance(other, Node) else ()
        aligned = dim - (out_rank - len(other_shape))
        across = aligned >= 0 and other_shape[aligned] != 1
        tensor = self.tensor_of(other)
        if isinstance(other, Node) and tensor is None:
            if across:
                self.pin_args(node, f"{op} with a computed tensor across the channels")
                result = flow.with_dim(dim).varying()
                result.kind[:] = VARYING
                return result
            zero_stays = multiply or (op in (aten.div, aten.div_) and other is b)
            result = flow.with_dim(dim).varying()
            if not zero_stays:
                result.kind[:] = VARYING
            return result
        if across:
            self.analysis.add_slice(self.fqn[other.name], aligned, flow.ids)
        if tensor is not None and tensor.numel() != (other_shape[aligned] if across else 1):
            result = flow.with_dim(dim).varying()  # a constant that differs across positions
            if not multiply:
                result.kind[:] = VARYING
            return result
        probe = self.apply_probe(node, flow, len(_shape(a if fa is not None else b)))
        return probe.with_dim(dim) if probe is not None else None

    def cat(self, node: Node) -> Optional[Flow]:
        parts, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
        rank = len(_shape(node))
        dim %= rank
        flows = [self.flows.get(p) for p in parts]
        if all(isinstance(f, Flow) and f.dim == dim for f in flows):
            return Flow(dim, np.concatenate([f.ids for f in flows]), np.concatenate([f.kind for f in flows]),
                        torch.cat([f.value for f in flows]))
        tracked = [f for f in flows if isinstance(f, Flow)]
        first = tracked[0]
        if all(f.dim == first.dim != dim and len(f.ids) == len(first.ids) for f in tracked):
            for f in tracked[1:]:
                self.analysis.unite(first.ids, f.ids)
            if len(tracked) == len(flows):
                return first.varying()
            # The other parts (a class token, say) hold these channels too.
            self.analysis.pin(first.ids, "cat with a tensor whose channels the analysis does not follow")
            result = first.varying()
            result.kind[:] = VARYING
            return result
        self.pin_args(node, "cat with a tensor whose channels the analysis does not follow")
        return None

    def group_norm(self, node: Node) -> Optional[Flow]:
        flow, groups = self.flows[node.args[0]], node.args[1]
        if flow.dim != 1:
            self.pin_args(node, "group_norm over another dim than the channels")
            return None
        size = len(flow.ids) // groups
        for g in range(groups):  # a group's channels share statistics: they go together
            block = flow.ids[g * size:(g + 1) * size]
            self.analysis.unite(np.repeat(block[:1], size), block)
        for arg in node.args[2:4]:
            if isinstance(arg, Node) and arg.name in self.fqn:
                self.analysis.add_slice(self.fqn[arg.name], 0, flow.ids)
        kind = flow.kind.reshape(groups, size)
        varying = np.repeat((kind == VARYING).any(1), size)
        result = self.apply_probe(node, flow, len(_shape(node.args[0])))
        if result is None:
            self.pin_args(node, "group_norm with inputs that are not model constants")
            return None
        result.kind = np.where(varying, VARYING, result.kind).astype(np.int8)
        result.value = torch.where(torch.from_numpy(varying), 0.0, result.value)
        return result


def analyze(program, tensors: Dict[str, torch.Tensor], modules: Dict[str, nn.Module], masked: set) -> Analysis:
    """The channel analysis of ``program`` (an ExportedProgram of a model
    with plain tensors, in eval mode): ``tensors`` by fqn (the effective,
    masked values), ``modules`` by fqn, ``masked`` the fqns of tensors that
    keep a mask (a constant cannot fold into a masked bias)."""
    return _Walker(program, tensors, modules, masked).run(program.graph)
