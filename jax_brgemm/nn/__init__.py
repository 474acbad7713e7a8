"""Deep-learning primitives as loops around the brgemm kernel."""

__all__: list[str] = []
