"""catfeat's weights vocabulary: what ``--weights`` / ``weights=`` accept and what a cache records.

:class:`Weights` parses "imagenet", "none" / "none(seed=N)", a weights file, or the "sha256:<hex>"
identity a cache records for a file; the helpers turn a value into a builder's argument or a
cache's identity and back. No framework is imported here, so the registry and the builders
(:mod:`catfeat.models.lite`) both read it without importing each other.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

WeightsArg = Any  # a Weights, or what Weights.parse reads: "imagenet", None, "none(seed=N)", a path


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message says what to do."""


_WEIGHTS_HELP = ("pass 'imagenet', 'none' (random; 'none(seed=N)' names the seed) or a path to a "
                 ".h5/.weights.h5 file (a .pth file for the Lite backbones)")
_SEEDED = re.compile(r"none\(seed=(-?\d+)\)")
_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_KINDS = ("imagenet", "none", "file", "sha256")


@dataclass(frozen=True)
class Weights:
    """One value of catfeat's weights vocabulary, parsed once.

    ``kind`` is "imagenet"; "none" (random init; ``seed`` when the value named one, as the cache
    attribute ``none(seed=N)`` does); "file" (``path``, an existing weights file); or "sha256"
    (``digest``: the identity a cache records for a file, which names weights but cannot build them).
    ``str(w)`` writes the value back so that ``Weights.parse(str(w)) == w``.
    """

    kind: str
    path: Path | None = None
    seed: int | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise WeightsError(f"weights kind must be one of {', '.join(_KINDS)}, got {self.kind!r}")
        if (self.kind == "file") != (self.path is not None):
            raise WeightsError("a 'file' Weights needs a path, and only it has one")
        if self.seed is not None and (self.kind != "none" or type(self.seed) is not int):
            raise WeightsError(f"only random ('none') weights take a seed (an int), got {self.kind} / {self.seed!r}")
        if (self.kind == "sha256") != (self.digest is not None) or (
                self.digest is not None and not _DIGEST.fullmatch("sha256:" + self.digest)):
            raise WeightsError("a 'sha256' Weights needs a digest of 64 lowercase hex digits, and only it has one")

    @classmethod
    def parse(cls, value: WeightsArg) -> Weights:
        """Read None, 'none'/'random', 'none(seed=N)', 'imagenet' (any case), 'sha256:<64 hex>', a path
        to an existing file, or a ``Weights`` (returned as is). Raises ``WeightsError`` otherwise."""
        if isinstance(value, Weights):
            return value
        if value is None:
            return cls("none")
        if isinstance(value, str):
            low = value.lower()
            if low in ("none", "random"):
                return cls("none")
            if low == "imagenet":
                return cls("imagenet")
            seeded = _SEEDED.fullmatch(low)
            if seeded:
                return cls("none", seed=int(seeded.group(1)))
            if low.startswith("sha256:"):
                digest = _DIGEST.fullmatch(low)
                if not digest:
                    raise WeightsError(f"weights identity {value!r} is not 'sha256:' and 64 hex digits")
                return cls("sha256", digest=digest.group(1))
        elif not isinstance(value, os.PathLike):
            raise WeightsError(f"weights must be a string, a path or None, got {type(value).__name__} {value!r}; "
                               + _WEIGHTS_HELP)
        path = Path(value).expanduser()
        if not path.is_file():
            raise WeightsError(f"weights file {str(path)!r} does not exist; " + _WEIGHTS_HELP)
        return cls("file", path=path)

    @classmethod
    def from_identity(cls, identity: str) -> Weights:
        """Read what a cache records (:meth:`identity`): 'imagenet', 'none(seed=N)' or 'sha256:<hex>';
        never a file path. Raises ``WeightsError`` for anything else."""
        text = str(identity)
        if text == "imagenet" or _SEEDED.fullmatch(text) or _DIGEST.fullmatch(text):
            return cls.parse(text)
        raise WeightsError(f"{text!r} is not a weights identity ('imagenet', 'none(seed=N)' or 'sha256:<hex>')")

    def identity(self, seed: int = 0) -> str:
        """What a cache records: 'imagenet', 'none(seed=N)' (this value's seed, else ``seed``) or
        'sha256:<hex>' (of the file's bytes)."""
        if self.kind == "none":
            return f"none(seed={self.seed_or(seed)})"
        if self.kind == "file":
            return "sha256:" + file_sha256(self.path)
        return str(self)

    def seed_or(self, seed: int) -> int:
        """The seed of random weights: the one this value names, else ``seed``."""
        return self.seed if self.seed is not None else seed

    def argument(self) -> str | None:
        """The ``weights`` argument of a Keras-applications-style builder: 'imagenet', None or the file
        path. A 'sha256' identity has no file, so it raises ``WeightsError``."""
        if self.kind == "sha256":
            raise WeightsError(f"the weights {self} name a file by its SHA-256 only: pass that file "
                               "(weights=PATH / --weights PATH)")
        if self.kind == "file":
            return str(self.path)
        return "imagenet" if self.kind == "imagenet" else None

    def __str__(self) -> str:
        if self.kind == "none":
            return "none" if self.seed is None else f"none(seed={self.seed})"
        if self.kind == "file":
            return str(self.path)
        if self.kind == "sha256":
            return "sha256:" + self.digest
        return self.kind


def normalize_weights(weights: WeightsArg) -> str | Path | None:
    """None/'none'/'random'/'none(seed=N)' -> None; 'imagenet' stays; else an existing file's Path."""
    w = Weights.parse(weights)
    return w.path if w.kind == "file" else w.argument()


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_identity(weights: WeightsArg, seed: int = 0) -> str:
    """What the cache records as the weights: 'imagenet', 'none(seed=N)' or 'sha256:<hex>'."""
    return Weights.parse(weights).identity(seed)


def cache_weights(identity: str) -> tuple[str | None, int]:
    """Weights argument and seed that rebuild a cache's recorded ``weights`` ('imagenet', 'none(seed=N)').
    A file identity ('sha256:...') or anything else raises ``ValueError``: the file must be given."""
    try:
        w = Weights.from_identity(identity)
    except WeightsError:
        w = None
    if w is None or w.kind == "sha256":
        raise ValueError(f"the cache's weights are {identity!r}: pass the weights file explicitly "
                         "(weights=PATH / --weights PATH)")
    return w.argument(), w.seed_or(0)
