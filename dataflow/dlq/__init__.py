"""Dead letters: confirmed delivery to a Kafka topic, a durable local fallback, inspection and replay."""
