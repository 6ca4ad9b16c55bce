"""Everything that talks to Milvus: `index` (every pymilvus call, error classification by
pymilvus error code) and `embedded` (start/stop the embedded Milvus server). The rest of GMV
never imports pymilvus."""
