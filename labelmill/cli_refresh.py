"""The ``labelmill`` commands of nightly refreshes and dataset versions.

``refresh``, ``versions``, ``diff``, ``rollback`` and ``vacuum``; kept apart
from :mod:`labelmill.cli` (which adds them with :func:`add_parsers`).
"""

from __future__ import annotations

import argparse
import json

from labelmill.exitcodes import EXIT_PUBLISHED, MEANING


def _print_summary(summary: dict, as_json: bool) -> None:
    if as_json:  # one line, exit_code last (schedulers read it from a streamed log)
        code = summary.pop("exit_code")
        print(json.dumps({**summary, "exit_code": code}, sort_keys=False, default=str))
        summary["exit_code"] = code
    else:
        print(json.dumps(summary, indent=2, default=str))


def _cmd_refresh(args: argparse.Namespace) -> int:
    from labelmill.config import load_config
    from labelmill.pipelines.refresh import refresh

    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        from labelmill.pipelines.refresh import plan_only

        summary = plan_only(cfg, content_hash=args.content_hash)
    else:
        summary = refresh(cfg, content_hash=args.content_hash)
    _print_summary(summary, args.json)
    return summary["exit_code"]


def _cmd_versions(args: argparse.Namespace) -> int:
    from labelmill.store.versions import describe_versions, format_versions

    rows = describe_versions(args.output)
    print(json.dumps(rows, default=str) if args.json else format_versions(rows))
    return EXIT_PUBLISHED


def _cmd_diff(args: argparse.Namespace) -> int:
    from labelmill.store.versions import diff_versions, format_diff

    result = diff_versions(args.output, args.a, args.b)
    print(json.dumps(result, default=str) if args.json else format_diff(result))
    return EXIT_PUBLISHED


def _cmd_rollback(args: argparse.Namespace) -> int:
    from labelmill.store.versions import rollback

    record = rollback(args.output, args.version)
    out = {"version": record["version"], "rolled_back_to": record["rolled_back_to"],
           "shards_added": len(record["shards_added"]), "shards_removed": len(record["shards_removed"])}
    print(json.dumps(out) if args.json else f"published version {out['version']} = version {out['rolled_back_to']}")
    return EXIT_PUBLISHED


def _cmd_vacuum(args: argparse.Namespace) -> int:
    from labelmill.config import ConfigError
    from labelmill.store.versions import vacuum

    if (args.keep_versions is None) == (args.older_than is None):
        raise ConfigError("vacuum needs exactly one of --keep-versions N or --older-than DAYS")
    result = vacuum(args.output, keep_versions=args.keep_versions, older_than_days=args.older_than, apply=args.yes)
    if args.json:
        print(json.dumps(result, default=str))
    else:
        verb = "deleted" if args.yes else "would delete (dry run; add --yes)"
        print(f"keeping versions {result['kept_versions']}; {verb} {len(result['files'])} files "
              f"({result['bytes']} bytes), {len(result['log_files'])} log files no kept version reads "
              f"({result['log_bytes']} bytes) and {result['staging_files']} staging leftovers")
    return EXIT_PUBLISHED


def _cmd_optimize(args: argparse.Namespace) -> int:
    from labelmill.store.optimize import format_optimize, optimize

    result = optimize(args.output, group_shards=args.group_shards, target_mb=args.target_mb, dry_run=args.dry_run)
    print(json.dumps(result, default=str) if args.json else format_optimize(result))
    return EXIT_PUBLISHED


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def add_parsers(sub) -> None:
    codes = "; ".join(f"{k}: {v}" for k, v in MEANING.items())
    p = sub.add_parser(
        "refresh",
        help="bring an output up to date with tonight's shards and config, as ONE new dataset version",
        description="List the input with fingerprints, compare with the current version (new, unchanged, "
        "changed, deleted, stale shards), label what must be labelled and publish all changes as one "
        f"dataset version. Takes the output's writer lock. Exit codes: {codes}.",
    )
    p.add_argument("config", help="run config (YAML)")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--json", action="store_true", help="print a one-line JSON summary (exit_code last)")
    p.add_argument("--dry-run", action="store_true",
                   help="print tonight's plan, each shard with its reason (new, changed, deleted, which config "
                   "key; re-filter or relabel), and exit (7 when there is nothing to do); no lock, no writes")
    p.add_argument("--content-hash", action="store_true",
                   help="fingerprint shards by sha256 of their bytes (reads every shard) as well as size/etag/mtime")
    p.set_defaults(func=_cmd_refresh)

    p = sub.add_parser("versions", help="list an output's dataset versions",
                       description="Version, time, kind, shards new/changed/deleted/stale, rows by table and "
                       "status, teachers and hashes, duration.")
    p.add_argument("output", help="the output path")
    p.add_argument("--json", action="store_true", help="JSON list instead of a table")
    p.set_defaults(func=_cmd_versions)

    p = sub.add_parser("diff", help="what changed between two dataset versions",
                       description="Counts per class and status, shards in and out, score-distribution shift "
                       "between versions A and B (numbers or ISO timestamps).")
    p.add_argument("output", help="the output path")
    p.add_argument("a", help="version A (number or ISO timestamp)")
    p.add_argument("b", help="version B (number or ISO timestamp)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_diff)

    p = sub.add_parser("rollback", help="publish a new version equal to an old one",
                       description="Publish a new dataset version whose tables hold exactly the files of "
                       "VERSION. Takes the writer lock.")
    p.add_argument("output", help="the output path")
    p.add_argument("version", help="version to return to (number or ISO timestamp)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_rollback)

    p = sub.add_parser("vacuum", help="delete files no kept version reads (dry run unless --yes)",
                       description="Keep the newest N versions (--keep-versions) or those younger than DAYS "
                       "(--older-than; the version current at the cut-off is kept too), delete data files "
                       "that no kept version reads and staging leftovers. A dry run unless --yes. Takes the "
                       "writer lock.")
    p.add_argument("output", help="the output path")
    p.add_argument("--keep-versions", type=int, metavar="N")
    p.add_argument("--older-than", type=float, metavar="DAYS")
    p.add_argument("--yes", action="store_true", help="really delete")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_vacuum)

    from labelmill.store.defaults import GROUP_SHARDS as DEFAULT_GROUP_SHARDS
    from labelmill.store.defaults import TARGET_MB as DEFAULT_TARGET_MB

    p = sub.add_parser("optimize", help="pack small files into one file per shard group, as a new version",
                       description="Rewrite each table's small files as one file per group of consecutive "
                       "shards and publish them as one dataset version with exactly the same rows (Delta "
                       "dataChange=false; pinned versions keep their files until vacuum). A night that "
                       "relabels a shard of a group rewrites the group's file without it. Takes the writer lock.")
    p.add_argument("output", help="the output path")
    p.add_argument("--group-shards", type=_positive(int), default=DEFAULT_GROUP_SHARDS, metavar="N",
                   help=f"shards per group file (default {DEFAULT_GROUP_SHARDS}); a relabelled shard rewrites "
                   "its group")
    p.add_argument("--target-mb", type=_positive(float), default=DEFAULT_TARGET_MB, metavar="MB",
                   help=f"largest group file; files this large are left alone (default {DEFAULT_TARGET_MB})")
    p.add_argument("--dry-run", action="store_true", help="list the groups, write nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_optimize)
