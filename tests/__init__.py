"""dtda-bench tests (a regular package: kronfluence installs a top-level ``tests`` package that would shadow a namespace one)."""
