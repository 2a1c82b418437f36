"""`python -m pd_serve ...` runs the `pd-serve` command line."""

from pd_serve.cli import main

main()
