"""The rendering engine: networks, checkpoint loading, sampling, placement. No UI imports here."""
