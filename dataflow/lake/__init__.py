"""The Delta side: table locations, column types, the exactly-once table writer, offsets in Delta."""
