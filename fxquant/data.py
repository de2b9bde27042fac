"""Fashion-MNIST from local IDX files — Debian's ``dataset-fashion-mnist`` or a torchvision folder. No downloads.

Where the files are looked for, in order: the ``root`` argument, the ``FXQUANT_DATA`` environment variable,
``/usr/share/datasets/fashion-mnist`` (Debian). A root may hold the IDX files directly (gzipped or not), or be
a torchvision ``FashionMNIST`` folder (``root/FashionMNIST/raw/``).
"""

from __future__ import annotations

import copy
import gzip
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from fxquant.train.augment import AUGMENTS, augment_image

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
MEAN, STD = 0.2860, 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class DataNotFoundError(FileNotFoundError):
    """Fashion-MNIST is not on this machine; the message says how to get it."""


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file (optionally gzipped) into a uint8 tensor of its declared shape."""
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
    return data.reshape(shape)


def _candidates(root: str | Path | None) -> list[Path]:
    roots = [Path(root)] if root is not None else []
    if os.environ.get("FXQUANT_DATA"):
        roots.append(Path(os.environ["FXQUANT_DATA"]))
    roots.append(DEBIAN_DIR)
    out = []
    for r in roots:
        out += [r, r / "FashionMNIST" / "raw", r / "raw"]
    return out


def _locate(name: str, root: str | Path | None) -> Path:
    for folder in _candidates(root):
        for suffix in ("", ".gz"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    searched = ", ".join(str(p) for p in _candidates(root))
    raise DataNotFoundError(
        f"Fashion-MNIST file {name} not found (looked in: {searched}). Install it with "
        "`sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), or set FXQUANT_DATA to a folder that "
        "holds the IDX files or a torchvision FashionMNIST folder."
    )


class FashionMNIST(Dataset):
    """Images as normalised float tensors (1, 28, 28) and labels, with optional train-time augmentation.

    ``augment``: ``none``; ``standard`` (random crop with 2-pixel padding, horizontal flip); ``strong`` (standard
    plus random erasing of a square — the second view consistency losses use).

    Augmentation draws from torch's default generator, as torchvision transforms do: ``torch.manual_seed``
    before a run fixes it, and a DataLoader gives each worker its own seed. (A generator owned by the dataset
    would carry its state from one run to the next in a process, and be copied identically into every worker.)
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: str = "none"):
        if augment not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
        self.images = ((images.float() / 255.0 - MEAN) / STD).unsqueeze(1)
        self.labels = labels.long()
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        if self.augment != "none":
            image = augment_image(image, self.augment)
        return image, self.labels[index]


def fashion_mnist(
    split: str = "train", root: str | Path | None = None, augment: str = "none", limit: int | None = None
) -> FashionMNIST:
    """The Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) split; ``limit`` keeps the first N samples.

    Example usage::

        train = fxquant.data.fashion_mnist("train", augment="standard")
        loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True)
    """
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    images_file, labels_file = FILES[split]
    images = read_idx(_locate(images_file, root))
    labels = read_idx(_locate(labels_file, root))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return FashionMNIST(images, labels, augment)


class RepeatChannels(Dataset):
    """Grayscale images repeated to 3 channels, for models whose first convolution takes RGB (torchvision's).

    Example usage::

        train = RepeatChannels(fashion_mnist("train"))      # (3, 28, 28) images
    """

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data[index]
        return x.expand(3, -1, -1), y

    @property
    def augment(self) -> str:
        return getattr(self.data, "augment", "none")

    @augment.setter
    def augment(self, kind: str) -> None:  # on a copy (fxquant.train.coreset.plain_view): leave the original be
        self.data = copy.copy(self.data)
        self.data.augment = kind


def with_channels(data: Dataset, channels: int) -> Dataset:
    """``data`` with as many image channels as a model's first convolution takes (1, or 3 repeated)."""
    if channels == 1:
        return data
    if channels != 3:
        raise ValueError(
            f"the model's first convolution takes {channels} channels; Fashion-MNIST gives 1 (or 3 repeated)"
        )
    return RepeatChannels(data)
