"""``deploy/traffic/traffic.py`` as a module (``deploy/`` is no package): what
``python traffic.py`` runs in the compose stack's ``traffic`` service, loaded once for the
tests that drive it."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from tests.deploy.kustomize import DEPLOY

SCRIPT = DEPLOY / "traffic" / "traffic.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deploy_traffic", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


traffic = _load()
