"""What every step shares: settings, the failure vocabulary, retries, logs, metrics, shutdown, recovery."""
