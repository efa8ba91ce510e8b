"""The member axis of an ensemble: S independent runs whose tensors are stacked (docs/methods.md §9).

An ensemble's batch is ``(S, B, d)``, member ``k``'s rows at ``[k]``; every row tensor carries the member axis third
from the end (``(..., S, B, x)``). Its model and posterior are ``stack``-ed modules, every parameter and buffer
holding the members' values on a leading axis of size S, computed in one of two ways:

- ``member_broadcast`` classes (the GRBM, the MLP and linear posteriors) run their own methods on parameters
  stacked in member-broadcast shapes: a vector ``(n,)`` as ``(S, 1, n)``, a matrix as ``(S, n, m)``, so that
  elementwise operations and matrix products with row tensors pair each member's rows with its own parameters;
- other classes list ``member_methods``, each computed for all members at once by ``torch.func.vmap`` over
  ``torch.func.functional_call`` of a single-run template.

The autograd calls of the objectives (scores, unrolled steps, the energy's backward) run on the stacked results,
and since no operation mixes members, each member's gradient is the one its run alone would get. Losses keep one
value per member (``batch_mean``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from functools import partial

import torch
from torch import nn
from torch.func import functional_call, vmap
from torch.utils._pytree import tree_map

from eblvm.noise import ROWS


def batch_mean(values: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The mean of per-row ``values`` (``(..., B)``: rows, after any particle axes) for batch ``v``: a scalar for a
    run's ``(B, d)`` batch, one mean per member (shape ``(S,)``) for an ensemble's ``(S, B, d)``."""
    if v.dim() == 2:
        return values.mean()
    return values.mean(dim=[axis for axis in range(values.dim()) if axis != values.dim() - 2])


def member_norms(tensors: Iterable[torch.Tensor], n_members: int) -> torch.Tensor:
    """The Euclidean norm of each member's slice of ``tensors`` (leading member axis) taken together, shape ``(S,)``."""
    flat = [tensor.reshape(n_members, -1) for tensor in tensors]
    if not flat:
        return torch.zeros(n_members)
    return torch.linalg.vector_norm(torch.cat(flat, dim=1), dim=1)


class _MethodCall(nn.Module):
    """Calls a method of ``module`` by name, so that ``functional_call`` can run any method, not only ``forward``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, name: str, *args):
        return getattr(self.module, name)(*args)


def _tensor_names(module: nn.Module) -> list[str]:
    return [name for name, _ in module.named_parameters()] + [name for name, _ in module.named_buffers()]


def _get(module: nn.Module, name: str) -> torch.Tensor:
    """The tensor at dotted ``name``: attribute access, so that ``functional_call``'s substitutes are seen."""
    for part in name.split("."):
        module = getattr(module, part)
    return module


def _set(module: nn.Module, name: str, value: torch.Tensor, parameter: bool) -> None:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    if parameter:
        setattr(module, leaf, nn.Parameter(value, requires_grad=value.requires_grad))
    else:
        module.register_buffer(leaf, value, persistent=leaf not in module._non_persistent_buffers_set)


def _stack_tensors(module: nn.Module, members: Sequence[nn.Module], names: Iterable[str], shape=None) -> None:
    """Replace the tensors ``names`` of ``module`` by the members' values stacked on a new leading axis, each in
    ``shape(name, single-run shape)`` when given."""
    parameters = {name for name, _ in module.named_parameters()}
    for name in names:
        values = [_get(member, name).detach() for member in members]
        stacked = torch.stack(values)
        if shape is not None:
            stacked = stacked.reshape(shape(name, values[0].shape))
        if name in parameters:
            stacked.requires_grad_(_get(members[0], name).requires_grad)
        _set(module, name, stacked, name in parameters)


def _mapped(name: str, out_axis: int):
    def method(self, *args):
        return self.map_members(name, out_axis, args)

    method.__name__ = name
    method.__doc__ = f"``{name}`` of every member at once (``torch.func.vmap``); the member axis at {out_axis}."
    return method


