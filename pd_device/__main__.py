"""`python -m pd_device ...` runs the `pd-device` command line."""

from pd_device.cli import main

main()
