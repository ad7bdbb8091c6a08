"""Ray actors of asynchronous PPO (DESIGN.md §4). They hold state and call library code."""
