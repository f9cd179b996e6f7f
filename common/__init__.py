"""Shared ground floor of CleanCredit: model loading, data, rollout and verification.

Nothing here is method-specific and nothing here imports a trainer.
"""


class UsageError(Exception):
    """A mistake in the user's input: its message is one line saying what is wrong and how to fix it.

    Trainers catch it at start-up and exit with that line instead of a traceback.
    """
