"""Model providers: the Model seam, model-name resolution and default models.

    import models
    provider, name = models.resolve("claude-sonnet-4-5")   # ("anthropic", "claude-sonnet-4-5")
    model = models.make_model("anthropic/claude-sonnet-4-5")
    reply = model.turn(system_text, tools, messages, on_text=print, cancelled=threading.Event())

Provider SDKs are imported lazily, when a model is made: importing this module is cheap,
so the CLI can resolve names and pick keys without paying for an SDK import.
This module also loads the project's secrets.py, once, for everyone (`project_secrets`).
"""
import importlib
import importlib.util
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
FALLBACK_MODEL = "claude-sonnet-4-5"  # when the installed SDK lists no Sonnet


def _project_module(name, alias):
    """Import the project's NAME.py from beside this file, even where a standard-library
    module of the same name comes first on sys.path (the installed console script)."""
    mine = os.path.realpath(os.path.join(HERE, name + ".py"))
    found = importlib.util.find_spec(name)
    if found is not None and found.origin and os.path.realpath(found.origin) == mine:
        return importlib.import_module(name)  # ours wins on sys.path: one module, one set of classes
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(alias, mine)
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def project_secrets():
    """The project's secrets.py (loaded on first use: list, logs and status never need it)."""
    return _project_module("secrets", "stigmer_secrets")


def model_key_vars():
    """Every provider key variable: hidden from the agent's shell, kept from the daemon, redacted."""
    return tuple(var for p in project_secrets().PROVIDERS.values() for var in (p.env_var, *p.alt_env_vars))


def default_model(provider="anthropic"):
    """The newest Sonnet in the installed SDK's model list, read from its source without importing it."""
    found = importlib.util.find_spec("anthropic")
    try:
        with open(os.path.join(os.path.dirname(found.origin), "types", "model.py")) as f:
            names = re.findall(r'"(claude-sonnet-[0-9][0-9a-z-]*)"', f.read())
    except (OSError, AttributeError, TypeError):
        names = []
    undated = [n for n in names if not re.search(r"-\d{8}$", n)]
    return (undated or names or [FALLBACK_MODEL])[0]
