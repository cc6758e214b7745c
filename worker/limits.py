"""Limits the CLI checks before anything heavy is imported (the settings module repeats none of them)."""

#: The most tasks one host may run at once (`--concurrency`, LONGHAUL_CONCURRENCY): one thread each.
MAX_CONCURRENCY = 10_000
