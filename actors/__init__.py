"""Ray actors of asynchronous PPO (docs/ARCHITECTURE.md §6). They hold state and call library code."""
