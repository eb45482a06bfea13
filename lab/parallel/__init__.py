"""Device mesh, logical-axis rules and explicit collectives."""
