"""KnowEdit (Zhang et al. 2024) as one benchmark: the six tasks' loaders (:mod:`.tasks`), the metrics of the three
tasks that are not plain fact edits (:mod:`.metrics`), one method x task cell (:mod:`.cells`) and the whole table
(:mod:`.bench`)."""
