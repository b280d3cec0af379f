"""After the registry: record exports, check a served model against the one in process, watch it."""
