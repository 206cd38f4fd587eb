"""Event sources the trainer reads besides the embedded log (contracts/eventlog.py): a Kafka consumer group
and the Delta Lake archive (with the archiver that writes it)."""
