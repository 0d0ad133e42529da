"""`python -m tokbench` runs the CLI; an interrupt while it imports is one line too (tokbench.interrupts)."""

from tokbench.interrupts import handled

with handled():
    from tokbench.cli import app

    app(prog_name="tokbench")
