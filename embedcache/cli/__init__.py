"""The ``embedcache`` command line: each command parses options, builds a config and calls one function.

Commands by phase: :mod:`~embedcache.cli.data` (phantom, encode, info), :mod:`~embedcache.cli.train`
(finetune, export), :mod:`~embedcache.cli.evaluation` (score, predict, evaluate); what they share
is :mod:`~embedcache.cli.common`. torch and the models are imported inside the commands, so
``embedcache --help`` is instant.
"""

from __future__ import annotations

import click

from embedcache import __version__
from embedcache.cli import data, evaluation, train
from embedcache.cli.common import Group


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="embedcache")
def main():
    """Fine-tune Segment Anything's mask decoder on CT against cached image embeddings.

    Phase one, `encode`, runs the frozen image encoder once per slice that holds a target label
    and stores the embeddings in HDF5; phase two trains only the mask decoder against that cache.
    """


for command in (data.phantom, data.encode, train.finetune, train.export, evaluation.score, evaluation.evaluate,
                evaluation.predict, evaluation.annotate, data.info):
    main.add_command(command)


if __name__ == "__main__":
    main()
