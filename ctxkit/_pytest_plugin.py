"""The ctxkit pytest plugin's former home, kept so that ``-p ctxkit._pytest_plugin`` works.

The plugin is the top-level module ``_ctxkit_pytestplugin`` (the ``pytest11`` entry point), whose
import does not import the ``ctxkit`` package; this module re-exports its fixtures and hooks
(and, being inside the package, imports ctxkit when loaded).
"""

from __future__ import annotations

from _ctxkit_pytestplugin import *  # noqa: F403 - the plugin's fixtures and hooks, by __all__
from _ctxkit_pytestplugin import __all__ as __all__
