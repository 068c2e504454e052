"""The Redis transport: "Crashes lose nothing and keep order" (reliable fetch, head requeue) on Redis."""
