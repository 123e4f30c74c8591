"""``python -m snapshop.train.segmenter ARGS``: the same as ``snapshop train-detector ARGS``
(for a machine that runs the package without its console script)."""

import logging

import typer

from snapshop.cli import train_detector

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    typer.run(train_detector)
