"""The search index of the embedding streams (ALERTS.md "Search"): `shard.py` one (model, modality) shard, its
filtered search and its snapshots (neither Ray nor torch: `bindstream search` opens snapshots with it);
`indexer.py` the consumer group that keeps a shard current, as a Ray actor; `bench.py` the benchmark."""
