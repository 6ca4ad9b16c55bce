"""Rows into Milvus two ways, and the IVF_PQ build after: the numbers docs/SCALE.md ("Distributed
build") extrapolates from.

On a fresh embedded Milvus 2.3.5 (its own data dir and port): N training rows of DIM floats (the
paper profile's VGG-16 recall vector is 512-d; random values, scalars as GMV writes them)

1. inserted through `TrainingIndex.insert_rows` in ~16 MB calls, then flushed: what the
   distributed build's driver (and the local build) does;
2. written as one Parquet file with pyarrow and imported with pymilvus' `utility.do_bulk_insert`
   into a second collection of the same schema, until the import is persisted. The embedded
   Milvus keeps its data on local disk, so the file is placed under its `localStorage.path` and
   named by its absolute path (a relative path is not found). This calls pymilvus directly
   because TrainingIndex has no import (see docs/SCALE.md for why).
3. the time until Milvus has built the IVF_PQ index of every row of the first collection (both
   collections build theirs at once).

    .venv/bin/python bench/bench_bulk_import.py [--rows 100000] [--dim 512]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    args = parser.parse_args()
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pymilvus import connections, utility

    from gmv_engine.milvus.embedded import EmbeddedMilvus, free_port
    from gmv_engine.milvus.index import (
        CollectionInfo,
        IndexParams,
        TrainingIndex,
        TrainingRow,
    )

    n, dim = args.rows, args.dim
    vectors = np.random.default_rng(0).random((n, dim), dtype=np.float32)
    rows = [TrainingRow(f"img-{i:08d}", f"c{i % 50:02d}", hashlib.sha256(str(i).encode()).hexdigest(),
                        {"label": str(i % 10)}) for i in range(n)]
    info = CollectionInfo("paper", "vgg16", dim, "none", 0)
    work = Path(tempfile.mkdtemp(prefix="gmv-bench-bulk-"))
    try:
        with EmbeddedMilvus(work / "milvus", port=free_port()) as milvus:
            index = TrainingIndex(milvus.uri, timeout_s=120)
            index.create("by_insert", info, IndexParams(), expected_rows=n, load_new=False)
            per_call = (16 << 20) // (dim * 4)
            start = time.perf_counter()
            for first in range(0, n, per_call):
                index.insert_rows("by_insert", rows[first:first + per_call], vectors[first:first + per_call])
            index.client.flush("by_insert")
            inserted = time.perf_counter() - start
            print(f"insert_rows: {n} rows x {dim}-d in {inserted:.1f} s, flush included: {n / inserted:.0f} rows/s")

            index.create("by_import", info, IndexParams(), expected_rows=n, load_new=False)
            start = time.perf_counter()
            table = pa.table({
                "pk": pa.array([row.pk for row in rows], pa.int64()),
                "training_id": [row.training_id for row in rows],
                "contributor_id": [row.contributor_id for row in rows],
                "content_hash": [row.content_hash for row in rows],
                "metadata": [json.dumps(row.metadata) for row in rows],
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim)
                .cast(pa.list_(pa.float32())),
            })
            folder = work / "milvus" / "data" / "import"  # the embedded Milvus' localStorage.path, /import
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, folder / "rows.parquet")
            written = time.perf_counter() - start
            connections.connect(uri=milvus.uri)
            task = utility.do_bulk_insert("by_import", files=[str(folder / "rows.parquet")])
            while (state := utility.get_bulk_insert_state(task)).state_name not in ("Persisted", "Completed", "Failed"):
                time.sleep(0.2)
            imported = time.perf_counter() - start
            print(f"bulk insert: {state.state_name}, {state.row_count} rows; Parquet written in {written:.1f} s, "
                  f"persisted {imported - written:.1f} s later: {n / imported:.0f} rows/s in all "
                  f"{state.infos.get('failed_reason') or ''}")

            start = time.perf_counter()
            built = index.wait_for_index("by_insert", 3600)
            seconds = time.perf_counter() - start
            print(f"IVF_PQ {built['params']}: every row indexed {seconds:.1f} s after the flush: {n / seconds:.0f} rows/s "
                  "(the second collection building at the same time)")
            index.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
