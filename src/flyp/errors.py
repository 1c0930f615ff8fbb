"""The errors flyp raises for what a user asked, each carrying its fix in the message.

They live here, below every module that raises them, so that raising one needs no import of the
module that owns the concept (methods raise RecipeError without importing the recipe, predict
raises RunError without importing training). The CLI turns each into one line and exit status 2.
"""

from __future__ import annotations


class RecipeError(ValueError):
    """A recipe that cannot be run, with the key at fault and the fix in the message."""


class RunError(RuntimeError):
    """A run directory that cannot be used as asked."""
