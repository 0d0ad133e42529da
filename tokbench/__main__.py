"""`python -m tokbench` runs the CLI."""

from tokbench.cli import app

app(prog_name="tokbench")
