"""Evaluation callbacks for models of images and for posteriors: sample grids, FID/KID, the linear probe."""

from __future__ import annotations

import math
from pathlib import Path

import pytorch_lightning as pl
import torch

from eblvm.callbacks.base import EvaluationCallback, log_image, network_mode, stage_of
from eblvm.errors import require
from eblvm.evaluation.images import InceptionFeatures, fid_kid, image_features, linear_probe
from eblvm.evaluation.plots import save_image_grid
from eblvm.evaluation.settings import EvalConfig
from eblvm.sampling.draw import GENERATOR_MODE, SamplingConfig, draw_samples

# Evaluation generator streams (``BilevelModule.evaluation_generator``).
GRID_STREAM, FID_STREAM = 2, 3


def _training_rows(datamodule, seed: int) -> torch.Tensor:
    """The training rows in an order fixed by ``seed`` (the same on every rank)."""
    train = datamodule.train_data
    return train[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))]


def _sample_images(pl_module, sampling: SamplingConfig, rows: torch.Tensor, generator, mode: str) -> torch.Tensor:
    """One sample per row of ``rows`` (the rows whose posterior means ``via_q`` holds h at), as [0, 1] images,
    drawn in chunks of ``sampling.n_images`` with the networks in ``mode`` (``network_mode``)."""
    model, shape = pl_module.model, pl_module.model.image_shape
    with network_mode(pl_module, mode):
        chunks = [
            draw_samples(
                model,
                pl_module.posterior,
                sampling,
                len(chunk),
                generator,
                chunk.to(pl_module.device),
                generator_net=pl_module.generator_net,
            )
            for chunk in rows.split(sampling.n_images)
        ]
    return pl_module.trainer.datamodule.to_unit(torch.cat(chunks)).reshape(-1, *shape)


