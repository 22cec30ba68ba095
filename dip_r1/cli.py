"""``dip-r1``: the LightningCLI (fit, validate, test, predict) over a policy module and the detection data, and
``plan``, the memory planner (arithmetic over the recipe: it imports neither torch nor Lightning, so it answers in
a second).

dip-r1 fit --config recipes/quickstart.yaml
dip-r1 fit --config recipes/quickstart.yaml --model.init_args.group_size 4 --trainer.max_steps 10
dip-r1 fit --config recipes/quickstart.yaml --print_config
dip-r1 plan --config recipes/qwen2_5_vl_3b_crowdhuman_qlora.yaml --gpu-memory 24GB   # will it fit?

The Lightning side lives in :mod:`dip_r1.lightning_cli`, imported only for its subcommands.
"""

from __future__ import annotations

import sys


def main(args: list[str] | None = None):
    """Run ``dip-r1`` on ``args`` (default: the command line).

    ``plan``: prints the memory plan and exits with its status (0, or 2 with one ``dip-r1: error:`` line).
    Otherwise the LightningCLI's subcommand: returns the CLI object when ``args`` are given (tests, notebooks),
    None when they come from the command line (the console script hands the return value to ``sys.exit``).
    """
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["plan"]:
        from dip_r1.plan_recipe import main as plan

        status = plan(argv[1:])
        if args is None or status:
            raise SystemExit(status)
        return None
    from dip_r1.lightning_cli import run

    return run(args)


def __getattr__(name: str):
    # DipR1CLI and its helpers, from before the Lightning side moved out of this module
    import dip_r1.lightning_cli

    return getattr(dip_r1.lightning_cli, name)


if __name__ == "__main__":
    main()
