"""Small utilities every layer may use: atomic file writes (atomic.py), device resolution and autocast
(device.py), the one progress printer (progress.py) and the package version (version.py)."""
