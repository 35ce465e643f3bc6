"""python -m serving rollout status | start NAME:VERSION [--percent N] | promote NAME | rollback NAME

A client of a running service's ``/rollout`` routes (``serving.rollout``), for a shell or a
pipeline: standard library only, the token from ``--token`` or ``$SERVING_AUTH_TOKEN``. It prints
the service's JSON answer; a refusal (a gate, a bad tag) is one line on stderr and exit status 2,
a service that cannot be reached exit status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from model_store.cli import prog, run
from model_store.errors import UsageError


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog("serving", "cnn-serve"), description="Control a running service.")
    commands = parser.add_subparsers(dest="command", required=True)
    rollout = commands.add_parser("rollout", help="shadow, canary, promote and roll back a candidate version")
    actions = rollout.add_subparsers(dest="action", required=True)

    def action(name: str, help: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help)
        parser.add_argument("--url", default="http://127.0.0.1:3000", help="the service (default: %(default)s)")
        parser.add_argument(
            "--token", default=os.environ.get("SERVING_AUTH_TOKEN"), help="bearer token (default: $SERVING_AUTH_TOKEN)"
        )
        return parser

    action("status", help="every rollout under way, with its figures and gates, and the last ends")
    start = action("start", help="put a candidate beside its live model: in shadow (0) or on canary (1-100)")
    start.add_argument("candidate", help="NAME:VERSION of a model registered in the service's store")
    start.add_argument("--percent", type=int, default=0, help="share of requests it answers (default: 0, a shadow)")
    for name, help in (("promote", "make the candidate live, if the gates allow"), ("rollback", "drop the candidate")):
        action(name, help=help).add_argument("model", help="the model's name, e.g. fashion-lenet")
    return parser


def main(args: argparse.Namespace) -> None:
    if args.action == "status":
        path, body = "/rollout", None
    elif args.action == "start":
        path, body = f"/rollout/{args.candidate.split(':')[0]}", {"candidate": args.candidate, "percent": args.percent}
    else:
        path, body = f"/rollout/{args.model}/{args.action}", {}
    request = urllib.request.Request(
        args.url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            **({"authorization": f"Bearer {args.token}"} if args.token else {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=330) as response:  # a start loads and warms up the candidate
            print(json.dumps(json.load(response), indent=2))
    except urllib.error.HTTPError as err:
        try:
            reason = json.load(err).get("error", "")
        except ValueError:
            reason = ""
        raise UsageError(f"{err.code} from {args.url}{path}: {reason or err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        print(f"error: cannot reach {args.url}: {getattr(err, 'reason', err)}", file=sys.stderr)
        sys.exit(1)


def cli(argv: list[str] | None = None) -> int:
    return run(main, get_args_parser(), argv)


if __name__ == "__main__":
    sys.exit(cli())
