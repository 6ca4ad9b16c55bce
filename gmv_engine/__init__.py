"""GMV engine: GMValuator attribution (recall in Milvus, re-rank, quality, credit).

Knows nothing about gRPC; `server/` serves it and the `gmv` command drives it.
"""
__version__ = "0.1.0"