_ENSEMBLE_CLASSES: dict[type, type] = {}


def _ensemble_class(cls: type) -> type:
    """``cls`` with each of its ``member_methods`` computed over the member axis; its other methods run as they
    are, reaching the parameters through the mapped ones."""
    if cls not in _ENSEMBLE_CLASSES:
        methods = {name: _mapped(name, axis) for name, axis in cls.member_methods.items()}
        _ENSEMBLE_CLASSES[cls] = type(f"Stacked{cls.__name__}", (StackedModule, cls), methods)
    return _ENSEMBLE_CLASSES[cls]


class StackedModule(nn.Module):
    """The mix-in of a ``stack``-ed module of a class with ``member_methods``: its runs computed together."""

    def map_members(self, name: str, out_axis: int, args: tuple) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Method ``name`` of the template for every member, with that member's parameters and buffers and its
        slice of each row-tensor argument; each output's member axis is moved to ``out_axis``."""
        caller = self.__dict__["_caller"]
        tensors = {f"module.{name}": _get(self, name) for name in self.__dict__["_names"]}

        def one_member(member_tensors, *member_args):
            return functional_call(caller, member_tensors, (name, *member_args))

        in_dims = (0, *(ROWS if isinstance(arg, torch.Tensor) else None for arg in args))
        outputs = vmap(one_member, in_dims=in_dims)(tensors, *args)
        return tree_map(lambda output: output.movedim(0, out_axis), outputs)


def _broadcast_shape(name: str, shape: torch.Size, *, n_members: int) -> tuple[int, ...]:
    """The member-broadcast shape of a stacked tensor whose members have ``shape``."""
    if len(shape) == 1:
        return (n_members, 1, shape[0])
    if len(shape) == 2:
        return (n_members, *shape)
    raise ValueError(
        f"{name} has shape {tuple(shape)}: member broadcasting stacks vectors and matrices only; list "
        "member_methods instead"
    )


def stack(members: Sequence[nn.Module]) -> nn.Module:
    """One module computing all ``members`` (modules of one class) at once, names unchanged: their parameters and
    buffers stacked on a leading member axis (``S = len(members)``), in member-broadcast shapes for a
    ``member_broadcast`` class, else as ``(S, ...)`` behind the class's vmapped ``member_methods``."""
    template = members[0]
    cls = type(template)
    if not (cls.member_broadcast or cls.member_methods):
        raise ValueError(f"{cls.__name__} can be trained only alone: it has no member_broadcast or member_methods")
    stacked = copy.deepcopy(template)
    if cls.member_broadcast:
        _stack_tensors(stacked, members, _tensor_names(template), partial(_broadcast_shape, n_members=len(members)))
        return stacked
    _stack_tensors(stacked, members, _tensor_names(template))
    stacked.__class__ = _ensemble_class(cls)
    # the template runs each member's computation with that member's tensors substituted; its own never serve
    stacked.__dict__["_caller"] = _MethodCall(copy.deepcopy(template).to("meta"))
    stacked.__dict__["_names"] = _tensor_names(template)
    return stacked


def stack_parameters(module: nn.Module, members: Sequence[nn.Module]) -> nn.Module:
    """``module`` (one of ``members``) with each parameter replaced by the members' stacked on a leading axis;
    buffers are kept. For modules written for the member axis, such as an objective's log-normaliser."""
    _stack_tensors(module, members, [name for name, _ in module.named_parameters()])
    return module


def member_slice(
    state: dict[str, torch.Tensor], member: int, shapes: dict[str, torch.Size | None]
) -> dict[str, torch.Tensor]:
    """A state dict of one member: each entry named in ``shapes`` indexed at ``member`` (and given the single-run
    shape there, None: as indexed), the others (and stacked state not created yet, such as the chains before the
    first step) as they are."""
    sliced = {}
    for name, value in state.items():
        if name in shapes and value.numel():
            value = value[member] if shapes[name] is None else value[member].reshape(shapes[name])
            value = value.clone()
        sliced[name] = value
    return sliced
