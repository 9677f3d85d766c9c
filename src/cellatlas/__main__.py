"""``python -m cellatlas``: the command line, as the ``cellatlas`` script."""

from cellatlas.cli import app

app(prog_name="cellatlas")
