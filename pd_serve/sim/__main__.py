"""`python -m pd_serve.sim ...`: the `pd-serve sim` commands without the top-level CLI."""

from pd_serve.sim.cli import sim_app

sim_app(prog_name="pd-serve sim")
