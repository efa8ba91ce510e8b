"""Datasets as train/validation/test ``Splits``, and the DataModule that batches them."""

from eblvm.data.datamodule import EBLVMDataModule
from eblvm.data.files import freyface, tensor_file
from eblvm.data.splits import Splits, split_by_fractions
from eblvm.data.toy import checkerboard, digits, eight_gaussians, moons, rings, swiss_roll

__all__ = [
    "EBLVMDataModule",
    "Splits",
    "checkerboard",
    "digits",
    "eight_gaussians",
    "freyface",
    "moons",
    "rings",
    "split_by_fractions",
    "swiss_roll",
    "tensor_file",
]
