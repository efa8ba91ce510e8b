"""The end-of-run figures of vector models: the learned density beside the data (2-D), and Gibbs samples."""

from __future__ import annotations

from pathlib import Path

from eblvm.callbacks.base import EvaluationCallback, log_image
from eblvm.evaluation.likelihood import has_log_likelihood
from eblvm.evaluation.plots import plot_density, plot_samples
from eblvm.evaluation.settings import EvalConfig
from eblvm.sampling.draw import SamplingConfig, draw_samples

FIGURE_STREAM = 4  # evaluation generator stream (``BilevelModule.evaluation_generator``)


class Figures(EvaluationCallback):
    """At the test, on rank 0: ``<run>/density.png`` (2-D data and a model with a log-likelihood: the data's
    histogram beside ``exp(−F(v) − log Z)``) and ``<run>/samples.png`` (models with a Gibbs sampler, on 2-D or
    image data: ``sampling.n_samples`` chains of ``sampling.gibbs_sweeps`` sweeps, a scatter over the data for
    2-D, a grid of ``E[v|h]`` for images). Image energies draw their grids with ``SampleGrids`` instead."""

    def __init__(self, evaluation: EvalConfig, sampling: SamplingConfig):
        super().__init__()
        self.evaluation, self.sampling = evaluation, sampling

    @staticmethod
    def _draws_density(model, datamodule) -> bool:
        return datamodule.dim == 2 and has_log_likelihood(model)

    @staticmethod
    def _draws_samples(model, datamodule) -> bool:
        return model.has_gibbs_sampler and (datamodule.dim == 2 or datamodule.image_shape is not None)

    def applies(self, model, posterior, objective, datamodule) -> bool:
        return model.image_shape is None and (
            self._draws_density(model, datamodule) or self._draws_samples(model, datamodule)
        )

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        model, datamodule, out = pl_module.model, trainer.datamodule, Path(trainer.default_root_dir)
        generator = pl_module.evaluation_generator(FIGURE_STREAM)
        train = datamodule.splits.train
        if self._draws_density(model, datamodule):
            log_z = self.evaluation.log_partition(model, generator)
            self.figures["density"] = plot_density(model, log_z.value, train.cpu(), out / "density.png")
        if self._draws_samples(model, datamodule):
            # 2-D: draws of v show the density; images: E[v|h], the papers' sample figures.
            mean = datamodule.dim != 2
            samples = draw_samples(model, None, self.sampling, self.sampling.n_samples, generator, mean=mean)
            pixels = datamodule.to_unit
            self.figures["samples"] = plot_samples(
                pixels(samples), pixels(train), out / "samples.png", datamodule.image_shape
            )
        for name, path in self.figures.items():
            log_image(trainer, f"figures/{name}", path)
