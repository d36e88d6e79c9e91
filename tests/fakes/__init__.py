"""Local stand-ins for external services, speaking their real protocols over HTTP."""
