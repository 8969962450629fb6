"""A self-contained HTML report of a run: overlays, per-class and per-status counts."""

from __future__ import annotations

import base64
import hashlib
import html
import io
import posixpath
from collections import Counter

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw

from labelmill.io.images import ImageDecodeError, decode_image
from labelmill.io.shards import ShardUnavailable, iter_shard
from labelmill.store.read import DatasetVersion, open_version
from labelmill.schemas.records import ImageRequest

DISPLAY = ImageRequest(short_side=448, max_long_side=448)


def _color(name: str) -> tuple[int, int, int]:
    digest = hashlib.md5(name.encode()).digest()
    return digest[0] // 2 + 96, digest[1] // 2 + 96, digest[2] // 2 + 96


def _rows(ds: DatasetVersion, table: str, columns=None):
    """The version's rows of ``table`` shard by shard, in shard order (memory bounded by one shard)."""
    if table in ds.table_names():
        for _, rows in ds.iter_shards(table, columns):
            yield rows.sort_by("index") if "index" in rows.column_names else rows


def _overlay(pixels: np.ndarray, orig_hw: tuple[int, int], labels: list[dict]) -> Image.Image:
    from pycocotools import mask as mask_utils

    img = Image.fromarray(pixels).convert("RGBA")
    h, w = pixels.shape[:2]
    sy, sx = h / orig_hw[0], w / orig_hw[1]
    layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for lab in labels:
        color = _color(lab["class_name"] or lab["phrase"] or "?")
        seg = lab.get("segmentation")
        if seg is not None:
            rle = {"size": list(seg["size"]), "counts": seg["counts"].encode()}
            mask = Image.fromarray(mask_utils.decode(rle) * 255).resize((w, h), Image.NEAREST)
            tint = Image.new("RGBA", img.size, color + (110,))
            layer.paste(tint, (0, 0), mask)
        x, y, bw, bh = lab["bbox"]
        draw.rectangle([x * sx, y * sy, (x + bw) * sx, (y + bh) * sy], outline=color + (255,), width=2)
        text = f"{lab['class_name'] or lab['phrase']} {lab['score']:.2f}"
        draw.text((x * sx + 3, y * sy + 2), text, fill=(255, 255, 255, 255))
    return Image.alpha_composite(img, layer).convert("RGB")


