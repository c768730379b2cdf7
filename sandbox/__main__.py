"""``python -m sandbox up|down|status|seed|env|fingerprint``: the shared sandbox stack."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sandbox import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sandbox",
        description=(
            "The sandbox stack (Redis, gateway, Prometheus, SeaweedFS S3) for the demo and tests."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start everything (idempotent); seed Redis when empty")
    p_up.add_argument("--no-seed", action="store_true", help="do not seed an empty Redis")
    p_down = sub.add_parser("down", help="stop and remove the containers and SeaweedFS")
    p_down.add_argument(
        "--purge", action="store_true", help="also delete the state dir (all sandbox data)"
    )
    sub.add_parser("status", help="print what runs and answers; exit 1 unless all is up")
    sub.add_parser("env", help="print `export` lines pointing Proxilion DR at the sandbox")
    sub.add_parser(
        "fingerprint",
        help="print what a test run must leave unchanged (containers, lasting Redis data, "
        "Pushgateway groups, S3 objects outside test prefixes)",
    )
    p_seed = sub.add_parser("seed", help="add session data to Redis, then SAVE")
    p_seed.add_argument("--sessions", type=int, default=2000)
    p_seed.add_argument("--redis-url", default=stack.REDIS_URL)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="sandbox: %(message)s", stream=sys.stderr)
    try:
        if args.command == "env":
            print(stack.env_exports())
            return 0
        if args.command == "fingerprint":
            from sandbox.fingerprint import fingerprint

            print(json.dumps(fingerprint(), indent=2, sort_keys=True))
            return 0
        if args.command == "up":
            result: object = stack.up(seed_when_empty=not args.no_seed)
        elif args.command == "down":
            result = stack.down(purge=args.purge)
        elif args.command == "status":
            report = stack.status()
            print(json.dumps(report, indent=2))
            return 0 if report["ok"] else 1
        else:
            result = stack.seed(args.redis_url, args.sessions).as_dict()
    except stack.SandboxError as exc:
        print(f"sandbox: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
