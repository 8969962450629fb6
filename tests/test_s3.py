"""End to end against a real S3 endpoint on loopback (moto's server)."""

from __future__ import annotations

import pytest

from helpers import good_sample, run_config
from labelmill.config import load_config
from labelmill.pipelines.label import run
from s3server import s3_endpoint  # noqa: F401  (fixture)


def test_shards_and_output_on_s3(s3_endpoint, ray_session, tmp_path):
    import boto3
    import s3fs

    from labelmill.io.shards import write_shard

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="data")
    opts = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    for s in range(2):
        write_shard(f"s3://data/shards/part-{s:05d}.tar", [good_sample(f"{s}-{i}", seed=i) for i in range(4)], opts)

    cfg = run_config("s3://data/shards", "s3://data/labels-out")
    # ViLD regions too, so the manifest table and its readers run against S3
    cfg["teachers"].append({"type": "vild", "pretrained": None, "arch_config": cfg["teachers"][0]["arch_config"],
                            "proposals": [{"teacher": "maskclip"}], "whole_image": True, "mode": "dense",
                            "dense_features_from": "maskclip"})
    cfg["input"]["storage_options"] = opts
    cfg["output"]["storage_options"] = opts
    summary = run(load_config(cfg))
    assert summary.counters.samples == 8 and summary.counters.error == 0
    assert summary.counters.shards_committed == 2

    fs = s3fs.S3FileSystem(**opts)
    assert fs.exists("data/labels-out/samples/_delta_log")
    from deltalake import DeltaTable

    from labelmill.store.commit import delta_storage_options

    samples = DeltaTable("s3://data/labels-out/samples",
                         storage_options=delta_storage_options(opts, "s3://data/")).to_pandas()
    assert sorted(samples.key) == sorted(f"{s}-{i}" for s in range(2) for i in range(4))
    assert set(samples.shard) == {"s3://data/shards/part-00000.tar", "s3://data/shards/part-00001.tar"}
    # pyarrow's own S3 filesystem reads the plain Parquet files too
    import pyarrow.dataset as ds
    from pyarrow import fs as pafs

    s3 = pafs.S3FileSystem(endpoint_override=s3_endpoint.removeprefix("http://"), scheme="http",
                           access_key="testing", secret_key="testing", region="us-east-1")
    table = ds.dataset("data/labels-out/labels", filesystem=s3, format="parquet",
                       exclude_invalid_files=True).to_table()
    assert table.num_rows == samples.num_labels.sum()

    from labelmill.store.regions import RegionDataset, RegionReader

    reader = RegionReader("s3://data/labels-out", opts)
    assert sorted(reader.keys()) == sorted(samples.key)
    assert reader.get("0-1").boxes[0].tolist() == [0, 0, 96, 64]
    assert len(list(RegionDataset("s3://data/labels-out", opts))) == 8

    # resume from S3 state: nothing left to do
    assert run(load_config(cfg)).shards_skipped == 2
