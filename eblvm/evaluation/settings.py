"""``evaluation.*``: the settings of the evaluation callbacks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from eblvm.errors import require, require_choice, require_count
from eblvm.evaluation.likelihood import LogPartition, log_partition
from eblvm.evaluation.ood import check_set_name
from eblvm.models.base import EnergyModel

NETWORK_MODES = ("eval", "train")


@dataclass(frozen=True)
class EvalConfig:
    """``evaluation.*``: how log Z is computed (exact up to ``exact_max_h_dim`` latents for models that also offer
    AIS, else AIS with ``ais_temperatures`` × ``ais_chains``), and the gradient bias of BiSM
    (``gradient_bias_repeats`` noise and posterior draws on the first ``gradient_bias_batch`` validation rows;
    0 repeats turns it off). For images: FID and KID of ``fid_samples`` samples against as many training images
    (0 turns them off) with the Inception weights file ``inception_weights``, and KID subsets of
    ``kid_subset_size``. For models with a free energy on images: the AUROC of ``−F`` between ``ood_samples``
    in-distribution images and each set of ``ood_sets`` (``eblvm.evaluation.ood``; SVHN and CelebA read from
    ``ood_data_dir``). ``network_mode`` is the mode (``eval`` or ``train``: batch statistics) the networks are
    in while the generative metrics (reconstructions, OOD scores) are computed."""

    exact_max_h_dim: int = 20
    ais_temperatures: int = 1000
    ais_chains: int = 500
    gradient_bias_repeats: int = 20
    gradient_bias_batch: int = 100
    fid_samples: int = 0
    inception_weights: str | None = None
    kid_subset_size: int = 1000
    ood_sets: list[str] = field(default_factory=list)
    ood_samples: int = 1000
    ood_data_dir: str | None = None
    network_mode: str = "eval"

    def __post_init__(self):
        for name in self.ood_sets:
            check_set_name(name)
        require_count("ood_samples", self.ood_samples, 2)
        require_choice("network_mode", self.network_mode, NETWORK_MODES)
        for key in ("ais_temperatures", "ais_chains", "gradient_bias_batch", "kid_subset_size"):
            require_count(key, getattr(self, key), 2)
        for key in ("gradient_bias_repeats", "fid_samples"):
            require_count(key, getattr(self, key), 0)
        if self.fid_samples:
            require(
                self.inception_weights is not None and Path(self.inception_weights).is_file(),
                "inception_weights",
                self.inception_weights,
                "FID needs the Inception weights file weights-inception-2015-12-05-6726825d.pth (see the README, "
                "'Image metrics'), or evaluation.fid_samples=0",
            )

    def log_partition(self, model: EnergyModel, generator: torch.Generator | None = None) -> LogPartition:
        return log_partition(model, self.exact_max_h_dim, self.ais_temperatures, self.ais_chains, generator)

    def describe_log_partition(self, log_z: LogPartition) -> str:
        return log_z.describe(self.ais_temperatures, self.ais_chains)
