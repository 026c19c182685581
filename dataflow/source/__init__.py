"""Where messages come from: Kafka partitions (resuming from Delta's offsets) or the bundled sample."""
