"""A run's files: the workdir that owns every path, the run files kept
there, checkpoints, the lease, event files, and the storage layer every
file goes through (local disk or object storage)."""
