"""What runs on every node: numerics, codec, wire protocol and the agent loop.

Nothing here imports ``orchestrator``.
"""

__version__ = "0.1.0"
