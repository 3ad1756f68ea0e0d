"""The `i2v-farm` command.

    i2v-farm up        run the farm on this machine (Ctrl-C stops it)
    i2v-farm submit    send a job to a running farm (--wait: progress bar, MP4)
    i2v-farm status    a job, or the farm's classes and queues
    i2v-farm cancel    cancel a queued or running job
    i2v-farm join      print the `ray start` line that joins this GPU node to a fleet
    i2v-farm gc        delete results older than a cut-off from storage
    i2v-farm token     create, list or revoke API tokens
    i2v-farm simulate  simulate a fleet on a workload trace (virtual time)
    i2v-farm plan      the cheapest fleet that meets an interactive p95 wait
    i2v-farm adapters  register (add) and list LoRA adapters
    i2v-farm generate  render one image to an MP4 on this machine, no farm (pipeline)
    i2v-farm estimate  predict peak VRAM and time of a request           (pipeline)

Errors a user can fix print `error: <message>` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.join import add_join_command
from pipeline import cli as pipeline_cli
from pipeline.errors import I2VError

from . import adapters_cli, auth, client, launcher, retention
from .fleet import cli as fleet_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i2v-farm", description="Image-to-video render farm (I2VGen-XL).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    launcher.add_commands(sub)
    client.add_commands(sub)
    add_join_command(sub)
    retention.add_commands(sub)
    auth.add_commands(sub)
    fleet_cli.add_commands(sub)
    adapters_cli.add_commands(sub)
    pipeline_cli.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except I2VError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
