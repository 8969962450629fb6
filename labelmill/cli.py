"""The ``labelmill`` command line."""

from __future__ import annotations

import argparse
import json
import sys

from labelmill.exitcodes import EXIT_FAILED_SHARDS


def _cmd_run(args: argparse.Namespace) -> int:
    from labelmill.config import load_config
    from labelmill.pipelines.label import run

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        return _dry_run(cfg, args)
    _quiet_terminal()
    summary = run(cfg)
    print(json.dumps(summary.as_dict(), indent=2))
    failed = summary.counters.failed_shards
    if failed:
        print(f"labelmill: finished with {len(failed)} failed shard(s) (not committed; the next run retries "
              f"them): {', '.join(sorted(failed))}", file=sys.stderr)
        return EXIT_FAILED_SHARDS
    return 0


def _dry_run(cfg, args: argparse.Namespace) -> int:
    """Validate, then estimate shards, samples, speed, hours, storage and GPU-hours from a sample."""
    from labelmill.engine.estimate import estimate, format_estimate
    from labelmill.pipelines.label import build_pipeline

    if not args.json:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        print(f"config OK, label hash {cfg.label_hash()}", file=sys.stderr)
    result = estimate(cfg, build_pipeline(cfg), sample_shards=args.sample_shards, actors=args.actors)
    if args.json:
        print(json.dumps({"config_ok": True, "label_hash": cfg.label_hash(), **result}, indent=2))
    else:
        print(format_estimate(result), file=sys.stderr)
    return 0


def _add_dry_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dry-run", action="store_true",
                   help="validate the config, then estimate the run from a few sampled shards and a short "
                   "timed batch (shards, samples, s/image per teacher, hours, storage, GPU-hours); writes nothing")
    p.add_argument("--json", action="store_true", help="with --dry-run: one JSON object for scripts")
    p.add_argument("--sample-shards", type=int, default=3, help="with --dry-run: shards to read (default 3)")
    p.add_argument("--actors", type=int, help="with --dry-run: label actors of the planned cluster "
                   "(default: ray.teacher_actors / ray.max_actors, else this machine)")


