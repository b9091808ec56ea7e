"""Lifecycle stages: each module holds one stage's logic as plain typed functions (called by the
CLI, `lmforge run` and the tests) — one code path everywhere."""
