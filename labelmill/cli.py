"""The ``labelmill`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from labelmill.exitcodes import EXIT_CONFIG, EXIT_INPUT, EXIT_LOCK_HELD, EXIT_OUTPUT, EXIT_WEIGHTS


def _cmd_run(args: argparse.Namespace) -> int:
    from labelmill.config import load_config
    from labelmill.pipelines.label import run
    from labelmill.engine.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        print(f"config OK, label hash {cfg.label_hash()}", file=sys.stderr)
        return 0
    preflight(cfg)
    summary = run(cfg)
    print(json.dumps(summary.as_dict(), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from labelmill.pipelines.demo import run_demo

    result = run_demo(args.out, teachers=args.teachers.split(","), overrides=args.overrides)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_export_coco(args: argparse.Namespace) -> int:
    from labelmill.export.coco import export_coco

    manifest = export_coco(
        args.output, args.dest, images_per_file=args.images_per_file,
        teachers=args.teacher or None, version=args.version,
    )
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from labelmill.export.report import write_report

    path = write_report(args.output, args.dest, max_images=args.max_images, version=args.version)
    print(path)
    return 0


def _cmd_text_embeddings(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from labelmill.config import ConfigError
    from labelmill.store.regions import text_embeddings_table
    from labelmill.teachers.vocab import load_templates, load_vocabulary

    vocabulary = {"file": args.vocabulary_file} if args.vocabulary_file else args.vocabulary
    try:  # cheap checks before any model is built
        load_vocabulary(vocabulary)
        load_templates(args.templates)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.random_init:
        print("=" * 72 + "\nRANDOM WEIGHTS: these text embeddings are for testing the plumbing only\n"
              + "=" * 72, file=sys.stderr)
    table = text_embeddings_table(
        args.model, None if args.random_init else args.pretrained, vocabulary, args.templates,
        allow_random_init=args.random_init, cache_dir=args.cache_dir, device=args.device,
        quick_gelu=None if args.quick_gelu is None else args.quick_gelu == "true",
    )
    pq.write_table(table, args.dest)
    print(json.dumps({"file": args.dest, "classes": table.num_rows,
                      "dim": table.schema.field("embedding").type.list_size,
                      "weights": table.column("weights")[0].as_py()}, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelmill",
        description="Streaming pseudo-labelling of WebDataset image-caption shards with CLIP-family teachers on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="label shards as a config file describes (resumes where a previous run stopped)",
        description="Run the pipeline. Overrides are key.path=value pairs applied to the YAML before "
        "validation, e.g. output.path=/tmp/out teachers.0.image_size=448 filter.min_score=0.3",
    )
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, run nothing")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "demo",
        help="build sample shards from scikit-image's photos and run the whole pipeline offline",
        description="Offline demo on local Ray: writes sample shards, labels them with randomly initialised "
        "teachers (no weights can be downloaded offline; a banner and every row say so), exports COCO "
        "and writes an HTML report.",
    )
    p.add_argument("--out", default="labelmill-demo", help="output folder (default: ./labelmill-demo)")
    p.add_argument("--teachers", default="maskclip", help="comma-separated: maskclip, glip, vild")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides of the demo config")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser(
        "export-coco",
        help="write COCO instances (and grounding) JSON from a run's output",
        description="Stream the committed labels of OUTPUT into sharded COCO JSON files under DEST.",
    )
    p.add_argument("output", help="the run's output.path")
    p.add_argument("dest", help="folder for the COCO files")
    p.add_argument("--images-per-file", type=int, default=50_000, help="images per JSON file (default 50000)")
    p.add_argument("--teacher", action="append", help="only this teacher (repeatable)")
    p.add_argument("--version", help="dataset version: a number or an ISO timestamp (default: the latest)")
    p.set_defaults(func=_cmd_export_coco)

    p = sub.add_parser(
        "report",
        help="write an HTML report with mask overlays and per-class counts",
        description="Render the first images of OUTPUT with their labels, plus per-class and per-status counts.",
    )
    p.add_argument("output", help="the run's output.path")
    p.add_argument("dest", help="HTML file to write")
    p.add_argument("--max-images", type=int, default=24)
    p.add_argument("--version", help="dataset version: a number or an ISO timestamp (default: the latest)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "text-embeddings",
        help="write the ViLD-text classifier: one CLIP prompt-ensemble embedding per class",
        description="Encode every class of a vocabulary with every prompt template, average the "
        "normalised embeddings per class and write them to a Parquet file (no background row: "
        "ViLD learns its background embedding).",
    )
    p.add_argument("dest", help="Parquet file to write")
    p.add_argument("--model", default="ViT-B-16", help="open_clip architecture (default ViT-B-16)")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag or local checkpoint file")
    p.add_argument("--vocabulary", default="coco-80",
                   help="built-in vocabulary: coco-80, coco-stuff-171, pascal-context-59, pascal-voc-20")
    p.add_argument("--vocabulary-file", help="class list file instead (one class per line, 'a, b' synonyms)")
    p.add_argument("--templates", default="maskclip85", help="prompt templates: maskclip85, short or single")
    p.add_argument("--cache-dir", help="open_clip download cache")
    p.add_argument("--quick-gelu", choices=["true", "false"],
                   help="activation of a local checkpoint: true for OpenAI-trained weights (needed for local "
                   "files not in OpenAI's format)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--random-init", action="store_true", help="random weights, for testing only (loud banner)")
    p.set_defaults(func=_cmd_text_embeddings)

    from labelmill.cli_refresh import add_parsers as add_refresh_parsers

    add_refresh_parsers(sub)  # refresh, versions, diff, rollback, vacuum
    return parser


def main(argv: list[str] | None = None) -> int:
    from labelmill.config import ConfigError
    from labelmill.io.shards import ShardListError
    from labelmill.store.commit import OutputConflictError
    from labelmill.store.read import OutputNotFound, VersionNotFound
    from labelmill.store.lock import LockHeld
    from labelmill.teachers.base import WeightsError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (argparse cannot intermix them)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"labelmill: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except WeightsError as exc:
        print(f"labelmill: weights error: {exc}", file=sys.stderr)
        return EXIT_WEIGHTS
    except ShardListError as exc:
        print(f"labelmill: input error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except (OutputConflictError, OutputNotFound, VersionNotFound) as exc:
        print(f"labelmill: output error: {exc}", file=sys.stderr)
        return EXIT_OUTPUT
    except LockHeld as exc:
        print(f"labelmill: lock held: {exc}", file=sys.stderr)
        return EXIT_LOCK_HELD


if __name__ == "__main__":
    sys.exit(main())
