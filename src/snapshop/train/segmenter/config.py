"""Settings of garment-segmenter training: the class map, the two modes' frozen configs, a run."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from snapshop.config import check_number
from snapshop.data.ccp import CCP_AUX, CCP_LOWER, CCP_ONE_PIECE, CCP_UPPER, PARITIES, label_table
from snapshop.detect.segmenter import (
    CLASSES,
    DEFAULT_TRUNK,
    DRESS_CLS,
    LOWER_CLS,
    UPPER_CLS,
    SegmenterConfig,
    trunk_spec,
)
from snapshop.errors import ConfigError, ManifestError

log = logging.getLogger(__name__)

IGNORE = 255  # target value of padding pixels: no loss

# Auxiliary training classes (``aux_labels``): more of CCP's labels taught as classes of their
# own, so that legs, stockings, shoes and belts are not one "other" class. The exported head
# folds them back into *other* (:func:`~snapshop.train.segmenter.finetune.fold_aux_head`): the
# detector sees four classes.
AUX_CLASSES: tuple[str, ...] = tuple(CCP_AUX)


def check_rate(value: float, name: str, zero: bool = False) -> None:
    """A ConfigError unless ``value`` is a finite number > 0 (>= 0 with ``zero``): a rate or
    weight of NaN or infinity trains a model of NaNs."""
    if check_number(name, value, 0.0) == 0 and not zero:
        raise ConfigError(f"{name} must be a finite number > 0, not {value}")


def num_train_classes(aux_labels: bool) -> int:
    return len(CLASSES) + (len(AUX_CLASSES) if aux_labels else 0)


def segmenter_label_table(mask_labels_csv: Path, aux_labels: bool = False) -> NDArray[np.uint8]:
    """(256,) CCP label index -> class index in :data:`snapshop.detect.segmenter.CLASSES`
    (dresses and rompers: a class of their own), or past them in :data:`AUX_CLASSES` order
    with ``aux_labels``."""
    groups = {UPPER_CLS: CCP_UPPER, LOWER_CLS: CCP_LOWER, DRESS_CLS: CCP_ONE_PIECE}
    if aux_labels:
        groups |= {len(CLASSES) + i: labels for i, labels in enumerate(CCP_AUX.values())}
    table = label_table(mask_labels_csv, groups)
    # A label file of another dataset (LIP's "upper-clothes") maps nothing to a garment: every
    # pixel would be "other" and the model learn to find nothing, without a word.
    unmapped = [CLASSES[c] for c in (UPPER_CLS, LOWER_CLS, DRESS_CLS) if not (table == c).any()]
    if len(unmapped) == 3:
        raise ManifestError(
            f"{mask_labels_csv}: no label is a garment the segmenter learns; CCP's names are"
            f" needed: upper {', '.join(CCP_UPPER)}; lower {', '.join(CCP_LOWER)};"
            f" dress {', '.join(CCP_ONE_PIECE)}"
        )
    if unmapped:
        log.warning(
            "%s: no label maps to the class(es) %s: the model will not learn them",
            mask_labels_csv, ", ".join(unmapped),
        )  # fmt: skip
    return table


@dataclass(frozen=True)
class HeadConfig:
    """Frozen-trunk training: only the head learns, on cached trunk features of every photo
    and its mirror image (AdamW, one-cycle schedule)."""

    epochs: int = 10
    batch_size: int = 16
    lr: float = 3e-3
    width: int = 48
    dropout: float = 0.3
    dress_weight: float = 1.0
    long_side: int = 320
    negatives: int = 60  # synthetic person-free images
    seed: int = 0
    # copy-paste composites per labelled photo (another labelled person pasted in), made once
    copy_paste: int = 0
    # issue #21, pose as a prior: BlazePose's body channels as extra inputs of the head
    # (:func:`snapshop.detect.pose.body_channels`); the model then runs BlazePose on each look
    body_channels: bool = False
    # issue #21, a larger trunk: the frozen backbone the head reads (a TRUNKS name)
    trunk: str = DEFAULT_TRUNK.backbone

    def __post_init__(self) -> None:
        SegmenterConfig(long_side=self.long_side)  # raises ConfigError for a bad long side
        if self.epochs < 1 or self.batch_size < 1 or self.negatives < 0 or self.width < 1:
            raise ConfigError("epochs, batch_size and width must be >= 1, negatives >= 0")
        copies = self.copy_paste
        if isinstance(copies, bool) or not float(copies).is_integer() or copies < 0:
            raise ConfigError(
                f"copy_paste is a number of composites per photo without --finetune-blocks:"
                f" a whole number >= 0, got {copies}"
            )
        object.__setattr__(self, "copy_paste", int(copies))
        check_rate(self.lr, "lr")
        check_rate(self.dress_weight, "dress_weight")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout must be in [0, 1)")
        if not isinstance(self.body_channels, bool):
            raise ConfigError(f"body_channels must be true or false, not {self.body_channels!r}")
        trunk_spec(self.trunk)  # raises ConfigError for an unknown backbone


@dataclass(frozen=True)
class FinetuneConfig:
    """End-to-end training (the defaults are the GPU script's): the stem and blocks 0..N-1 train
    with the head on photos augmented on the fly; BatchNorm keeps ImageNet's statistics."""

    finetune_blocks: int = 11  # the stem and blocks 0..N-1 train; later blocks stay ImageNet
    epochs: int = 60
    batch_size: int = 16
    lr: float = 3e-3  # head
    trunk_lr: float = 3e-4  # stem and fine-tuned blocks
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd (momentum 0.9, Nesterov)
    schedule: str = "cosine"  # cosine | step (x0.1 at 2/3 and 9/10 of the steps)
    warmup_fraction: float = 0.05
    width: int = 48
    dropout: float = 0.3
    dress_weight: float = 1.0
    long_side: int = 320
    negatives: int = 60
    augment: bool = True
    min_scale: float = 0.75  # random rescale relative to "long side = long_side"
    max_scale: float = 1.25
    jitter: float = 0.25  # brightness / contrast / saturation factors in [1 - j, 1 + j]
    device: str = "auto"  # auto | cuda | cpu
    workers: int = 0
    bf16: bool = True  # autocast on cuda only
    max_train_seconds: float | None = None  # stop early (after an epoch) past this
    seed: int = 0
    overlay_dtype: str = "float32"  # float16 halves garment_seg_trunk.npz (read back as float32)
    aux_labels: bool = False  # train AUX_CLASSES too (folded into "other" at export)
    recolour: float = 0.0  # chance per sample that each garment class gets its own hue / tone
    copy_paste: float = 0.0  # chance per sample that another labelled person is pasted in
    trunk: str = DEFAULT_TRUNK.backbone  # the backbone (a TRUNKS name), issue #21

    def __post_init__(self) -> None:
        SegmenterConfig(long_side=self.long_side)  # raises ConfigError for a bad long side
        most = trunk_spec(self.trunk).blocks[-1] + 1  # blocks past the last map never run
        if not 1 <= self.finetune_blocks <= most:
            raise ConfigError(f"finetune_blocks must be in 1..{most} for {self.trunk}")
        if self.epochs < 1 or self.batch_size < 1 or self.workers < 0 or self.negatives < 0:
            raise ConfigError("epochs and batch_size must be >= 1, workers and negatives >= 0")
        check_rate(self.lr, "lr")
        check_rate(self.trunk_lr, "trunk_lr", zero=True)
        check_rate(self.weight_decay, "weight_decay", zero=True)
        check_rate(self.dress_weight, "dress_weight")
        if self.overlay_dtype not in ("float32", "float16"):
            raise ConfigError(f"overlay_dtype must be float32 or float16, got {self.overlay_dtype}")
        if self.optimizer not in ("adamw", "sgd") or self.schedule not in ("cosine", "step"):
            raise ConfigError("optimizer must be adamw or sgd, schedule cosine or step")
        if self.device not in ("auto", "cuda", "cpu"):
            raise ConfigError("device must be auto, cuda or cpu")
        if not 0 < self.min_scale <= self.max_scale or not 0 <= self.jitter < 1:
            raise ConfigError("need 0 < min_scale <= max_scale and 0 <= jitter < 1")
        if not 0 <= self.recolour <= 1 or not 0 <= self.copy_paste <= 1:
            raise ConfigError("recolour and copy_paste are probabilities: 0..1")
        if not 0 <= self.warmup_fraction < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("warmup_fraction and dropout must be in [0, 1)")
        if self.max_train_seconds is not None and self.max_train_seconds <= 0:
            raise ConfigError("max_train_seconds must be > 0")


@dataclass(frozen=True)
class DetectorTraining:
    """One training run: which CCP photos, which mode (:class:`HeadConfig` or
    :class:`FinetuneConfig`) and where the model goes (``prefix`` + the usual file names)."""

    dataset: Path
    model: HeadConfig | FinetuneConfig = HeadConfig()
    out: Path = Path("garment_seg_model")
    parity: str = "even"
    limit: int | None = None
    prefix: str = ""
    cache: Path | None = None  # frozen-trunk feature cache (.pkl); head training only
    # Issue #21: extra photos labelled by a teacher under their image-level tags
    # (:mod:`snapshop.train.segmenter.pseudo`): a folder made before, or ``tags`` (a ccp-tags
    # tags.csv) labelled by ``teacher`` (a model card) or, without one, by a model this run
    # first trains on the labelled photos alone.
    pseudo_labels: Path | None = None
    tags: Path | None = None
    teacher: Path | None = None

    def __post_init__(self) -> None:
        if self.pseudo_labels is not None and self.tags is not None:
            raise ConfigError("give --pseudo-labels (a folder made before) or --tags, not both")
        if self.teacher is not None and self.tags is None:
            raise ConfigError("--teacher labels the photos of --tags: give --tags too")
        if self.parity not in PARITIES:
            raise ConfigError(f"parity must be one of {', '.join(PARITIES)}, got {self.parity!r}")
        if "/" in self.prefix or "\\" in self.prefix:
            raise ConfigError("prefix is a file name prefix, not a path")
        if self.cache is not None and isinstance(self.model, FinetuneConfig):
            raise ConfigError("the feature cache holds frozen-trunk features: not with fine-tuning")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("limit must be >= 1")

    def command_line(self) -> str:
        """The ``snapshop train-detector`` command that repeats this run (for the model card)."""
        args = [str(self.dataset), "--parity", self.parity, "--out", str(self.out)]
        given = (
            ("limit", self.limit),
            ("cache", self.cache),
            ("pseudo-labels", self.pseudo_labels),
            ("tags", self.tags),
            ("teacher", self.teacher),
        )
        for name, value in given:
            if value is not None:
                args += [f"--{name}", str(value)]
        if self.prefix:
            args += ["--prefix", self.prefix]
        # The command's defaults: HeadConfig's for the options both modes take (so fine-tuning
        # runs 10 epochs unless told otherwise), FinetuneConfig's for the others.
        head, finetune = HeadConfig(), FinetuneConfig()
        for field in fields(self.model):
            value = getattr(self.model, field.name)
            flag = "--" + field.name.replace("_", "-")
            default = getattr(head if hasattr(head, field.name) else finetune, field.name)
            if field.name == "finetune_blocks":
                args += [flag, str(value)]
            elif value == default or value is None:
                continue
            elif isinstance(value, bool):
                args.append(flag if value else "--no-" + flag[2:])
            else:
                args += [flag, str(value)]
        return shlex.join(["snapshop", "train-detector", *args])


# Options that only fine-tuning takes (the command rejects them without --finetune-blocks).
FINETUNE_ONLY = frozenset(
    f.name for f in fields(FinetuneConfig) if f.name not in {g.name for g in fields(HeadConfig)}
) - {"finetune_blocks"}
# Options that only head training takes (rejected with --finetune-blocks).
HEAD_ONLY = frozenset(
    f.name for f in fields(HeadConfig) if f.name not in {g.name for g in fields(FinetuneConfig)}
)


def detector_training(
    dataset: Path,
    *,
    finetune_blocks: int = 0,
    settings: Mapping[str, object] | None = None,
    out: Path = Path("garment_seg_model"),
    parity: str = "even",
    limit: int | None = None,
    prefix: str = "",
    cache: Path | None = None,
    pseudo_labels: Path | None = None,
    tags: Path | None = None,
    teacher: Path | None = None,
) -> DetectorTraining:
    """The run a command line asks for: ``finetune_blocks`` 0 trains the head on the frozen
    trunk (:class:`HeadConfig`), N >= 1 fine-tunes (:class:`FinetuneConfig`). ``settings``:
    the config fields given (None values are left at their defaults)."""
    # Any: the fields' types vary; the config's __post_init__ checks the values.
    given: dict[str, Any] = {k: v for k, v in (settings or {}).items() if v is not None}
    if finetune_blocks:
        head_only = sorted(k for k in HEAD_ONLY & set(given) if given[k] != getattr(HeadConfig, k))
        if head_only:
            raise ConfigError(
                f"--{head_only[0].replace('_', '-')} trains the head on the frozen trunk only:"
                " not with --finetune-blocks"
            )
        given = {k: v for k, v in given.items() if k not in HEAD_ONLY}
        model: HeadConfig | FinetuneConfig = FinetuneConfig(
            finetune_blocks=finetune_blocks, **given
        )
    else:
        only = sorted(FINETUNE_ONLY & set(given))
        if only:
            raise ConfigError(f"--{only[0].replace('_', '-')} needs --finetune-blocks N")
        model = HeadConfig(**given)
    return DetectorTraining(
        dataset, model, out, parity, limit, prefix, cache, pseudo_labels, tags, teacher
    )