def _png_b64(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return base64.b64encode(buf.getvalue()).decode()


def _changes_html(output: str, ds: DatasetVersion, storage_options: dict | None) -> str:
    """What changed since the previous readable version (shards in/out, counts per status and class, scores)."""
    from labelmill.store.versions import diff_versions

    previous = [r["version"] for r in ds.store.versions()
                if r["version"] < ds.version and r["version"] not in ds.store.vacuumed()]
    if not previous:
        return "<h2>Changes</h2><p>first version (nothing to compare with)</p>"
    d = diff_versions(output, previous[-1], ds.version, storage_options)
    sh = d["shards"]
    rows = [f"<h2>Changes since version {d['a']}</h2><p>shards in: {len(sh['in'])}, out: {len(sh['out'])}, "
            f"relabelled: {len(sh['relabelled'])}; labels {d['labels']['a']} &rarr; {d['labels']['b']}</p>",
            "<table><tr><th></th><th>before</th><th>now</th><th>change</th></tr>"]
    for group in ("status", "classes"):
        for name, v in d[group].items():
            if v["change"]:
                rows.append(f"<tr><td>{group}: {html.escape(str(name))}</td><td>{v['a']}</td><td>{v['b']}</td>"
                            f"<td>{v['change']:+d}</td></tr>")
    sa, sb = d["score"]["a"]["mean"], d["score"]["b"]["mean"]
    if sa is not None and sb is not None:
        rows.append(f"<tr><td>mean score</td><td>{sa:.3f}</td><td>{sb:.3f}</td><td>{sb - sa:+.3f}</td></tr>")
    rows.append("</table>")
    return "".join(rows)


def write_report(output: str, dest: str, max_images: int | None = 24, storage_options: dict | None = None,
                 version: int | str | None = None, per_page: int = 24) -> str:
    """Write the report: counts, teachers, yields and errors, then the images with their labels, ``per_page``
    to a page (``dest``, then ``<dest stem>-2.html``, ... linked to each other), the first ``max_images``
    usable images of the version (None: every one).  Pages are decoded and written one at a time, so memory
    stays that of one page.  Returns ``dest``."""
    ds = open_version(output, version, storage_options=storage_options)
    status: Counter = Counter()
    drops: Counter = Counter()
    errors: list[tuple[str, str, str]] = []
    shown: list[dict] = []
    drop_cols = ["dropped_low_score", "dropped_small_area", "dropped_over_max"]
    for table in _rows(ds, "samples", ["status", "error", "shard", "key", "index"] + drop_cols):
        for value, n in zip(*pc.value_counts(table.column("status")).flatten()):
            status[value.as_py()] += n.as_py()
        for col in drop_cols:
            drops[col.removeprefix("dropped_")] += pc.sum(table.column(col)).as_py() or 0
        if len(errors) < 200:
            bad = table.filter(pc.equal(table.column("status"), "error")).slice(0, 200 - len(errors))
            errors += [(r["shard"], r["key"], r["error"]) for r in bad.to_pylist()]
    for table in _rows(ds, "samples", ["shard", "index", "key", "status", "caption", "image_height",
                                       "image_width"]):
        if max_images is not None and len(shown) >= max_images:
            break
        good = table.filter(pc.not_equal(table.column("status"), "error"))
        if max_images is not None:
            good = good.slice(0, max_images - len(shown))
        shown += good.to_pylist()
    per_class: Counter = Counter()
    provenance: dict[str, tuple] = {}
    wanted = {(r["shard"], r["index"]) for r in shown}
    labels_of: dict[tuple[str, int], list[dict]] = {}
    for table in _rows(ds, "labels"):
        names = pc.coalesce(table.column("class_name"), table.column("phrase"))
        keyed = pa.table({"teacher": table.column("teacher"), "name": names})
        for row in keyed.group_by(["teacher", "name"]).aggregate([([], "count_all")]).to_pylist():
            per_class[(row["teacher"], row["name"])] += row["count_all"]
        for t in table.column("teacher").unique().to_pylist():
            if t not in provenance:
                first = table.filter(pc.equal(table.column("teacher"), t)).slice(0, 1).to_pylist()[0]
                provenance[t] = (first["teacher_type"], first["weights"], first["weights_sha256"])
        mask = pc.is_in(
            pc.binary_join_element_wise(table.column("shard"), pc.cast(table.column("index"), pa.string()), "#"),
            pa.array([f"{s}#{i}" for s, i in wanted], pa.string()),
        )
        for row in table.filter(mask).to_pylist():
            labels_of.setdefault((row["shard"], row["index"]), []).append(row)

    random_init = any(p[2] == "random-init" for p in provenance.values())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>labelmill report</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}.grid{display:flex;flex-wrap:wrap;gap:12px}"
        ".card{width:460px}.banner{background:#c00;color:#fff;padding:1em;font-weight:bold}"
        "figcaption{font-size:13px}</style></head><body>",
        f"<h1>labelmill report</h1><p>output: <code>{html.escape(output)}</code>, dataset version "
        f"{ds.version} ({html.escape(ds.record['time'])})</p>",
    ]
    parts.append(_changes_html(output, ds, storage_options))
    if random_init:
        parts.append(
            "<div class='banner'>RANDOM WEIGHTS: these labels come from randomly initialised teachers "
            "(weights_sha256 = random-init). They show the pipeline working, not real predictions.</div>"
        )
    parts.append("<h2>Teachers</h2><table><tr><th>teacher</th><th>type</th><th>weights</th><th>sha256</th></tr>")
    for name, (ttype, weights, sha) in sorted(provenance.items()):
        parts.append(f"<tr><td>{html.escape(name)}</td><td>{ttype}</td><td>{html.escape(weights)}</td><td>{sha[:16]}</td></tr>")
    parts.append("</table><h2>Samples</h2><table><tr><th>status</th><th>count</th></tr>")
    for k in ("labelled", "no_labels", "error"):
        parts.append(f"<tr><td>{k}</td><td>{status.get(k, 0)}</td></tr>")
    parts.append(f"<tr><th>total</th><th>{sum(status.values())}</th></tr></table>")
    parts.append("<h2>Labels dropped by the filter</h2><table>")
    for k, v in sorted(drops.items()):
        parts.append(f"<tr><td>{k}</td><td>{v}</td></tr>")
    parts.append("</table><h2>Labels per class</h2><table><tr><th>teacher</th><th>class</th><th>labels</th></tr>")
    for (teacher, name), n in per_class.most_common():
        parts.append(f"<tr><td>{html.escape(teacher)}</td><td>{html.escape(str(name))}</td><td>{n}</td></tr>")
    parts.append("</table>")
    parts.append(yield_section(output, ds.version, storage_options))
    if errors:
        parts.append("<h2>Errors</h2><table><tr><th>shard</th><th>key</th><th>reason</th></tr>")
        for shard, key, reason in errors[:200]:
            parts.append(
                f"<tr><td>{html.escape(posixpath.basename(shard))}</td><td>{html.escape(key)}</td>"
                f"<td>{html.escape(reason or '')}</td></tr>"
            )
        parts.append("</table>")
    fs, path = fsspec.core.url_to_fs(dest)
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    pages = [shown[i : i + per_page] for i in range(0, len(shown), per_page)] or [[]]
    stem = posixpath.splitext(posixpath.basename(path))[0]
    names = [posixpath.basename(path)] + [f"{stem}-{k}.html" for k in range(2, len(pages) + 1)]
    head = parts[0] + parts[1]
    for k, rows in enumerate(pages):
        nav = _nav(names, k)
        first, last = k * per_page + 1, k * per_page + len(rows)
        body = (parts if k == 0 else [head]) + [
            f"<h2>Images {first}-{last} of {len(shown)}</h2>{nav}<div class='grid'>"]
        body += _cards(rows, labels_of, storage_options)
        body.append(f"</div>{nav}</body></html>")
        with fs.open(posixpath.join(parent, names[k]) if parent else names[k], "w") as fh:
            fh.write("\n".join(body))
    return dest


