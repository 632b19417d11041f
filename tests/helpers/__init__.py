"""Test helpers shared by the test tiers (mock drivers, fake guests)."""
