"""The `label`, `label-export` and `label-import` commands of `python -m pipeline` (docs/feedback.md)."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

from pipeline.labeling.server import serve
from pipeline.labeling.store import (
    CORRECTION_PREFERRED,
    LabelError,
    check_labeler,
    export,
    export_labels_jsonl,
    export_samples_jsonl,
    import_labels,
    is_session,
    start_session,
)
from pipeline.recipe.config import ConfigError


def add_label_commands(sub) -> None:
    """The `label`, `label-export` and `label-import` subcommands of `python -m pipeline`."""
    try:
        default_labeler = getpass.getuser()
    except (KeyError, OSError):
        default_labeler = "anonymous"
    p = sub.add_parser("label", help="label responses in a local web page (samples them from a checkpoint first)")
    p.add_argument("source", nargs="?", help="checkpoint folder, or a recipe (its sft model, else its ppo model); "
                                             "not needed when the prompts carry responses")
    p.add_argument("--prompts", help="JSONL/JSON/parquet/datasets folder with `prompt` (or `messages`) and optional `responses`")
    p.add_argument("--out", required=True, help="session folder (created, or resumed when it exists)")
    p.add_argument("--responses", type=int, default=4, metavar="K", help="responses sampled per prompt (default 4)")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    p.add_argument("--labeler", default=default_labeler, help=f"name stored with each judgement (default {default_labeler})")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-dir", help="where the page's Export button publishes (default OUT/export)")
    e = sub.add_parser("label-export", help="publish a session's judgements as reward/SFT datasets, or as JSONL")
    e.add_argument("session")
    e.add_argument("--out", help="export folder: rankings/, ratings/, pairs/, sft/, judgements.jsonl, manifest.json")
    e.add_argument("--validation-fraction", type=float, default=0.1)
    e.add_argument("--correction-preferred", choices=CORRECTION_PREFERRED, default="all_bad",
                   help="rank a correction above the responses: when marked all bad (default), always, never")
    e.add_argument("--samples-jsonl", help="also write the prompts and responses as JSONL (for another labeling tool)")
    e.add_argument("--labels-jsonl", help="also write the latest judgements as JSONL (the label-import format)")
    i = sub.add_parser("label-import", help="append judgements from a labels JSONL file to a session")
    i.add_argument("file")
    i.add_argument("--dir", required=True, help="session folder (created from the file's prompts and responses if new)")
    i.add_argument("--labeler", help="labeler of lines that name none")


def run_label_command(args) -> int:
    try:
        if args.command == "label":
            if args.source is None and args.prompts is None and not is_session(Path(args.out)):
                raise LabelError("give a checkpoint or recipe to sample from, or --prompts with responses")
            store = start_session(Path(args.out), Path(args.prompts) if args.prompts else None, args.source,
                                  args.responses, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, seed=args.seed)
            serve(store, check_labeler(args.labeler), args.port,
                  Path(args.export_dir) if args.export_dir else store.folder / "export")
            return 0
        if args.command == "label-export":
            if not (args.out or args.samples_jsonl or args.labels_jsonl):
                raise LabelError("nothing to do: give --out, --samples-jsonl and/or --labels-jsonl")
            if args.samples_jsonl:
                print(f"wrote {export_samples_jsonl(Path(args.session), Path(args.samples_jsonl))} prompts to {args.samples_jsonl}")
            if args.labels_jsonl:
                print(f"wrote {export_labels_jsonl(Path(args.session), Path(args.labels_jsonl))} judgements to {args.labels_jsonl}")
            if args.out:
                manifest = export(Path(args.session), Path(args.out), args.validation_fraction, args.correction_preferred)
                m = manifest["metrics"]
                rows = ", ".join(f"{k}: {sum(v.values())}" for k, v in m["rows"].items())
                print(f"published {args.out} ({m['judgements']} judgements by {len(m['labelers'])} labeler(s); rows {rows})")
                overall = m["agreement"]["overall"]
                if overall["compared_pairs"]:
                    print(f"labeler agreement {overall['agreement_rate']:.3f} on {overall['compared_pairs']} pairs; "
                          f"mean Kendall tau {overall['kendall_tau']}")
            return 0
        if args.command == "label-import":
            n = import_labels(Path(args.file), Path(args.dir), args.labeler)
            print(f"imported {n} judgements into {args.dir}")
            return 0
    except (LabelError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    raise ValueError(args.command)
