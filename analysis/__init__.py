"""Results, FLOPs/MFU, leaderboard and recommendation."""
