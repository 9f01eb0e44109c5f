"""Parallel layouts built on engine/ and collectives/: data parallel with ZeRO
stages 1-3, pipeline schedules (GPipe, 1F1B, interleaved, ZB-H1) and sequence-sharded attention
(ring, Ulysses). Each layout is tested to equal one process."""
