"""The `i2v-farm` command.

    i2v-farm generate  render one image to an MP4 on this machine      (pipeline)
    i2v-farm estimate  predict peak VRAM and time of a request           (pipeline)

Errors a user can fix print `error: <message>` and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline import cli as pipeline_cli
from pipeline.errors import I2VError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="i2v-farm", description="Image-to-video render farm (I2VGen-XL).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
