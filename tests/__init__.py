"""dtda-bench tests: a regular package, because kronfluence installs a top-level ``tests`` package
that would shadow a namespace one."""
