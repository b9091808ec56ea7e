"""Lifecycle stages: each module holds one stage's logic as plain typed functions (called by the
CLI, the tests and the stage's KFP component) — one code path everywhere."""
