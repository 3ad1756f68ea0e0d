"""`i2v-farm adapters add NAME FILE [--note]` and `i2v-farm adapters list`: the LoRA registry
(`adapters_url`, see docs/adapters.md) as an operator sees it. Both work on the registry itself
(a directory or S3 prefix, with the farm's settings: `I2V_CONFIG`, `I2V_*`); `list --url` asks a
running farm instead (`GET /v1/adapters`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pipeline.errors import I2VError


def add_commands(subparsers) -> None:
    ad = subparsers.add_parser("adapters", help="register and list LoRA adapters",
                               description="The farm's LoRA adapter registry (adapters_url).")
    sub = ad.add_subparsers(dest="adapters_command", required=True, metavar="ACTION")
    add = sub.add_parser("add", help="check a LoRA against the model's UNet and register it")
    add.add_argument("name", help="adapter name (lower-case letters, digits, . _ -)")
    add.add_argument("file", help="LoRA weights (.safetensors, PEFT layout)")
    add.add_argument("--note", default="", help="a note shown in the listing")
    add.add_argument("--replace", action="store_true", help="replace an adapter of the same name")
    add.add_argument("--model", help="check against this model's UNet (default: the farm's I2V_MODEL)")
    add.add_argument("--adapters-url", dest="adapters_url", help="registry (default: the farm's adapters_url)")
    add.set_defaults(func=cmd_add)
    ls = sub.add_parser("list", help="list the registered adapters")
    ls.add_argument("--adapters-url", dest="adapters_url", help="registry (default: the farm's adapters_url)")
    ls.add_argument("--url", help="ask a running farm (GET URL/v1/adapters) instead of reading the registry")
    ls.add_argument("--json", action="store_true", help="print JSON")
    ls.set_defaults(func=cmd_list)


def _registry(args):
    from .adapter_registry import AdapterRegistry
    from .config import load_settings

    overrides = {"adapters_url": getattr(args, "adapters_url", None), "model": getattr(args, "model", None)}
    return AdapterRegistry(load_settings(overrides))


def cmd_add(args: argparse.Namespace) -> int:
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise I2VError(f"cannot read {path}: {exc.strerror}", field="file") from None
    registry = _registry(args)
    meta = registry.add(args.name, data, note=args.note, replace=args.replace)
    print(f"registered {meta['name']}: rank {meta['rank']}, {len(meta['target_modules'])} layers, "
          f"{meta['bytes'] / 2**20:.2f} MiB, sha256 {meta['sha256'][:16]}... in {registry.url}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    if args.url:
        import requests

        headers = {"Authorization": f"Bearer {os.environ['I2V_TOKEN']}"} if os.environ.get("I2V_TOKEN") else {}
        resp = requests.get(args.url.rstrip("/") + "/v1/adapters", headers=headers, timeout=30)
        if resp.status_code != 200:
            raise I2VError(f"{resp.status_code} from {args.url}: {resp.text[:300]}")
        adapters = resp.json()["adapters"]
    else:
        adapters = _registry(args).list(fresh=True)
    if args.json:
        print(json.dumps(adapters, indent=2))
        return 0
    if not adapters:
        print("no adapters registered", file=sys.stderr)
        return 0
    print(f"{'name':<24}{'rank':>5}{'layers':>8}{'MiB':>9}  {'sha256':<16}  note")
    for m in adapters:
        print(f"{m['name']:<24}{m['rank']:>5}{len(m['target_modules']):>8}{m['bytes'] / 2**20:>9.2f}  "
              f"{m['sha256'][:16]}  {m.get('note') or ''}")
    return 0
