"""Importing this module registers every kopf handler of the operator."""

from . import adapterdeployment, finetunejob  # noqa: F401