class SampleGrids(EvaluationCallback):
    """A grid of ``sampling.n_images`` samples at every validation and at the test, saved as
    ``<run>/samples/<stage>_step<N>.png`` and sent to W&B (rank 0 draws them), with the networks in
    ``evaluation.network_mode``. Deep energies on images."""

    def __init__(self, evaluation: EvalConfig, sampling: SamplingConfig):
        super().__init__()
        self.evaluation, self.sampling = evaluation, sampling
        self.facts["network_mode"] = evaluation.network_mode

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return model.image_shape is not None

    def _draw(self, trainer: pl.Trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        stage = stage_of(trainer)
        rows = _training_rows(trainer.datamodule, pl_module.seed)[: self.sampling.n_images]
        generator = pl_module.evaluation_generator(GRID_STREAM)
        grid = _sample_images(pl_module, self.sampling, rows, generator, self.evaluation.network_mode)
        path = Path(trainer.default_root_dir) / "samples" / f"{stage}_step{trainer.global_step:07d}.png"
        save_image_grid(grid.cpu(), path)
        log_image(trainer, f"{stage}/samples", path)
        if stage == "test":
            self.figures["samples"] = path

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._draw(trainer, pl_module)


class ImageQuality(EvaluationCallback):
    """``fid``, ``kid_mean``, ``kid_std`` of ``evaluation.fid_samples`` samples against as many training images,
    at every validation and at the test (docs/methods.md §8).

    The real images and the rows that ``via_q`` samples are conditioned on are disjoint sets of training rows, so
    no sample is drawn from the posterior of an image it is compared with. Under DDP each rank draws and embeds
    its share of both sets on its own device, the features of all ranks are pooled, and every rank computes the
    FID of the pooled sets (the same value on all ranks). The Inception features of the real images are computed
    once and kept.
    """

    logged = ("fid", "kid_mean", "kid_std")

    def __init__(self, evaluation: EvalConfig, sampling: SamplingConfig, sampling_mode: str):
        super().__init__()
        self.evaluation, self.sampling = evaluation, sampling
        self.facts["network_mode"] = evaluation.network_mode
        self._extractor: InceptionFeatures | None = None
        self._real_features: torch.Tensor | None = None
        # via_q's samples are conditioned on training images apart from the real set; a generator's on none
        self._conditioned = sampling_mode != GENERATOR_MODE

    def applies(self, model, posterior, objective, datamodule) -> bool:
        if model.image_shape is None or self.evaluation.fid_samples == 0:
            return False
        n_train, n_fid = len(datamodule.train_data), self.evaluation.fid_samples
        limit = n_train // 2 if self._conditioned else n_train
        require(
            n_fid <= limit,
            "evaluation.fid_samples",
            n_fid,
            "FID compares samples with as many training images"
            + (", and via_q conditions the samples on other training images" if self._conditioned else "")
            + f": at most {limit} for {n_train} training rows",
        )
        return True

    def _features(self, trainer: pl.Trainer, pl_module, images: torch.Tensor) -> torch.Tensor:
        if self._extractor is None:
            self._extractor = InceptionFeatures(self.evaluation.inception_weights).eval()
        self._extractor.to(pl_module.device)
        features = image_features(self._extractor, images.clamp(0, 1)).to(pl_module.device)
        if trainer.world_size > 1:
            features = trainer.strategy.all_gather(features).flatten(0, 1)
        return features.cpu()

    def _rank_share(self, trainer: pl.Trainer, rows: torch.Tensor) -> torch.Tensor:
        """This rank's ``⌈n/world⌉`` of ``rows``, cycled, so that the pooled shares in rank order start with every
        row once."""
        n = len(rows)
        share = math.ceil(n / trainer.world_size)
        return rows[(trainer.global_rank * share + torch.arange(share)) % n]

    def _measure(self, trainer: pl.Trainer, pl_module) -> None:
        n = self.evaluation.fid_samples
        rows = _training_rows(trainer.datamodule, pl_module.seed)
        if self._real_features is None:
            real = trainer.datamodule.to_unit(self._rank_share(trainer, rows[:n])).reshape(
                -1, *pl_module.model.image_shape
            )
            self._real_features = self._features(trainer, pl_module, real)[:n]
        conditioning = self._rank_share(trainer, rows[n : 2 * n] if self._conditioned else rows[:n])
        generator = pl_module.evaluation_generator(FID_STREAM)
        fakes = _sample_images(pl_module, self.sampling, conditioning, generator, self.evaluation.network_mode)
        fake_features = self._features(trainer, pl_module, fakes)[:n]
        quality = fid_kid(self._real_features, fake_features, self.evaluation.kid_subset_size, pl_module.seed)
        stage = stage_of(trainer)
        pl_module.log_dict({f"{stage}/{key}": value for key, value in quality.items()}, batch_size=1)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._measure(trainer, pl_module)


class LinearProbe(EvaluationCallback):
    """``test/linear_probe_accuracy``: a logistic regression on q's posterior means, fitted on the training rows
    and scored on the test rows (docs/methods.md §8), at the test; labelled data and a posterior only. Rank 0
    fits it and shares the value."""

    logged = ("linear_probe_accuracy",)

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return posterior is not None and datamodule.labels("train") is not None

    @torch.no_grad()
    def _means(self, pl_module, rows: torch.Tensor) -> torch.Tensor:
        posterior = pl_module.posterior
        return torch.cat([posterior.mean(posterior(chunk.to(pl_module.device))).cpu() for chunk in rows.split(1000)])

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        datamodule = trainer.datamodule
        accuracy = torch.zeros((), dtype=torch.float64)
        if trainer.is_global_zero:
            train, test = self._means(pl_module, datamodule.train_data), self._means(pl_module, datamodule.splits.test)
            accuracy += linear_probe(train, datamodule.labels("train"), test, datamodule.labels("test"))
        accuracy = trainer.strategy.broadcast(accuracy, src=0)
        pl_module.log("test/linear_probe_accuracy", float(accuracy), batch_size=1)
