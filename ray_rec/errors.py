"""The exception types a user can cause; the CLI prints these as one line and exits 2.

Input, config and artifact errors are ``ValueError`` subclasses (``InputError``, ``ArtifactError``);
``OSError`` covers unreachable or missing storage (a wrong bucket, a missing file).
"""

from __future__ import annotations


class TrainingError(RuntimeError):
    """Training could not start or finish for a reason the user can act on."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, TrainingError, OSError)
