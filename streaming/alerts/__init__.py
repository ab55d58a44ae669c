"""Standing queries over the embedding streams and the alerts they raise: records, scoring, the decision
rule, the matcher loop, tuning, search and timelines."""
