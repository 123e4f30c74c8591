"""Training of the learned garment segmenter (the ``segmenter`` detector) on CCP pixel labels.

``snapshop train-detector ../shared/datasets/ccp-dev --parity even --out DIR`` (or ``python -m
snapshop.train.segmenter`` with the same arguments) fits a head on the even image ids (250 KB;
about 1 min of features and 5 min of training on a busy 2-core machine) and leaves the odd
ones for a held-out score; ``--parity odd`` gives the other fold of a two-fold
cross-validation. The shipped model (``detect/weights/``) was fitted end to end on a GPU on all
ccp-dev ids (``--parity all --finetune-blocks 11``, its card has the command) once the two
folds had scored the recipe. Add ``--cache FILE.pkl`` to reuse the trunk features between runs.

Two modes, one per config:

- :class:`HeadConfig` (:mod:`.head`, :mod:`.samples`): the frozen EfficientNet-Lite0 trunk
  runs once per photo and its mirror image, and only the small head trains, with per-pixel
  cross-entropy against CCP's labels mapped to other / upper (top, outwear) / lower
  (trousers, shorts, skirt) / dress (dress, romper). Synthetic person-free images
  (``negatives``) teach it that empty scenes hold no garment.
- :class:`FinetuneConfig` (``--finetune-blocks N``; :mod:`.finetune`, :mod:`.photos`): the
  stem and blocks ``0..N-1`` train with the head on augmented photos, on a GPU when there is
  one; it also writes ``garment_seg_trunk.npz``, the fine-tuned trunk tensors.

``--trunk efficientnet_lite2`` (a larger trunk, in both modes) and ``--body-channels``
(BlazePose's body channels as extra head inputs, the pose prior; head-only) are issue #21's
design options.

``--prefix P`` names the files ``P`` + the usual names, so several models fit one flat folder
(load one with ``--detector segmenter:DIR/Pgarment_seg.json``). Only torch, numpy, Pillow,
OpenCV and the Lite0 weights package are needed (for a GPU machine)::

    snapshop train-detector DATA --parity even --finetune-blocks 11 \\
        --epochs 60 --device cuda --workers 6 --out OUT --prefix ft320_
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from snapshop.allocator import keep_freed_memory
from snapshop.data.ccp import list_images
from snapshop.train.segmenter.config import (
    AUX_CLASSES,
    FINETUNE_ONLY,
    IGNORE,
    DetectorTraining,
    FinetuneConfig,
    HeadConfig,
    detector_training,
    num_train_classes,
    segmenter_label_table,
)
from snapshop.train.segmenter.finetune import (
    build_finetune_net,
    fit_finetune,
    fold_aux_head,
    train_finetune,
    trunk_overlay,
    write_finetuned,
)
from snapshop.train.segmenter.head import fit_head, train_head
from snapshop.train.segmenter.photos import (
    AugmentedImages,
    TrainImage,
    canvas_size,
    load_training_images,
    negative_training_images,
    paste_person,
    recolour_garments,
    render_sample,
)
from snapshop.train.segmenter.pseudo import (
    PseudoLabelConfig,
    constrained_labels,
    pseudo_label_pairs,
    read_tags,
    write_pseudo_labels,
)
from snapshop.train.segmenter.samples import (
    Sample,
    build_samples,
    load_or_build_samples,
    synthetic_negative_images,
    synthetic_negatives,
)


def train_detector(run: DetectorTraining) -> dict[str, Any]:
    """Train the segmenter as ``run`` says (head only or fine-tuned) and write the model files
    into ``run.out``; returns the model card.

    With ``run.tags`` it self-trains (issue #21): the teacher (``run.teacher``, or a model
    first trained here on the labelled photos alone, written with the prefix
    ``PREFIX + "teacher_"``) labels the tagged photos under their tags into the folder
    ``PREFIX + "pseudo_labels"``, then the model trains on both."""
    keep_freed_memory()
    if run.tags is not None:
        run = replace(run, tags=None, teacher=None, pseudo_labels=label_tagged_photos(run))
    if isinstance(run.model, FinetuneConfig):
        return fit_finetune(run)
    return fit_head(run)


def label_tagged_photos(run: DetectorTraining) -> Path:
    """Write the pseudo-label folder of ``run.tags`` (see :func:`train_detector`); its path."""
    from snapshop.detect.segmenter import CARD_FILE, SegmenterDetector
    from snapshop.models.runtime import TRAINING_PRECISION

    assert run.tags is not None
    read_tags(run.tags)  # a bad tags file fails now, not after the teacher's training
    teacher = run.teacher
    if teacher is None:
        prefix = f"{run.prefix}teacher_"
        train_detector(replace(run, tags=None, teacher=None, prefix=prefix))
        teacher = run.out / f"{prefix}{CARD_FILE}"
    detector = SegmenterDetector(teacher, gate=False, precision=TRAINING_PRECISION)
    folder = run.out / f"{run.prefix}pseudo_labels"
    write_pseudo_labels(detector, run.tags, folder, teacher=str(teacher))
    return folder


__all__ = [
    "AUX_CLASSES",
    "FINETUNE_ONLY",
    "IGNORE",
    "AugmentedImages",
    "DetectorTraining",
    "FinetuneConfig",
    "HeadConfig",
    "PseudoLabelConfig",
    "Sample",
    "TrainImage",
    "build_finetune_net",
    "build_samples",
    "canvas_size",
    "constrained_labels",
    "detector_training",
    "fit_finetune",
    "fit_head",
    "fold_aux_head",
    "list_images",
    "load_or_build_samples",
    "load_training_images",
    "negative_training_images",
    "paste_person",
    "pseudo_label_pairs",
    "num_train_classes",
    "recolour_garments",
    "render_sample",
    "segmenter_label_table",
    "synthetic_negative_images",
    "synthetic_negatives",
    "train_detector",
    "train_finetune",
    "train_head",
    "trunk_overlay",
    "write_finetuned",
    "write_pseudo_labels",
]
