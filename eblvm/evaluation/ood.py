"""Out-of-distribution detection (docs/methods.md §8): the image sets a model's in-distribution test images are
told apart from, and the AUROC of a score that should be higher on the in-distribution images.

Every set is built in [0, 1] pixels, as rows ``(n, C·H·W)`` of the in-distribution data's image shape:

- ``uniform``: pixels drawn independently from U(0, 1);
- ``constant``: images of one random colour each (every pixel the same value per channel);
- ``shuffled``: in-distribution test images with their pixel positions permuted (channels kept together);
- ``svhn``: the SVHN test images, and ``celeba32``: CelebA's test images cropped 140 and resized to 32, both read
  from local files under ``evaluation.ood_data_dir`` as ``data=svhn`` and ``data=celeba`` read them;
- ``folder:<path>``: the images of a folder, resized and centre-cropped to the data's size.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from eblvm.data import celeba, image_folder, svhn
from eblvm.errors import ConfigError, require

GENERATED_SETS = ("uniform", "constant", "shuffled")
FILE_SETS = ("svhn", "celeba32")
FOLDER_PREFIX = "folder:"


def check_set_name(name: str) -> None:
    """Raise ``ConfigError`` on ``evaluation.ood_sets`` unless ``name`` is a set this module builds."""
    require(
        name in GENERATED_SETS + FILE_SETS or (name.startswith(FOLDER_PREFIX) and len(name) > len(FOLDER_PREFIX)),
        "ood_sets",
        name,
        f"each set must be one of {', '.join(GENERATED_SETS + FILE_SETS)} or {FOLDER_PREFIX}<path to an image folder>",
    )


def uniform_noise(n: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``n`` images of independent U(0, 1) pixels, as rows."""
    return torch.rand(n, torch.Size(image_shape).numel(), generator=generator)


def constant_images(n: int, image_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``n`` images each of one colour drawn from U(0, 1) per channel, as rows."""
    channels, height, width = image_shape
    colours = torch.rand(n, channels, 1, 1, generator=generator)
    return colours.expand(n, channels, height, width).reshape(n, -1).clone()


def pixel_shuffled(rows: torch.Tensor, image_shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """``rows`` (images) with the H·W pixel positions of each image permuted at random, its channels moving
    together, so every image keeps its pixel values and loses its structure."""
    channels, height, width = image_shape
    images = rows.reshape(len(rows), channels, height * width)
    order = torch.argsort(torch.rand(len(rows), height * width, generator=generator), dim=1)
    return torch.gather(images, 2, order[:, None, :].expand_as(images)).reshape(rows.shape)


def _file_set(name: str, data_dir: str | os.PathLike | None, image_shape: tuple[int, int, int]) -> torch.Tensor:
    if name.startswith(FOLDER_PREFIX):
        channels, size, _ = image_shape
        splits = image_folder(name.removeprefix(FOLDER_PREFIX), size=size, grayscale=channels == 1)
        return torch.cat([splits.train, splits.val, splits.test])
    require(data_dir is not None, "ood_data_dir", data_dir, f"the {name} set is read from local files: set its folder")
    root = Path(data_dir)
    return svhn(root / "svhn", n_val=1).test if name == "svhn" else celeba(root, crop=140, size=32).test


def out_of_distribution_rows(
    name: str,
    n: int,
    image_shape: tuple[int, int, int],
    test_rows: torch.Tensor,
    generator: torch.Generator,
    data_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Up to ``n`` rows of the set ``name`` in [0, 1] pixels; ``test_rows`` are the in-distribution test images in
    [0, 1] (``shuffled`` permutes them)."""
    check_set_name(name)
    if name == "uniform":
        return uniform_noise(n, image_shape, generator)
    if name == "constant":
        return constant_images(n, image_shape, generator)
    if name == "shuffled":
        return pixel_shuffled(test_rows[:n], image_shape, generator)
    rows = _file_set(name, data_dir, image_shape)
    if rows.shape[1] != test_rows.shape[1]:
        raise ConfigError(
            "ood_sets",
            name,
            f"has images of {rows.shape[1]} values, the data's have {test_rows.shape[1]} ({list(image_shape)})",
        )
    return rows[:n]


def auroc(in_scores: torch.Tensor, out_scores: torch.Tensor) -> float:
    """The area under the ROC curve of telling in-distribution (label 1) from out-of-distribution rows by their
    scores (scikit-learn's ``roc_auc_score``): 1 when every in-distribution score is higher, 0.5 for sets the
    score cannot tell apart."""
    from sklearn.metrics import roc_auc_score  # imported when measured, not at start-up

    labels = torch.cat([torch.ones(len(in_scores)), torch.zeros(len(out_scores))])
    scores = torch.cat([in_scores.flatten(), out_scores.flatten()]).double()
    return float(roc_auc_score(labels.numpy(), scores.numpy()))
