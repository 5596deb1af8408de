"""Distillation stages: squeeze (teacher training). Recover, relabel and DC arrive with their
issue; until then the CLI says so rather than pretending they exist."""
