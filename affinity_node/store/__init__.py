"""Postgres adapters: SQL, migrations, the binding store and the change listener."""
