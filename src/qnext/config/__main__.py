"""`python -m qnext.config show|validate [overrides...]`: print or check the resolved recipe."""
from __future__ import annotations

import argparse

from ..errors import cli_main
from . import load_config, to_yaml, validate_config


@cli_main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qnext.config", description=__doc__)
    ap.add_argument("command", choices=["show", "validate"])
    ap.add_argument("--world-size", type=int, default=None, help="check the layout against this many processes")
    ap.add_argument("overrides", nargs="*", help="Hydra-style overrides: recipe=NAME parallel=8xh100 train.steps=20 ...")
    args = ap.parse_args(argv)
    cfg = load_config(args.overrides)
    if args.command == "show":
        print(to_yaml(cfg), end="")
    else:
        validate_config(cfg, world_size=args.world_size)
        print("recipe OK")
    return 0


if __name__ == "__main__":
    main()