def _cmd_pack(args: argparse.Namespace) -> int:
    from labelmill.io.pack import pack_folder

    print(json.dumps(pack_folder(args.folder, args.out, per_shard=args.per_shard, prefix=args.prefix), indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from labelmill.pipelines.demo import run_demo

    _quiet_terminal()
    result = run_demo(args.out, teachers=args.teachers.split(","), overrides=args.overrides)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from labelmill.export.base import parse_version, run_export

    from labelmill.engine.progress import step

    options = {k: getattr(args, k) for k in args.format_options if getattr(args, k, None) is not None}
    with step(f"export {args.format} -> {args.dest}"):
        manifest = run_export(args.format, args.output, args.dest, version=parse_version(args.version),
                              overwrite=args.overwrite, **options)
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from labelmill.export.report import write_report

    path = write_report(args.output, args.dest, max_images=args.max_images, version=args.version,
                        per_page=args.per_page)
    print(path)
    return 0


def _cmd_yield(args: argparse.Namespace) -> int:
    from labelmill.store.yields import format_yield, version_yield

    table = version_yield(args.output, args.version)
    if args.json:
        print(json.dumps(table, indent=2))
    else:
        print(format_yield(table))
    return 0


def _add_yield_parser(sub) -> None:
    p = sub.add_parser(
        "yield",
        help="how many labels and images each score threshold (0.1 ... 0.9) keeps, per teacher and class",
        description="Read the pre-filter score histograms stored with a dataset version and print the number "
        "of labels and images that survive each score threshold, per teacher and class, without relabelling. "
        "Labels counted are those the area and per-image limits of the run keep.",
    )
    p.add_argument("output", help="the run's output.path")
    p.add_argument("--version", help="dataset version: a number or an ISO timestamp (default: the latest)")
    p.add_argument("--json", action="store_true", help="one JSON object (rows plus the histograms)")
    p.set_defaults(func=_cmd_yield)


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


def _cmd_train(args: argparse.Namespace) -> int:
    from labelmill.pipelines.train import train
    from labelmill.training.config import load_train_config

    cfg = load_train_config(args.task, args.config, args.overrides, preset=args.preset)
    if args.dry_run:
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    _quiet_terminal()
    print(json.dumps(train(cfg, status=True), indent=2, default=str))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from labelmill.training.evaluate import evaluate

    result = evaluate(args.checkpoint, args.output, version=args.version, gt=args.gt, teacher=args.teacher,
                      threshold=args.threshold, max_images=args.max_images, tokenizer=args.tokenizer)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_convert_weights(args: argparse.Namespace) -> int:
    from labelmill.models.safe_load import convert_weights

    print(json.dumps(convert_weights(args.src, args.dst, trust_source=args.trust_source), indent=2))
    return 0


def _add_convert_weights_parser(sub) -> None:
    p = sub.add_parser(
        "convert-weights",
        help="turn a checkpoint into a plain tensor file that every load path reads without running code",
        description="Read SRC (a .pth/.pt pickle, an OpenAI TorchScript CLIP archive, .safetensors, .npz) and "
        "write its state dict to DST as plain tensors (.safetensors, or a torch file of tensors only). labelmill "
        "itself never runs code from a weights file: a SRC that needs code to load (a pickle of arbitrary "
        "objects, a TorchScript archive whose pickle names other classes) is converted only with "
        "--trust-source, which runs that code here; do it once, on a machine you trust.",
    )
    p.add_argument("src", help="checkpoint to read")
    p.add_argument("dst", help="file to write (.safetensors recommended); must not exist")
    p.add_argument("--trust-source", action="store_true",
                   help="allow torch.jit.load / full unpickling of SRC: runs code from the file")
    p.set_defaults(func=_cmd_convert_weights)


def _add_verbose(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", "-v", action="store_true",
                   help="let Ray's own warnings and logs through to the terminal (hidden by default)")


def _apply_verbose(args: argparse.Namespace) -> None:
    import os

    if getattr(args, "verbose", False):
        os.environ["LABELMILL_VERBOSE"] = "1"


def _quiet_terminal() -> None:
    """Before a run: Ray's C++ info and warning lines are to be kept off stderr (unless --verbose).

    The engine routes stderr through the filter once Ray has started
    (:func:`labelmill.engine.runtime.filter_native_stderr`).
    """
    import os

    os.environ["LABELMILL_QUIET_STDERR"] = "1"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} is not above 0")
    return value


def _count_or_all(text: str) -> int | None:
    """A count of 0 or more, or ``all`` (None)."""
    if text == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a whole number nor 'all'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="labelmill",
        description="Streaming pseudo-labelling of WebDataset image-caption shards with CLIP-family teachers on Ray.",
    )
    from labelmill import __version__

    parser.add_argument("--version", action="version", version=f"labelmill {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "run",
        help="label shards as a config file describes (resumes where a previous run stopped)",
        description="Run the pipeline. Overrides are key.path=value pairs applied to the YAML before "
        "validation, e.g. output.path=/tmp/out teachers.0.image_size=448 filter.min_score=0.3",
    )
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    _add_dry_run_options(p)
    p.set_defaults(func=_cmd_run)
    _add_verbose(p)

    p = sub.add_parser(
        "pack",
        help="pack a plain folder of images (captions from .txt sidecars) into WebDataset shards",
        description="Every image under FOLDER becomes a sample (key: its path without the extension); a .txt "
        "file with the same stem is its caption, a .json file its metadata. Writes OUT/shard-NNNNN.tar and "
        "OUT/manifest.json (key -> file). Exit 4 when FOLDER has no images, two images share a key, or OUT "
        "already holds shards.",
    )
    p.add_argument("folder", help="folder of images (searched recursively)")
    p.add_argument("out", help="folder for the shards")
    p.add_argument("--per-shard", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument("--prefix", default="shard", help="shard file name prefix (default: shard)")
    p.set_defaults(func=_cmd_pack)

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
    _add_verbose(p)

    _add_export_parsers(sub)

    p = sub.add_parser(
        "report",
        help="write an HTML report with mask overlays and per-class counts",
        description="Render the images of OUTPUT with their labels, plus per-class and per-status counts; "
        "images go --per-page to a page (DEST, then DEST-2.html, ... linked to each other).",
    )
    p.add_argument("output", help="the run's output.path")
    p.add_argument("dest", help="HTML file to write")
    p.add_argument("--max-images", type=_count_or_all, default=24, help="how many images (default 24); 'all' "
                   "for every one")
    p.add_argument("--per-page", type=_positive_int, default=24, help="images per page (default 24)")
    p.add_argument("--version", help="dataset version: a number or an ISO timestamp (default: the latest)")
    p.set_defaults(func=_cmd_report)

    _add_yield_parser(sub)
    _add_convert_weights_parser(sub)

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

    p = sub.add_parser(
        "train",
        help="train a student (maskclip-plus or glip) on a dataset version with Ray Train",
        description="Train a student from the labels of a pinned dataset version. The config is validated "
        "before any work starts; re-running the same checkpoint.name resumes from its last checkpoint.",
    )
    p.add_argument("task", choices=["maskclip-plus", "glip"], help="which student")
    p.add_argument("config", help="training config (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved config, run nothing")
    p.add_argument("--preset", choices=["coco-stuff", "context", "zero-shot-voc"],
                   help="maskclip-plus: MaskCLIP+'s published settings (crop, resize rule, photometric distortion, "
                   "mean-colour padding, SGD, poly to min lr, iterations); the config's own keys win")
    _add_verbose(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a student checkpoint: mIoU (segmentation) or COCO AP (detection)",
        description="Score a student on the images of a dataset version: against the version's own teacher "
        "labels, or against COCO-format ground truth (--gt; images matched by file_name = sample key).",
    )
    p.add_argument("checkpoint", help="student checkpoint folder (MaskCLIP+ or GLIP)")
    p.add_argument("output", help="labelmill output whose images (and labels) to use")
    p.add_argument("--version", type=int, default=None, help="dataset version (default latest)")
    p.add_argument("--gt", help="COCO-format ground truth JSON (default: the version's teacher labels)")
    p.add_argument("--teacher", help="teacher whose labels are the reference (default: the only one)")
    p.add_argument("--threshold", type=float, default=0.0, help="minimum reference label score")
    p.add_argument("--max-images", type=int, default=None)
    p.add_argument("--tokenizer", help="GLIP: BERT tokenizer folder (default: the checkpoint's)")
    p.set_defaults(func=_cmd_eval)

    from labelmill.cli_refresh import add_parsers as add_refresh_parsers

    add_refresh_parsers(sub)  # refresh, versions, diff, rollback, vacuum, optimize
    return parser


EXPORT_EXIT_CODES = """exit codes: 2 bad option (unknown class or teacher, bad --category-ids), 4 OUTPUT or
--version not found, 5 DEST exists (use --overwrite) or two images share a name, 6 nothing to export
(the version is empty, or every sample in it failed)"""


def _add_export_parsers(sub) -> None:
    def common(p, *options: str) -> None:
        p.add_argument("output", help="the run's output.path")
        p.add_argument("dest", help="folder to write (must not exist, unless --overwrite)")
        p.add_argument("--version", help="dataset version: a number, or an ISO timestamp (the version current "
                       "then); default: the latest")
        p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists")
        p.add_argument("--classes", nargs="+", metavar="CLASS", help="only these classes")
        p.set_defaults(func=_cmd_export, format_options=["classes", *options])

    def teachers_and_ids(p) -> None:
        p.add_argument("--teacher", dest="teachers", action="append", help="only this teacher (repeatable)")
        p.add_argument("--category-ids", help="the ids to keep: JSON {name: id}, or a COCO file with 'categories' "
                       "(default: the output's registry: official COCO / COCO-Stuff ids for their classes, "
                       "1001.. for others, the same in every version)")

    def images(p) -> None:
        p.add_argument("--images", choices=["link", "copy", "none"], default="copy",
                       help="copy the images out of the shards (default), hard-link them from an extraction "
                       "cache (--image-cache), or write none (use your own image folder)")
        p.add_argument("--image-cache", help="extraction cache for --images link "
                       "(default $LABELMILL_IMAGE_CACHE or ~/.cache/labelmill/images)")

    p = sub.add_parser(
        "export-coco", help="write COCO instances (and MDETR grounding) JSON from a dataset version",
        description="Stream one version of OUTPUT into sharded COCO JSON files under DEST: per teacher "
        "instances_NNNNN.json (RLE masks, scores; official COCO ids for COCO-80 classes) and, for caption-mode "
        "GLIP, MDETR-style grounding_NNNNN.json.", epilog=EXPORT_EXIT_CODES)
    common(p, "teachers", "category_ids", "images_per_file", "results", "gt")
    p.add_argument("--images-per-file", type=int, default=50_000, help="images per JSON file (default 50000)")
    p.add_argument("--results", action="store_true", default=None,
                   help="also write <teacher>/results.json: the COCO results format (COCO.loadRes, COCOeval)")
    p.add_argument("--gt", help="a COCO ground-truth file: results.json takes its image ids (by file_name) and "
                   "category ids (by name), for COCOeval against it (implies --results)")
    teachers_and_ids(p)
    p.set_defaults(format="coco")

    p = sub.add_parser(
        "export-yolo", help="write an Ultralytics (YOLO) detection or segmentation dataset",
        description="Ultralytics label files (normalised cx cy w h, or polygons traced from the RLE masks) and "
        "data.yaml for one teacher, with the images linked or copied from the shards.", epilog=EXPORT_EXIT_CODES)
    common(p, "task", "teacher", "images", "image_cache", "val_fraction")
    p.add_argument("--task", choices=["detect", "segment"], default="detect")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of images in val, fixed per image by a hash of its key (default 0.1)")
    p.add_argument("--teacher", help="the teacher whose labels to export (needed if several have class labels)")
    images(p)
    p.set_defaults(format="yolo")

    p = sub.add_parser(
        "export-fiftyone", help="write a FiftyOne-loadable COCO detection dataset (RLE masks, scores)",
        description="FiftyOne's COCODetectionDataset layout: DEST/data/ (images) and DEST/labels/<teacher>.json. "
        "See the README for the loader snippet.", epilog=EXPORT_EXIT_CODES)
    common(p, "teachers", "category_ids", "images", "image_cache")
    teachers_and_ids(p)
    images(p)
    p.set_defaults(format="fiftyone")

    p = sub.add_parser(
        "export-odvg", help="write ODVG JSONL (GroundingDINO-style trainers; mmdet's ODVGDataset)",
        description="One JSON line per image with boxes: grounding (caption, phrases, tokens_positive) or "
        "detection (class labels, with label_map.json), and the images under DEST/images.",
        epilog=EXPORT_EXIT_CODES)
    common(p, "mode", "teacher", "threshold", "images", "image_cache")
    p.add_argument("--mode", choices=["grounding", "detection"],
                   help="default: grounding when the teacher grounds caption phrases, else detection")
    p.add_argument("--teacher", help="the teacher whose boxes to export (needed if several fit the mode)")
    p.add_argument("--threshold", type=float, default=0.0, help="minimum box score (default 0)")
    images(p)
    p.set_defaults(format="odvg")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides given after an option (argparse cannot intermix them)
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _apply_verbose(args)
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        from labelmill.exitcodes import EXIT_PIPE_CLOSED, classify

        known = classify(exc)
        if known is None:
            raise  # a bug: the traceback is the report
        code, line = known
        if code == EXIT_PIPE_CLOSED:  # the reader went away (| head): nothing more to say, nowhere to say it
            _silence_stdout()
            return code
        print(f"labelmill: {line}", file=sys.stderr)
        if getattr(args, "json", False):  # a scheduler reading only stdout gets the code too
            print(json.dumps({"command": args.command, "error": line, "exit_code": code}), flush=True)
        return code


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