def _nav(names: list[str], k: int) -> str:
    if len(names) == 1:
        return ""
    links = [f"<a href='{html.escape(n)}'>{i + 1}</a>" if i != k else f"<b>{i + 1}</b>" for i, n in enumerate(names)]
    prev = f"<a href='{html.escape(names[k - 1])}'>previous</a> " if k > 0 else ""
    nxt = f" <a href='{html.escape(names[k + 1])}'>next</a>" if k + 1 < len(names) else ""
    return f"<p class='nav'>{prev}pages: {' '.join(links)}{nxt}</p>"


def _cards(rows: list[dict], labels_of: dict, storage_options: dict | None) -> list[str]:
    """One page's figures: its images decoded (shard by shard), overlaid with their labels."""
    by_shard: dict[str, set[int]] = {}
    for r in rows:
        by_shard.setdefault(r["shard"], set()).add(r["index"])
    decoded: dict[tuple[str, int], np.ndarray] = {}
    for shard, indices in by_shard.items():
        try:
            for sample in iter_shard(shard, storage_options or {}):
                if sample.index in indices and sample.image is not None:
                    try:
                        decoded[(shard, sample.index)] = decode_image(sample.image, DISPLAY, 10**9).pixels
                    except ImageDecodeError:
                        pass
        except ShardUnavailable:  # the shard is gone from storage: its images are shown without pictures
            continue
    out = []
    for row in rows:
        pix = decoded.get((row["shard"], row["index"]))
        if pix is None:
            continue
        labs = labels_of.get((row["shard"], row["index"]), [])
        b64 = _png_b64(_overlay(pix, (row["image_height"], row["image_width"]), labs))
        caption = html.escape(row["caption"] or "(no caption)")
        names = ", ".join(sorted({html.escape(str(lab["class_name"] or lab["phrase"])) for lab in labs})) or "none"
        out.append(
            f"<figure class='card'><img src='data:image/png;base64,{b64}' width='448'>"
            f"<figcaption><b>{html.escape(row['key'])}</b> ({row['status']}): {caption}<br>labels: {names}"
            "</figcaption></figure>"
        )
    return out


