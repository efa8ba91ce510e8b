"""Datasets as train/validation/test ``Splits``, and the DataModule that batches them."""

from eblvm.data.datamodule import EBLVMDataModule
from eblvm.data.files import freyface, tensor_file
from eblvm.data.images import celeba, cifar10, fashion_mnist, image_folder, mnist, svhn
from eblvm.data.splits import Splits, split_by_fractions
from eblvm.data.toy import checkerboard, digits, eight_gaussians, moons, rings, swiss_roll

__all__ = [
    "EBLVMDataModule",
    "Splits",
    "celeba",
    "checkerboard",
    "cifar10",
    "digits",
    "eight_gaussians",
    "fashion_mnist",
    "freyface",
    "image_folder",
    "mnist",
    "moons",
    "rings",
    "split_by_fractions",
    "svhn",
    "swiss_roll",
    "tensor_file",
]
