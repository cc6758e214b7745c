"""The store's hot paths, this checkout against a baseline commit, measured side by side in one run.

Prints `record_checkpoint`'s median cost at 10 to 5,000 prior messages and
the resume rebuild of a 5,000-message task (`get` without checkpoints, fresh
connection, boot heap frozen), for this checkout's store ("new") and for
the store of a baseline commit ("old", by default where this branch left
``main``), with the ratio new / old. Both run the same measuring code
(`checkpoint_cost.longhaul_costs` and `load_costs`), each in its own
subprocess that imports `longhaul` from a folder of symlinks into one
checkout (the editable install's finder bypassed), in alternating rounds, so
machine noise falls on both alike. The baseline is checked out with
``git worktree add --detach`` into a temporary folder and removed afterwards.
Nothing here asserts on timings.

    python bench/store_refactor.py                      # about 2 minutes
    python bench/store_refactor.py --quick              # about 30 s
    python bench/store_refactor.py --baseline-ref main  # against another commit
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from checkpoint_cost import FULL, HISTORY_LENGTHS, QUICK

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent

#: Runs in a fresh interpreter: import longhaul from `root` only, measure, print JSON.
RUNNER = r"""
import json, sys
root, bench, quick = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
def installed_editable(hook):
    return "editable" in (getattr(hook, "__module__", None) or "").lower()
sys.meta_path[:] = [finder for finder in sys.meta_path if not installed_editable(finder)]
sys.path_hooks[:] = [hook for hook in sys.path_hooks if not installed_editable(hook)]
sys.path_importer_cache.clear()
sys.path[:0] = [root, bench]
import gc, tempfile
from pathlib import Path
import longhaul.models
assert longhaul.models.__file__.startswith(root), longhaul.models.__file__
from longhaul.models import TaskStore
from checkpoint_cost import FULL, QUICK, longhaul_costs, load_costs, step_update
plan = QUICK if quick else FULL
with tempfile.TemporaryDirectory(prefix="longhaul-bench-") as folder:
    store = TaskStore(Path(folder) / "store.db")
    for step in range(1, 21):
        store.record_checkpoint(step_update("warm-up", step, 2 * step))
    gc.disable()
    try:
        costs = longhaul_costs(store, plan)
    finally:
        gc.enable()
    _messages, rebuild, _full = load_costs(store, plan)
    store.close()
print(json.dumps({"checkpoint_median_ms": {str(n): c.median_ms for n, c in costs.items()},
                  "rebuild_median_ms": rebuild.median_ms, "code": longhaul.models.__file__}))
"""


def import_root(checkout: Path, folder: Path) -> Path:
    """A folder holding `longhaul/` as the wheel lays it out, made of symlinks into `checkout`."""
    package = folder / "longhaul"
    package.mkdir(parents=True)
    for entry in (checkout / "longhaul").iterdir():  # __init__.py, _lazy.py, py.typed ...
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for name in ("models", "worker"):
        (package / name).symlink_to(checkout / name, target_is_directory=True)
    return folder


def measure(root: Path, quick: bool) -> dict[str, Any]:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", RUNNER, str(root), str(BENCH), "1" if quick else "0"],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measuring {root} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_commit(ref: str) -> str:
    """`ref` as a commit; ``merge-base`` means where HEAD left main. Exits naming `--baseline-ref` if unknown."""
    try:
        if ref == "merge-base":
            return _git("merge-base", "HEAD", "main")
        return _git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError as exc:
        problem = (exc.stderr or "").strip() or f"git exited with {exc.returncode}"
        raise SystemExit(f"--baseline-ref {ref!r}: no such commit in {REPO} ({problem}); "
                         "a shallow clone may lack main's history: git fetch --unshallow") from None


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def run(*, quick: bool, rounds: int, ref: str) -> dict[str, Any]:
    commit = baseline_commit(ref)
    with tempfile.TemporaryDirectory(prefix="longhaul-store-refactor-") as temp:
        baseline = Path(temp) / "baseline"
        _git("worktree", "add", "--detach", "--quiet", str(baseline), commit)
        try:
            roots = {"old": import_root(baseline, Path(temp) / "old"), "new": import_root(REPO, Path(temp) / "new")}
            samples: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
            for round_index in range(rounds):
                order = ("old", "new") if round_index % 2 == 0 else ("new", "old")
                for side in order:
                    samples[side].append(measure(roots[side], quick))
        finally:
            _git("worktree", "remove", "--force", str(baseline))

    def median_of(side: str, pick: Any) -> float:
        return statistics.median(pick(sample) for sample in samples[side])

    figures: dict[str, Any] = {"baseline_commit": commit, "rounds": rounds,
                               "plan": vars(QUICK if quick else FULL), "checkpoint_median_ms": {}}
    for length in HISTORY_LENGTHS:
        old = median_of("old", lambda s, n=length: s["checkpoint_median_ms"][str(n)])
        new = median_of("new", lambda s, n=length: s["checkpoint_median_ms"][str(n)])
        figures["checkpoint_median_ms"][length] = {"old": old, "new": new, "ratio": new / old}
    old = median_of("old", lambda s: s["rebuild_median_ms"])
    new = median_of("new", lambda s: s["rebuild_median_ms"])
    figures["rebuild_median_ms"] = {"old": old, "new": new, "ratio": new / old}
    figures["per_round"] = samples
    return figures


def print_table(figures: dict[str, Any]) -> None:
    print(f"this checkout (new) against {figures['baseline_commit'][:12]} (old), "
          f"{figures['rounds']} alternating rounds, medians of the rounds' medians")
    print()
    print(f"{'measure':<42}  {'old ms':>8}  {'new ms':>8}  {'new/old':>7}")
    for length, row in figures["checkpoint_median_ms"].items():
        label = f"record_checkpoint at {length:,} prior messages"
        print(f"{label:<42}  {row['old']:>8.3f}  {row['new']:>8.3f}  {row['ratio']:>6.2f}x")
    row = figures["rebuild_median_ms"]
    label = f"resume rebuild at {HISTORY_LENGTHS[-1]:,} messages"
    print(f"{label:<42}  {row['old']:>8.3f}  {row['new']:>8.3f}  {row['ratio']:>6.2f}x")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds; about 30 s")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds per side (default 3, quick 1)")
    add_comparison_options(parser)
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    if rounds < 1:
        parser.error("--rounds: must be at least 1")
    report(run(quick=args.quick, rounds=rounds, ref=args.baseline_ref), as_json=args.json, print_table=print_table)


def add_comparison_options(parser: argparse.ArgumentParser) -> None:
    """``--baseline-ref`` and ``--json``, which every new-against-old bench takes."""
    parser.add_argument("--baseline-ref", default="merge-base",
                        help="the commit to compare with (default: where HEAD left main)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")


def report(figures: dict[str, Any], *, as_json: bool, print_table: Any) -> None:
    """Print the figures as JSON or as the bench's table."""
    if as_json:
        print(json.dumps(figures, indent=2))
    else:
        print_table(figures)


if __name__ == "__main__":
    main()
