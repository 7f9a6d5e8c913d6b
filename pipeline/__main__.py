"""Command line: `python -m pipeline {run,plan,config} RECIPE [KEY=VALUE ...]`, `report RUN_DIR`, `push`.

    python -m pipeline run recipes/tiny.yaml                  # every stage not yet done
    python -m pipeline plan recipes/tiny.yaml                 # status and command of each stage
    python -m pipeline run recipes/tiny.yaml --only pretrain stages.pretrain.max_steps=10
    python -m pipeline config recipes/tiny.yaml               # the resolved recipe, nothing run
    python -m pipeline report runs/tiny                       # runs/tiny/report.md with plots
    python -m pipeline push runs/tiny/pretrain/model --repo ORG/NAME [--private] [--revision BRANCH]
    python -m pipeline label runs/tiny/sft/model --prompts prompts.jsonl --out labels/   # web page; docs/feedback.md
    python -m pipeline label-export labels/ --out feedback/   # reward datasets: feedback/{rankings,ratings,pairs,sft}
    python -m pipeline label-import labels.jsonl --dir labels/
"""

from __future__ import annotations

import argparse
import sys

import yaml

from pipeline.recipe.config import ConfigError, to_dict
from pipeline.recipe.schema import load_recipe
from pipeline.runner.run import format_plan, plan, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "run the stages that are not done"), ("plan", "show what run would do; runs nothing"),
                       ("config", "print the resolved recipe; runs nothing")):
        p = sub.add_parser(name, help=text)
        p.add_argument("recipe")
        p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE, e.g. stages.pretrain.max_steps=10")
        p.add_argument("--only", action="append", metavar="STAGE", help="run only this stage (repeatable)")
        p.add_argument("--force", action="append", metavar="STAGE", help="re-run this stage even if done")
    from pipeline.hub.push import add_push_arguments, cli_push

    add_push_arguments(sub.add_parser("push", help="upload a published model, tokenizer or dataset to a hub repo"))
    report = sub.add_parser("report", help="(re)write RUN_DIR/report.md and its plots from the published stages")
    report.add_argument("run_dir")
    from pipeline.labeling.cli import add_label_commands, run_label_command

    add_label_commands(sub)
    args = parser.parse_args(argv)
    if args.command in ("label", "label-export", "label-import"):
        return run_label_command(args)
    if args.command == "push":
        return cli_push(args)
    if args.command == "report":
        from pipeline.runner.report import build_report

        try:
            print(f"wrote {build_report(args.run_dir)}")
        except FileNotFoundError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        recipe = load_recipe(args.recipe, args.overrides)
        if args.command == "config":
            print(yaml.safe_dump({**to_dict(recipe), "settings": to_dict(recipe.settings)}, sort_keys=False))
            return 0
        if args.command == "plan":
            print(format_plan(recipe, plan(recipe, args.only, args.force)))
            return 0
        return run(recipe, args.only, args.force)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
