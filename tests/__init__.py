"""Tests of ordered_tasks."""
