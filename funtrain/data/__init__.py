"""Data: in-memory datasets, batching, loaders for digits and MNIST IDX files, prefetch."""

from funtrain.data.checks import check_batch, check_leading_dims
from funtrain.data.dataset import ArrayDataset, Batch, Loader
from funtrain.data.digits import load_digits
from funtrain.data.mnist import IDXFormatError, load_mnist, parse_idx, read_idx
from funtrain.data.prefetch import prefetch

__all__ = ["check_batch", "check_leading_dims", "ArrayDataset", "Loader", "Batch",
           "load_digits", "read_idx", "parse_idx", "load_mnist", "IDXFormatError", "prefetch"]
