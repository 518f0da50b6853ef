"""The seed's module name, kept for users: `from model import ...` gives the factorisers, the loss
and the checkpoint format, which live in lowrank/model.py."""

from lowrank.model import *  # noqa: F401,F403
