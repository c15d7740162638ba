"""Installed as the package `worker.migrations` (see pyproject.toml), so that the .sql files
travel with every install; `worker.migrate` reads them with importlib.resources."""
