"""The virtual GPU: a model of an H100 and the workloads it replays. Results are model predictions."""