def yield_section(output: str, version: int, storage_options: dict | None = None, max_classes: int = 30) -> str:
    """HTML: per teacher, the pre-filter score histogram next to the yield curve, then a per-class yield table."""
    from labelmill.store.yields import ALL, BINS, version_yield

    table = version_yield(output, version, storage_options)
    width, height, pad = 360, 180, 34

    def frame(title: str, body: list[str], ymax: int, xlabel: str) -> str:
        return (f"<svg width='{width}' height='{height + 2 * pad}' style='margin-right:16px'>"
                f"<text x='{pad}' y='14' font-size='13'>{html.escape(title)}</text>"
                f"<line x1='{pad}' y1='{pad + height}' x2='{pad + width - 2 * pad}' y2='{pad + height}' stroke='#333'/>"
                f"<line x1='{pad}' y1='{pad}' x2='{pad}' y2='{pad + height}' stroke='#333'/>"
                f"<text x='2' y='{pad + 4}' font-size='10'>{ymax:,}</text>"
                + "".join(f"<text x='{pad + (width - 2 * pad) * t / 10 - 6}' y='{pad + height + 14}' "
                          f"font-size='10'>{t / 10:g}</text>" for t in range(0, 11, 2))
                + f"<text x='{width / 2 - 20}' y='{pad + height + 28}' font-size='11'>{xlabel}</text>"
                + "".join(body) + "</svg>")

    plot_w = width - 2 * pad
    parts = ["<h2>Scores and yield by threshold</h2><p>Left: pre-filter label scores (grey: all labels; blue: the "
             "ones the area and per-image limits leave to the score threshold). Right: labels (blue) and images "
             "(orange) that survive each threshold, from the stored histograms (no relabelling)."
             + ("" if table["exact"] else " <b>Approximate</b>: some groups were replayed or replaced.") + "</p>"]
    for row in table["rows"]:
        if row["class"] != ALL:
            continue
        k = f"{row['teacher']}\t{row['class']}"
        hist = table["histograms"][k]
        top = max(max(hist["all"]), 1)
        bars = []
        for b in range(BINS):
            x = pad + plot_w * b / BINS
            for kind, color in (("all", "#bbb"), ("kept", "#3a7bd5")):
                h = height * hist[kind][b] / top
                bars.append(f"<rect x='{x:.1f}' y='{pad + height - h:.1f}' width='{plot_w / BINS - 1:.1f}' "
                            f"height='{h:.1f}' fill='{color}'><title>{kind} {b / BINS:g}-{(b + 1) / BINS:g}: "
                            f"{hist[kind][b]}</title></rect>")
        ymax = max(max(row["labels"].values()), max(row["images"].values()), 1)
        curves = []
        for what, color in (("labels", "#3a7bd5"), ("images", "#e8882a")):
            pts = [(pad + plot_w * float(t), pad + height - height * n / ymax) for t, n in row[what].items()]
            curves.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='"
                          + " ".join(f"{x:.1f},{y:.1f}" for x, y in pts) + "'/>")
            curves += [f"<circle cx='{x:.1f}' cy='{y:.1f}' r='3' fill='{color}'/>" for x, y in pts]
        who = "all teachers" if row["teacher"] == ALL else row["teacher"]
        parts.append("<div>" + frame(f"{who}: pre-filter scores", bars, top, "score")
                     + frame(f"{who}: surviving at threshold", curves, ymax, "threshold") + "</div>")
    classes = sorted((r for r in table["rows"] if r["class"] != ALL),
                     key=lambda r: -r["labels_prefilter"])[:max_classes]
    parts.append("<table><tr><th>teacher</th><th>class</th><th>pre-filter</th>"
                 + "".join(f"<th>labels &ge;{t}</th>" for t in table["thresholds"]) + "</tr>")
    for r in classes:
        parts.append(f"<tr><td>{html.escape(r['teacher'])}</td><td>{html.escape(r['class'])}</td>"
                     f"<td>{r['labels_prefilter']}</td>" + "".join(f"<td>{n}</td>" for n in r["labels"].values())
                     + "</tr>")
    parts.append("</table>")
    return "\n".join(parts)
