"""Finish stage (CPU pool): the split teachers' raw device results become label rows.

Runs in its own pool of CPU actors (the filter and the table writer fuse
into it), so the device process never builds rows. For each split teacher,
in config order, its host side (:class:`~labelmill.teachers.base.HostSide`,
built from the config, no weights, no torch) turns the batch's
``raw.<teacher>`` column into outputs: COCO RLE through pycocotools, label
rows, region sets. Labels, regions and warnings are merged with those of the
teachers that ran whole in the device process, in config order, and the raw
and prepared columns are dropped.

A host side that raises on a batch is retried image by image; only the images
that still fail become error rows (with no partial labels).
"""

from __future__ import annotations

import traceback

import pyarrow as pa

from labelmill.schemas.raw import RawBatch, prepared_column, raw_column
from labelmill.schemas.tables import LABEL_STRUCT, Col, label_to_struct, meta_dict, region_from_struct, regions_array
from labelmill.stages.base import Resources, Stage
from labelmill.stages.prepare import prepared_teachers


class FinishLabels(Stage):
    name = "finish"
    role = "host"
    stateful = True

    def __init__(self, teachers, *, cpus: float = 0.25):
        self.teacher_configs = list(teachers)
        self.cpus = cpus
        self.order = [c.instance_name for c in self.teacher_configs]
        self.split = [c for c in self.teacher_configs if c.split]
        self.prepared = {c.instance_name for c, _ in prepared_teachers(self.teacher_configs)}
        raw_cols = tuple(raw_column(c.instance_name) for c in self.split)
        prep_cols = tuple(prepared_column(n) for n in sorted(self.prepared))
        self.requires = (Col.KEY, Col.ERROR, Col.WARNINGS, Col.CAPTION, Col.ORIG_H, Col.ORIG_W, Col.META_JSON,
                         Col.LABELS, Col.REGIONS, *raw_cols, *prep_cols)
        self.produces = (Col.LABELS, Col.REGIONS)
        self.drops = raw_cols + prep_cols
        self.hosts: dict = {}

    def resources(self) -> Resources:
        return Resources(cpus=self.cpus)

    def setup(self) -> None:
        from labelmill.teachers.base import host_side

        self.hosts = {c.instance_name: host_side(c) for c in self.split}

    def process_batch(self, batch: pa.Table) -> pa.Table:
        if not self.hosts and self.split:
            self.setup()
        n = batch.num_rows
        errors = batch.column(Col.ERROR).to_pylist()
        warns = [w or [] for w in batch.column(Col.WARNINGS).to_pylist()]
        labels_in = batch.column(Col.LABELS).to_pylist()
        regions_col = batch.column(Col.REGIONS)
        has_regions = any(regions_col.to_pylist()) if regions_col.null_count < n else False
        regions_in = regions_col.to_pylist() if has_regions else [[] for _ in range(n)]
        if not self.split:
            return self._merge(batch, n, errors, warns, labels_in, regions_in, {})
        from labelmill.teachers.base import FinishInfo

        info = FinishInfo(batch.column(Col.KEY).to_pylist(),
                          list(zip(batch.column(Col.ORIG_H).to_pylist(), batch.column(Col.ORIG_W).to_pylist())),
                          batch.column(Col.CAPTION).to_pylist(),
                          [meta_dict(m) for m in batch.column(Col.META_JSON).to_pylist()])
        outputs = {}
        for cfg in self.split:
            name = cfg.instance_name
            raw = RawBatch.from_arrow(batch.column(raw_column(name)))
            prepared = batch.column(prepared_column(name)).to_pylist() if name in self.prepared else None
            outputs[name] = self._finish(name, raw, FinishInfo(info.keys, info.orig_hw, info.captions, info.metas,
                                                               prepared), errors)
        return self._merge(batch, n, errors, warns, labels_in, regions_in, outputs)

    def _finish(self, name: str, raw: RawBatch, info, errors: list) -> list:
        host = self.hosts[name]
        try:
            return host.finish(raw, info)
        except Exception:  # noqa: BLE001 - isolate the image(s) that fail, keep the rest
            outs = []
            for i in range(len(raw)):
                try:
                    outs.extend(host.finish(raw.take([i]), info.subset([i])))
                except Exception as exc:  # noqa: BLE001
                    reason = "".join(traceback.format_exception(exc, limit=2)).strip()
                    if errors[i] is None:
                        errors[i] = f"teacher {name} failed on the host: {reason}"
                    outs.append(None)
            return outs

    def _merge(self, batch, n, errors, warns, labels_in, regions_in, outputs) -> pa.Table:
        rank = {name: k for k, name in enumerate(self.order)}
        labels, regions = [], []
        for r in range(n):
            row_labels = [(rank.get(lab["teacher"], len(rank)), lab) for lab in labels_in[r] or []]
            row_regions = [(rank.get(item["teacher"], len(rank)), region_from_struct(item))
                           for item in regions_in[r] or []]
            for name, outs in outputs.items():
                out = outs[r]
                if out is None:
                    continue
                row_labels += [(rank[name], label_to_struct(lab, name)) for lab in out.labels]
                if out.regions is not None:
                    row_regions.append((rank[name], (name, out.regions)))
                warns[r].extend(out.warnings)
            if errors[r] is not None:  # a failed sample keeps no partial labels
                row_labels, row_regions = [], []
            labels.append([lab for _, lab in sorted(row_labels, key=lambda x: x[0])])
            regions.append([reg for _, reg in sorted(row_regions, key=lambda x: x[0])])
        out = batch.drop_columns([c for c in self.drops if c in batch.column_names])
        out = out.set_column(out.schema.get_field_index(Col.ERROR), Col.ERROR, pa.array(errors, pa.string()))
        out = out.set_column(
            out.schema.get_field_index(Col.WARNINGS), Col.WARNINGS, pa.array(warns, pa.list_(pa.string()))
        )
        out = out.set_column(out.schema.get_field_index(Col.LABELS), Col.LABELS,
                             pa.array(labels, pa.list_(LABEL_STRUCT)))
        return out.set_column(out.schema.get_field_index(Col.REGIONS), Col.REGIONS, regions_array(regions))
