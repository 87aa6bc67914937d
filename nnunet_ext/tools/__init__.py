"""The `nnunet-ext` commands, one module each with its domain code, and what they share.

cli.py dispatches to the command modules, each of which has `add_arguments(parser)` and `main(args)`;
report.py prints and writes every table, CSV, JSON and chart; options.py holds the arguments several
commands take; timing.py measures time and memory in fresh processes; memory.py measures a
network's training memory and footprint (for `plan` and `benchmark-memory`); workspace.py runs the
stock nnUNetv2_* commands; plans_io.py reads a planned dataset.

The library (everything outside this package) never imports from here.
"""
