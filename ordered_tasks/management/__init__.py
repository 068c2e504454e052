"""Management commands of ordered_tasks."""
