"""The report: GEO-Bench's statistics over seeds and tasks, and the report and leaderboard files."""
