"""Dataset -> WebDataset shards in object storage (see docs/ingest.md)."""
