"""Evaluation callbacks for generative image models: reconstructions through an encoder and a generator, and
out-of-distribution detection by the free energy (docs/methods.md §8)."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch

from eblvm.callbacks.base import EvaluationCallback, log_image, network_mode, stage_of
from eblvm.errors import ConfigError, require
from eblvm.evaluation.ood import auroc, out_of_distribution_rows
from eblvm.evaluation.plots import save_image_grid
from eblvm.evaluation.settings import EvalConfig
from eblvm.objectives.bidvl import reconstruction_errors

# The seed of the generated out-of-distribution sets (uniform, constant, shuffled): the same sets for every run.
OOD_SET_SEED = 4
RECONSTRUCTION_GRID_IMAGES = 32  # images shown beside their reconstructions


def _split_rows(datamodule, stage: str) -> torch.Tensor:
    return datamodule.splits.test if stage == "test" else datamodule.splits.val


class Reconstructions(EvaluationCallback):
    """``reconstruction_mse_per_pixel`` and ``reconstruction_sse_per_image``: the squared error of the stage's images
    (validation or test) against ``G(μ_ψ(v))``, on the data's scale, as a mean over pixels and as a sum over each
    image's pixels (mean over images); and a grid of the first images, each beside its reconstruction, saved as
    ``<run>/reconstructions/<stage>_step<N>.png`` and sent to W&B. For objectives that train a generator with an
    encoder (BiDVL), in ``evaluation.network_mode``."""

    logged = ("reconstruction_mse_per_pixel", "reconstruction_sse_per_image")

    def __init__(self, evaluation: EvalConfig):
        super().__init__()
        self.evaluation = evaluation
        self.facts["network_mode"] = evaluation.network_mode

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return objective.needs_generator and posterior is not None and model.image_shape is not None

    @torch.no_grad()
    def _reconstruct(self, pl_module, rows: torch.Tensor) -> torch.Tensor:
        encoder, generator_net = pl_module.posterior, pl_module.generator_net
        return torch.cat(
            [
                generator_net(encoder.mean(encoder(chunk.to(pl_module.device)))).cpu()
                for chunk in rows.split(pl_module.trainer.datamodule.eval_batch_size)
            ]
        )

    def _measure(self, trainer: pl.Trainer, pl_module) -> None:
        stage = stage_of(trainer)
        rows = _split_rows(trainer.datamodule, stage)
        with network_mode(pl_module, self.evaluation.network_mode):
            reconstructions = self._reconstruct(pl_module, rows)
        errors = reconstruction_errors(rows, reconstructions)
        pl_module.log_dict(
            {
                f"{stage}/reconstruction_mse_per_pixel": errors["per_pixel_mean"],
                f"{stage}/reconstruction_sse_per_image": errors["per_image_sum"],
            },
            batch_size=1,
        )
        if trainer.is_global_zero:
            self._save_grid(trainer, stage, rows, reconstructions)

    def _save_grid(self, trainer: pl.Trainer, stage: str, rows: torch.Tensor, reconstructions: torch.Tensor) -> None:
        """Images and reconstructions interleaved, so each row of the grid shows pairs side by side."""
        n = min(RECONSTRUCTION_GRID_IMAGES, len(rows))
        pairs = torch.stack([rows[:n], reconstructions[:n]], dim=1).flatten(0, 1)
        images = trainer.datamodule.to_unit(pairs).reshape(-1, *trainer.datamodule.image_shape)
        path = Path(trainer.default_root_dir) / "reconstructions" / f"{stage}_step{trainer.global_step:07d}.png"
        save_image_grid(images, path, nrow=16)
        log_image(trainer, f"{stage}/reconstructions", path)
        if stage == "test":
            self.figures["reconstructions"] = path

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)


class OutOfDistribution(EvaluationCallback):
    """``auroc_<set>``: the AUROC of the score ``−F(v)`` between the stage's first ``evaluation.ood_samples`` images
    (validation or test, in-distribution) and each set of ``evaluation.ood_sets``, in ``evaluation.network_mode``.
    For models with a free energy on images. The sets are built (and their files read) when the run is built, in
    [0, 1] pixels, then put on the data's scale."""

    def __init__(self, evaluation: EvalConfig):
        super().__init__()
        self.evaluation = evaluation
        self.logged = tuple(f"auroc_{self.set_key(name)}" for name in evaluation.ood_sets)
        self.facts["network_mode"] = evaluation.network_mode
        self._sets: dict[str, torch.Tensor] = {}

    @staticmethod
    def set_key(name: str) -> str:
        """The metric name of a set: ``folder:<path>`` is ``folder_<folder name>``."""
        return f"folder_{Path(name.split(':', 1)[1]).name}" if name.startswith("folder:") else name

    def applies(self, model, posterior, objective, datamodule) -> bool:
        if not self.evaluation.ood_sets:
            return False
        require(
            model.has_free_energy and model.image_shape is not None,
            "evaluation.ood_sets",
            list(self.evaluation.ood_sets),
            f"scores images by their free energy, which {type(model).__name__} lacks or does not have for images: "
            "use []",
        )
        test = datamodule.to_unit(datamodule.splits.test)
        generator = torch.Generator().manual_seed(OOD_SET_SEED)
        for name in self.evaluation.ood_sets:
            try:
                rows = out_of_distribution_rows(
                    name,
                    self.evaluation.ood_samples,
                    datamodule.image_shape,
                    test,
                    generator,
                    self.evaluation.ood_data_dir,
                )
            except ConfigError as error:
                raise error.with_prefix("evaluation") from None
            self._sets[self.set_key(name)] = datamodule.from_unit(rows)
        return True

    @torch.no_grad()
    def _scores(self, pl_module, rows: torch.Tensor) -> torch.Tensor:
        batch = pl_module.trainer.datamodule.eval_batch_size
        return torch.cat([-pl_module.model.free_energy(c.to(pl_module.device)).cpu() for c in rows.split(batch)])

    def _measure(self, trainer: pl.Trainer, pl_module) -> None:
        stage = stage_of(trainer)
        inside = _split_rows(trainer.datamodule, stage)[: self.evaluation.ood_samples]
        with network_mode(pl_module, self.evaluation.network_mode):
            in_scores = self._scores(pl_module, inside)
            values = {key: auroc(in_scores, self._scores(pl_module, rows)) for key, rows in self._sets.items()}
        pl_module.log_dict({f"{stage}/auroc_{key}": value for key, value in values.items()}, batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)
