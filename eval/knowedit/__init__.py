"""KnowEdit (Zhang et al. 2024) as one benchmark: the six tasks' loaders (:mod:`.tasks`), the metrics of the three
tasks that are not plain fact edits (:mod:`.metrics`), one method x task cell (:mod:`.cells`) and the whole table
(:mod:`.bench`), run as shard processes on one machine (:mod:`.parallel`) or merged from several (:mod:`.merge`)."""

# Cases per task of the default run: 7 methods x 6 tasks x 6 cases, both protocols, took 1 h 56 min on the shared
# 2-core machine (BENCHMARKS.md, "KnowEdit table: the full default run", says how it was run). Here, not in .bench,
# so the CLI can show it without importing torch.
DEFAULT_LIMIT = 6
