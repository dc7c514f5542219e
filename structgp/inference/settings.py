"""Scoped numerical settings: ``with structgp.settings(method="cg", cg_tol=1e-8): ...``."""

from structgp._config import METHODS, Settings, current, settings

__all__ = ["METHODS", "Settings", "current", "settings"]
