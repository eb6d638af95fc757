"""Stigmer local runner: run a Claude agent in a workspace, streamed to a local daemon.

    python runner.py "add a --verbose flag to cli.py"     # run one task here
    python runner.py --help

(Work in progress: the CLI is being built; see the runner issue.)
"""
import importlib.util
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _project_module(name, alias):
    """Import the project's NAME.py from beside this file, even where a standard-library
    module of the same name comes first on sys.path (the installed console script)."""
    loaded = sys.modules.get(name)
    if loaded is not None and os.path.dirname(os.path.abspath(getattr(loaded, "__file__", None) or "")) == HERE:
        return loaded
    if alias in sys.modules:
        return sys.modules[alias]
    spec = importlib.util.spec_from_file_location(alias, os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return module


stigmer_secrets = _project_module("secrets", "stigmer_secrets")


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    print("stigmer: the runner CLI is not implemented yet (stub); see the runner issue.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
