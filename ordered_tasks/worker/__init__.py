"""Worker side of ordered_tasks: launcher, supervisor and worker extensions."""
