"""The `ckv` command line: one click group, one sub-group or command per job.

Each job module defines its click command(s); this file only groups them. Commands import
their heavy dependencies (torch, pyspark, lmdb) lazily so `ckv --help` stays fast.
"""

from __future__ import annotations

import importlib

import click

# (group or command name, "module:attribute") — attributes are click commands or groups.
_COMMANDS: list[tuple[str, str]] = [
    ("data", "collectivekv.jobs.prepare:data"),
    ("train", "collectivekv.jobs.train:train"),
    ("experiment", "collectivekv.jobs.train:experiment"),
    ("prefill", "collectivekv.jobs.prefill:prefill_cmd"),
    ("store", "collectivekv.jobs.store:store"),
    ("report", "collectivekv.jobs.report:report"),
    ("score", "collectivekv.jobs.score:score"),
    ("serve", "collectivekv.jobs.serve:serve"),
    ("eval", "collectivekv.jobs.eval:eval_cmd"),
    ("capacity", "collectivekv.jobs.capacity:capacity"),
    ("refresh", "collectivekv.jobs.refresh:refresh_cmd"),
    ("analyze", "collectivekv.jobs.analysis:analyze"),
]


class _LazyGroup(click.Group):
    """A click group whose sub-commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(name for name, _ in _COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        for name, target in _COMMANDS:
            if name == cmd_name:
                module_name, attr = target.split(":")
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as exc:  # a job not written yet
                    if exc.name == module_name:
                        return None
                    raise
                return getattr(module, attr)
        return None


@click.group(cls=_LazyGroup)
def main() -> None:
    """CollectiveKV: compact user KV caches for sequential recommendation."""


if __name__ == "__main__":
    main()
