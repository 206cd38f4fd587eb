"""The server's side of the event stream: the sink LogEvents appends to, the Kafka history feed, and the
per-user recent history both keep current."""
