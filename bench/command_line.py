"""The command line every benchmark shares: ``--quick`` for CI smoke runs, ``--json`` for scripts."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Optional


def bench_main(doc: str, measure: Callable[[bool], dict[str, Any]], print_table: Callable[[dict[str, Any]], None],
               *, quick_help: str, argv: Optional[list[str]] = None) -> None:
    """Parse the flags, run `measure(quick)` and print its figures as a table (or JSON)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    args = parser.parse_args(argv)
    result = measure(args.quick)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)
