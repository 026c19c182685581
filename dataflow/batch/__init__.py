"""Per-table batching with deadlines, and the closed batches held until the sink makes them durable."""
