"""The quality wing: early exit measured against full depth through the real engine (evaluation), and the
serving side of making an exit pack (calibrate)."""
