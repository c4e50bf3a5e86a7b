"""`python -m hvsim.shim serve ...`: the shim process without the full hvsim CLI."""
from .cli import shim_app

shim_app()
