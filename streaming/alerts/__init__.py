"""Standing queries over the embedding streams and the alerts they raise: records, prompts, storage in Redis,
scoring, the decision rule, the matcher loop, tuning, search and timelines."""
