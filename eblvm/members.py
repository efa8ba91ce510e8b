"""The member axis of an ensemble: S independent runs whose tensors are stacked (docs/methods.md §9).

An ensemble's batch is ``(S, B, d)``, member ``k``'s rows at ``[k]``. Its model and posterior are ``stack``-ed
modules: every parameter and buffer holds the members' values on a leading axis of size S, and each method the
module class lists in ``member_methods`` is computed for all members at once by ``torch.func.vmap`` over
``torch.func.functional_call`` of a single-run template, with the member axis of each input row tensor third
from the end (``(..., S, B, x)``). The autograd calls of the objectives (scores, unrolled steps, the energy's
backward) stay outside the vmap, on the stacked results, and since no operation mixes members, each member's
gradient is the one its run alone would get. Losses keep one value per member (``batch_mean``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence

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
    return values.movedim(-2, 0).reshape(v.shape[0], -1).mean(-1)


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


def _stacked_tensors(module: nn.Module, members: Sequence[nn.Module]) -> None:
    """Replace every parameter and buffer of ``module`` by the members' values stacked on a new leading axis."""
    parameters = {name for name, _ in module.named_parameters()}
    for name in _tensor_names(module):
        stacked = torch.stack([_get(member, name).detach() for member in members])
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
    """The mix-in of a ``stack``-ed module: ``n_members`` runs of one module class, computed together."""

    n_members: int

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


def stack(members: Sequence[nn.Module]) -> StackedModule:
    """One module computing all ``members`` (modules of one class with ``member_methods``) at once: their
    parameters and buffers stacked on a leading member axis (``S = len(members)``), names unchanged."""
    template = members[0]
    if not type(template).member_methods:
        raise ValueError(f"{type(template).__name__} lists no member_methods: it cannot be trained in an ensemble")
    stacked = copy.deepcopy(template)
    _stacked_tensors(stacked, members)
    stacked.__class__ = _ensemble_class(type(template))
    # the template runs each member's computation with that member's tensors substituted; its own never serve
    stacked.__dict__["_caller"] = _MethodCall(copy.deepcopy(template).to("meta"))
    stacked.__dict__["_names"] = _tensor_names(template)
    stacked.n_members = len(members)
    return stacked


def stack_parameters(module: nn.Module, members: Sequence[nn.Module]) -> nn.Module:
    """``module`` (one of ``members``) with each parameter replaced by the members' stacked on a leading axis;
    buffers are kept. For modules written for the member axis, such as an objective's log-normaliser."""
    parameters = dict(module.named_parameters())
    for name, parameter in parameters.items():
        values = torch.stack([_get(member, name).detach() for member in members])
        _set(module, name, values.requires_grad_(parameter.requires_grad), parameter=True)
    return module


def member_slice(state: dict[str, torch.Tensor], member: int, stacked: Iterable[str]) -> dict[str, torch.Tensor]:
    """A state dict of one member: entries named in ``stacked`` indexed at ``member``, the others (and stacked
    state not created yet, such as the chains before the first step) as they are."""
    stacked = set(stacked)
    return {
        name: value[member].clone() if name in stacked and value.numel() else value for name, value in state.items()
    }
