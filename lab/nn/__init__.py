"""Pure layers over explicit parameters."""
