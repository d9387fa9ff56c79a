"""lemur-plan: memory, step time and MFU of a run on any cluster, before it is launched.

Modules by concern: `shape` (the model's numbers), `devices` (the device table), `cluster` (cluster.* settings),
`setting` (the run's settings), `sharding` (the real FSDP2 sharding on a fake process group), `memory`,
`timing`, `predict` (the two together, for one setting), `search` (the settings that fit, ranked), `cli`.
"""
