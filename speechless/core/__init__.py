"""What every stage uses: typed config, checked I/O, one-line errors, logging, the training toolkit, runs and
provenance, the versioned store, torch.distributed, metrics, the report, GGUF model sources. Imports no stage."""
