"""What every other package builds on and that imports nothing else of tckr: configuration machinery,
the error type, devices and processes, atomic writes, progress bars."""
