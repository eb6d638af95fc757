"""Benchmarks, each a ratio against a baseline measured in the same run.

    python bench.py            # every benchmark
    python bench.py sandbox    # execute() overhead and memory while swallowing output
    python bench.py redact     # streaming Redactor against str.replace
    python bench.py events     # daemon event throughput against a bare gRPC stream
    python bench.py loop       # the whole agent path per turn against a bare SDK loop
    python bench.py --json     # one JSON object per benchmark

The machine is shared and noisy, so every figure is relative to a baseline taken
in the same process, interleaved where possible. No unit test depends on timings.
"""
import json
import statistics
import sys
import time

BENCHES = {}  # name -> function returning a dict of figures


def bench(fn):
    """Register a benchmark under its function name without the bench_ prefix."""
    BENCHES[fn.__name__.removeprefix("bench_")] = fn
    return fn


# ---- sandbox (issue: sandbox.py) ----
# SANDBOX-BENCH-PLACEHOLDER

# ---- redact (issue: secrets.py) ----
# REDACT-BENCH-PLACEHOLDER

# ---- events (issue: daemon.py) ----
# EVENTS-BENCH-PLACEHOLDER

# ---- loop (issue: runner.py) ----
# LOOP-BENCH-PLACEHOLDER


def main(argv=None):
    args = list(sys.argv[1:] if argv is None else argv)
    as_json = "--json" in args
    names = [a for a in args if a != "--json"] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown or "-h" in args or "--help" in args:
        if unknown:
            print(f"unknown benchmark: {', '.join(unknown)}", file=sys.stderr)
        print(__doc__.strip(), file=sys.stderr)
        return 2 if unknown else 0
    for name in names:
        if not as_json:
            print(f"== {name}", flush=True)
        figures = BENCHES[name]()
        if as_json:
            print(json.dumps({"bench": name, **figures}), flush=True)
        else:
            for key, value in figures.items():
                print(f"  {key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
