"""From message bytes to change events: connector envelopes, Extended JSON, validation."""
