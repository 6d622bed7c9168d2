"""Agent Keys: scoped, time-limited, budget-capped credentials for AI agents, enforced at a proxy."""

__version__ = "0.1.0"
