"""Django app holding the tasks the integration tests publish."""
