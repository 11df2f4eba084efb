"""Private datasets: ingest (sources, columns, splits, statistics) and images (decoding, augmentation)."""
