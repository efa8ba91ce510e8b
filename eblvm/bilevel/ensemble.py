"""The bi-level step of an ensemble: S independent runs trained together on a member axis (docs/methods.md §9).

``EnsembleModule`` is ``BilevelModule`` with stacked parts (``eblvm.members.stack``): the same iteration, every
operation shared by the members, and each member's numbers its own. Losses have one value per member and the
backward pass takes their sum, whose gradient in member ``k``'s parameters is member ``k``'s alone. Gradient norms,
clipping, learning rates and the finiteness decision are per member. A member whose loss or gradient turns
non-finite is masked: from then on its learning rate is 0 and its gradients are zeroed, so its parameters stay at
their last finite values (its optimizer's moments only decay), the event is recorded, and the others go on; the run
stops only when every member is masked. A member masked at the end of an iteration gets back its q of before
that iteration, so its q too stays at its last finite state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from eblvm.bilevel.module import BilevelModule
from eblvm.bilevel.optim import member_learning_rates
from eblvm.errors import DivergenceError
from eblvm.members import member_norms
from eblvm.noise import MemberGenerators

log = logging.getLogger(__name__)

MEMBERS_KEY = "eblvm_members"


class EnsembleModule(BilevelModule):
    """Trains ``len(seeds)`` runs at once; member ``k`` draws its noise from a generator seeded ``seeds[k]``, as the
    run with that seed alone would (``MemberGenerators``), and learns at ``learning_rates[k]`` (the energy's and
    q's, each a pair ``(a_k, b_k)`` of ``OptimConfig.member_rates``).

    ``member_log(step, member, metrics)`` receives each member's training metrics on the steps whose row Lightning
    writes. ``masked_events`` records each masked member: its step, the quantity and value that were not finite.
    """

    def __init__(
        self,
        *args: Any,
        seeds: Sequence[int],
        energy_rates: tuple[torch.Tensor, torch.Tensor],
        posterior_rates: tuple[torch.Tensor, torch.Tensor],
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.seeds = [int(seed) for seed in seeds]
        self.n_members = len(self.seeds)
        self.rates = {"energy": energy_rates, "posterior": posterior_rates}
        self.register_buffer("active", torch.ones(self.n_members, dtype=torch.bool))
        self.masked_events: list[dict[str, Any]] = []
        self.member_log = None
        self._q_before: list | None = None

    def _new_generator(self) -> MemberGenerators:
        return MemberGenerators(self.seeds, device=self.device)

    def configure_optimizers(self):
        """The optimizers of a single run over the stacked parameters; members with rates of their own get them
        (``member_learning_rates``: left out when every member has the configured rate)."""
        optimizers, schedulers = super().configure_optimizers()
        for optimizer, level in zip(optimizers, ("energy", "posterior"), strict=False):
            scale, shift = self.rates[level]
            own_rates = not (bool((scale == 1).all()) and bool((shift == 0).all()))
            for group in optimizer.param_groups:
                group["lr_scale"] = scale.to(self.device) if own_rates else None
                group["lr_shift"] = shift.to(self.device) if own_rates else None
                group["member_mask"] = None
        return optimizers, schedulers

    def _backward(self, loss: torch.Tensor) -> None:
        super()._backward(loss.sum())

    def _grad_norm(self, params) -> torch.Tensor:
        return member_norms([p.grad for p in params if p.grad is not None], self.n_members).to(self.device)

    def _posterior_state(self, optimizer, scheduler) -> None:
        """Copies of q's weights and optimizer moments before the iteration, from which a member masked at its end
        gets back its q (``_finite``); nothing for the base class to restore (an ensemble never skips)."""
        self._q_before = None
        if self.trains_posterior:
            params = list(self.posterior.parameters())
            state = optimizer.optimizer.state
            self._q_before = [
                (p, p.detach().clone(), {k: v.clone() for k, v in state.get(p, {}).items() if torch.is_tensor(v)})
                for p in params
            ]
        return None

    def _restore_members(self, members: list[int]) -> None:
        """q's weights and moments of ``members`` as they were before this iteration."""
        optimizer = self._as_list(self.optimizers())[1].optimizer if self._q_before else None
        for param, weights, moments in self._q_before or []:
            with torch.no_grad():
                param[members] = weights[members]
                for key, value in optimizer.state.get(param, {}).items():
                    if torch.is_tensor(value) and value.dim():  # moments created in this iteration start at 0
                        value[members] = moments[key][members] if key in moments else 0.0

    def _clip(self, optimizer) -> None:
        """Each member's gradient scaled to norm at most ``optim.clip_grad_norm`` (``torch.nn.utils`` semantics)."""
        params = [p for p in optimizer.param_groups[0]["params"] if p.grad is not None]
        norms = member_norms([p.grad for p in params], self.n_members)
        factors = (self.optim.clip_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p in params:
            p.grad.mul_(factors.reshape((-1,) + (1,) * (p.dim() - 1)))

    def _finite(self, checks: list[tuple[str, torch.Tensor]]) -> bool:
        """Mask the members with a non-finite check (one host copy per iteration); True while any is active."""
        finite = torch.isfinite(torch.stack([value for _, value in checks]))  # (checks, members)
        newly = self.active & ~finite.all(0)
        if bool(newly.any()):
            for member in newly.nonzero().flatten().tolist():
                failed = [(n, float(v[member])) for (n, v), ok in zip(checks, finite[:, member], strict=True) if not ok]
                name, value = failed[0]
                event = {"step": self.global_step, "member": member, "seed": self.seeds[member], "quantity": name}
                self.masked_events.append({**event, "value": value})
                log.warning(
                    "member %d (seed %d) masked at step %d: %s is %s",
                    member,
                    event["seed"],
                    self.global_step,
                    name,
                    value,
                )
            self.active &= ~newly
            self._restore_members(newly.nonzero().flatten().tolist())
            if not bool(self.active.any()):
                raise DivergenceError(
                    self.global_step, f"every member ({self.n_members}) masked; the last: {name}", value
                )
        # the steps leave masked members as they are (no mask, and no cost, while every member is active)
        mask = None if not self.masked_events else self.active.clone()
        for optimizer in self._as_list(self.optimizers()):
            optimizer.optimizer.param_groups[0]["member_mask"] = mask
        return True

    def on_train_start(self) -> None:
        """The members' rates on the module's device (a resumed optimizer's groups come back on the CPU)."""
        for optimizer in self._as_list(self.optimizers()):
            for group in optimizer.optimizer.param_groups:
                for key in ("lr_scale", "lr_shift", "member_mask"):
                    if isinstance(group.get(key), torch.Tensor):
                        group[key] = group[key].to(self.device)

    def _log_training(self, checks: list[tuple[str, torch.Tensor]], optimizer, batch_size: int) -> None:
        """Each member's row: the last lower step's loss and gradient norm, the higher loss, its gradient norm and
        the member's learning rate; the progress bar shows the active members' mean loss."""
        last = dict(checks)
        names = {
            "train/loss": "higher loss",
            "train/grad_norm": "higher gradient norm",
            "train/lower_loss": "lower loss",
            "train/posterior_grad_norm": "lower gradient norm",
        }
        rates = member_learning_rates({**optimizer.param_groups[0], "member_mask": self.active})
        columns = {key: last[check] for key, check in names.items() if check in last} | {"train/lr": rates}
        table = torch.stack([value.detach().float().cpu() for value in columns.values()], dim=1).tolist()
        if self.member_log is not None:
            for member, row in enumerate(table):
                self.member_log(self.global_step, member, dict(zip(columns, row, strict=True)))
        active_loss = last["higher loss"][self.active]
        self.log(
            "loss",
            active_loss.mean() if len(active_loss) else torch.nan,
            prog_bar=True,
            logger=False,
            batch_size=batch_size,
        )

    def validation_step(self, v: torch.Tensor, batch_idx: int) -> None:
        """Nothing: each member is evaluated as a run of its own (``eblvm.ensemble.MemberEvaluation``)."""

    def test_step(self, v: torch.Tensor, batch_idx: int) -> None:
        """Nothing: each member is tested as a run of its own."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[MEMBERS_KEY] = {"seeds": self.seeds, "masked_events": list(self.masked_events)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.masked_events = list(checkpoint.get(MEMBERS_KEY, {}).get("masked_events", []))
